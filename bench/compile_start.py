"""`python -m bench.compile_start`: what `--compile-unet` costs a worker's start, the first time and once inductor's
kernels are kept under the data directory (trainer/generation/fast_unet.py `keep_compiled_kernels`).

Starts the real GPU worker as the bot does (`python -m trainer worker --compile-unet`) on the same fresh data directory `--starts`
times; each start compiles and captures the /imagine shapes in its warm-up before `ready`. Reports per start the
seconds to `ready` and the warm-up's own figure from the worker's log, and the size of DATA_DIR/cache/inductor.
On a CPU it only checks the code path (nothing is compiled there).
Prints JSON. Needs a CUDA GPU (the UNet is compiled inside CUDA graphs only there).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.lag import prepare_model
from bot.dispatch.worker_client import worker_command

WARMED = re.compile(r"warmed up for /imagine in ([\d.]+) s")


def start_once(model: str, data_dir: Path, device: str) -> dict:
    """One worker start to its `ready` event; then stdin is closed, which makes the worker exit."""
    argv = worker_command(model=model, data_dir=data_dir, device=device, compile_unet=True) + ["--warm-up", "on"]
    log_path = data_dir / f"worker-{time.time_ns()}.log"
    began = time.perf_counter()
    with open(log_path, "w+", encoding="utf-8") as log:
        worker = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        ready_s = None
        for line in worker.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                ready_s = time.perf_counter() - began
                break
        worker.stdin.close()
        worker.wait(timeout=120)
        log.seek(0)
        text = log.read()
    warmed = WARMED.search(text)
    return {"exit_status": worker.returncode, "ready_s": None if ready_s is None else round(ready_s, 1),
            "warm_up_s": float(warmed.group(1)) if warmed else None,
            "log_tail": None if warmed else text[-2000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_start", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-sd15", help="a diffusers directory, or random-sd15 (default)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--starts", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        model = prepare_model(args.model, Path(tmp))
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        starts = [start_once(model, data_dir, args.device) for _ in range(args.starts)]
        cache = data_dir / "cache" / "inductor"
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
    print(json.dumps({"starts": starts, "inductor_cache_mb": round(size / 1e6, 1)}, indent=2))
    return 0 if all(s["exit_status"] == 0 for s in starts) else 1


if __name__ == "__main__":
    sys.exit(main())
