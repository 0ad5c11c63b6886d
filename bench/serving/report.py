"""The serving benchmark's report: the figures through the bot against issue 15's goals, the engine bench's
reference-vs-ours rows beside them, as a markdown table (docs/BENCHMARKS.md takes it as it is) and JSON."""
from __future__ import annotations

from bench.serving.breakdown import PARTS, TRAIN_PARTS

# (label, path into the measured figures, goal, lower is better); goal None: a figure without a goal
SERVED_ROWS = (
    ("/train, 5 photos, fresh data directory -> \"ready\" post (s)", ("train_cold_s",), 25.0, True),
    ("/train, class images cached -> \"ready\" post (s)", ("train_warm_s",), 15.0, True),
    ("/imagine alone, p50 (s)", ("imagine_alone", "p50_s"), 0.25, True),
    ("/imagine alone, p99 (s)", ("imagine_alone", "p99_s"), None, True),
    ("first /imagine once the worker is ready (s)", ("imagine_first_after_ready_s",), 2.0, True),
    ("/imagine during a training, the first (s)", ("imagine_during_training", "first_s"), None, True),
    ("/imagine during a training, p50 (s)", ("imagine_during_training", "p50_s"), None, True),
    ("/imagine during a training, p99 (s)", ("imagine_during_training", "p99_s"), 1.0, True),
    ("/imagine with the new concept, the first (s)", ("imagine_with_concept", "first_s"), None, True),
    ("/imagine with the new concept, p50 (s)", ("imagine_with_concept", "p50_s"), None, True),
    ("/imagine with the new concept, p99 (s)", ("imagine_with_concept", "p99_s"), None, True),
    ("burst of members' /imagine at once (images/s)", ("burst", "images_per_s_overall"), 8.0, False),
    # the same with each member's prompt naming one of two trained concepts: every batch mixes LoRAs
    ("burst with members' concepts mixed (images/s)", ("burst_concepts", "images_per_s_overall"), None, False),
    ("its first round, before that forward is compiled (s)", ("burst_concepts", "first_round_s"), None, True),
    ("bot start -> worker ready (s)", ("start_to_ready_s",), None, True),
    # measured from /imagine alone on: 0 when the worker does not compile ahead (a CPU, a GPU under 22 GB, or off)
    ("forward shapes compiled ahead of time and in use", ("compiled_ahead", "in_use"), None, False),
    ("waited for them after the first training (s)", ("compiled_ahead", "waited_s"), None, True),
    # the whole run's peak (reserved by the worker: service, both trainings, bursts of 8), at this GPU's own settings
    ("peak GPU memory of the worker, whole run (GB)", ("gpu_peak_gb",), None, True),
)


def _at(figures: dict, path: tuple[str, ...]):
    for key in path:
        figures = figures.get(key) if isinstance(figures, dict) else None
    return figures


def served_rows(figures: dict) -> list[dict]:
    rows = []
    for label, path, goal, lower_better in SERVED_ROWS:
        value = _at(figures, path)
        met = None if goal is None or value is None else (value <= goal if lower_better else value >= goal)
        rows.append({"figure": ".".join(path), "label": label, "value": value, "goal": goal,
                     "goal_reads": None if goal is None else ("<=" if lower_better else ">="), "met": met})
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown(report: dict) -> str:
    env, config = report["environment"], report["config"]
    lines = [f"Serving benchmark: {env.get('gpu')}, {env.get('date')}; torch {env.get('torch')}, diffusers "
             f"{env.get('diffusers')}, transformers {env.get('transformers')}, peft {env.get('peft')}, python "
             f"{env.get('python')}",
             f"Model {config['model']} on {config['device']}; /train recipe {config['recipe']}; /imagine "
             f"{config['imagine_options'] or 'defaults'}; {config['repeats']} repeats; burst {config['burst_members']} "
             f"members x {config['burst_rounds']} rounds. Command: `{config['command']}`", "",
             "| through the bot | measured | goal | met |", "| --- | ---: | ---: | :---: |"]
    for row in report["served_rows"]:
        goal = "" if row["goal"] is None else f"{row['goal_reads']} {_cell(row['goal'])}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append(f"| {row['label']} | {_cell(row['value'])} | {goal} | {met} |")
    parts = _at(report, ("served", "imagine_alone_parts")) or {}
    if parts:
        lines += ["", "| where /imagine alone's time went (median) | s |", "| --- | ---: |"]
        lines += [f"| {PARTS[name]} | {_cell(value)} |" for name, value in parts.items()]
    cold, warm = (_at(report, ("served", key)) or {} for key in ("train_cold_parts", "train_warm_parts"))
    if cold or warm:
        lines += ["", "| where /train's time went | cold (s) | class images cached (s) |", "| --- | ---: | ---: |"]
        lines += [f"| {label} | {_cell(cold.get(name))} | {_cell(warm.get(name))} |"
                  for name, label in TRAIN_PARTS.items() if name in cold or name in warm]
    burst = _at(report, ("served", "burst")) or {}
    if burst.get("images_per_s"):
        lines.append(f"\nburst rounds: {burst['rounds_s']} s -> {burst['images_per_s']} images/s")
    mixed = _at(report, ("served", "burst_concepts")) or {}
    if mixed.get("images_per_s"):
        lines.append(f"\nbursts with concepts mixed: {mixed['rounds_s']} s -> {mixed['images_per_s']} images/s "
                     f"(first round {mixed['first_round_s']} s)")
    if burst.get("last_parts"):
        lines += ["", "| where a burst round's time went (its last result; median over the rounds) | s |",
                  "| --- | ---: |"]
        lines += [f"| {PARTS[name]} | {_cell(value)} |" for name, value in burst["last_parts"].items()]
    engine = report.get("engine")
    if engine:
        lines += ["", f"| engine, same command (`python -m bench`, {engine['model']}) | reference | ours | ratio |",
                  "| --- | ---: | ---: | ---: |"]
        for row in engine["rows"]:
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            lines.append(f"| {row['label']} ({row['unit']}) | {_cell(row['reference'])} | {_cell(row['ours'])} | "
                         f"{ratio} |")
    for where, error in (report.get("errors") or {}).items():
        lines.append(f"\nFAILED {where}: {error}")
    return "\n".join(lines)
