"""The benchmark's results: the environment it ran in, the comparison rows, a text table and JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

# metric -> (unit, goal, lower_is_better, how "ratio" reads)
GOALS = {
    "train_s": ("s", 10.0, True, "ref/ours"),
    "imagine_s": ("s/image", 0.25, True, "ref/ours"),
    "throughput_ips": ("images/s", 10.0, False, "ours/ref"),
    "switch_ms": ("ms", 20.0, True, "ref/ours"),
    "peak_vram_gb": ("GB", 10.0, True, "ref/ours"),
}
# Issue 13's goals for the SDXL family at 1024² (no throughput goal was set for it).
FAMILY_GOALS = {"sdxl": {"train_s": 60.0, "imagine_s": 1.0, "throughput_ips": None, "peak_vram_gb": 20.0}}
LABELS = {
    "train_s": "train one concept (job start -> LoRA saved)",
    "imagine_s": "/imagine 1 image, LoRA active",
    "throughput_ips": "throughput, 8 members x 8 LoRAs",
    "switch_ms": "LoRA switch",
    "peak_vram_gb": "peak VRAM, service + training",
}


def environment(device: str) -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device).index or 0)
    else:
        gpu = f"none ({device}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "python": platform.python_version(), "device": device,
    }


def comparison_rows(metrics: dict, family: str = "sd1") -> list[dict]:
    """One row per metric: {metric, label, unit, reference, ours, ratio, goal, met}; the goals are the family's."""
    rows = []
    for metric, (unit, goal, lower_better, ratio_reads) in GOALS.items():
        goal = FAMILY_GOALS.get(family, {}).get(metric, goal)
        pair = metrics.get(metric)
        if pair is None:
            continue
        ref, ours = pair.get("reference"), pair.get("ours")
        ratio = None
        if isinstance(ref, (int, float)) and isinstance(ours, (int, float)) and ref > 0 and ours > 0:
            ratio = ref / ours if ratio_reads == "ref/ours" else ours / ref
        met = None
        if isinstance(ours, (int, float)) and goal is not None:
            met = ours <= goal if lower_better else ours >= goal
        rows.append({"metric": metric, "label": LABELS[metric], "unit": unit, "reference": ref, "ours": ours,
                     "ratio": ratio, "ratio_reads": ratio_reads, "goal": goal,
                     "goal_reads": "-" if goal is None else ("<= " if lower_better else ">= ") + f"{goal:g}",
                     "met": met,
                     "note": pair.get("note", "")})
    return rows


def format_value(value) -> str:
    """A measurement for the table and the notes: 3 significant digits (whole numbers from 100), '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"boothbot bench · GPU: {env['gpu']} · {env['date']} · torch {env['torch']} · "
             f"diffusers {env['diffusers']} · model: {report['config']['model']}"]
    header = ("metric", "unit", "reference", "ours", "ratio", "goal", "met")
    table = [header]
    for row in report["rows"]:
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        table.append((row["label"], row["unit"], format_value(row["reference"]), format_value(row["ours"]), ratio,
                      row["goal_reads"], met))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {row['label']}: {row['note']}" for row in report["rows"] if row["note"]]
    if notes:
        lines += ["notes:"] + notes
    if report.get("errors"):
        lines += ["errors:"] + [f"  {where}: {message.splitlines()[0]}" for where, message in report["errors"].items()]
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
