"""`python -m bench.train_yield`: what a training that yields on demand costs, through the real GPU worker process.

The worker (`python -m trainer worker`, model resident) is driven over its protocol as the bot's runner drives it:
1. a /train alone, start to `done` (no slices: it never pauses), with the class images made first (cold) and again
   with them cached (warm);
2. the same training with one /imagine arriving `--imagine-after` seconds in: `yield` → `paused` → the /imagine →
   the training goes on (from memory) → `done`. Reported: the /imagine's wait (yield asked → its result), the
   training's total, and the cost of the interruption against (1);
3. the same /imagine with the GPU idle (its floor).
Prints one JSON object (GPU, versions, figures). `--tiny` runs the tiny random model on the CPU (a smoke test); on a
GPU: `python -m bench.train_yield --device cuda --model random-sd15` (or a real SD 1.5 directory).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.lag import prepare_model
from bot.dispatch.worker_client import WorkerClient, worker_command


def _photos(directory: Path, count: int, side: int) -> Path:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(directory / f"{i:03d}.png")
    return directory


async def measure(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="train-yield-"))
    model = prepare_model(None if args.tiny else args.model, work)
    device = "cpu" if args.tiny else args.device
    client = WorkerClient(worker_command(model=model, data_dir=work / "data", device=device, dtype=args.dtype))
    await client.start()
    ready = await client.wait_ready(900)
    side = 64 if args.tiny else 512
    photos = _photos(work / "photos", 5, side)
    recipe = {"concept_id": "bench", "token": "sks", "class_name": "man", "photos_dir": str(photos),
              "steps": args.steps, "seed": 1, "sample_count": 0, "checkpoint_s": args.checkpoint_s,
              "cache_dir": str(work / "data" / "cache")}
    if args.tiny:
        recipe.update(resolution=32, class_images=4)
    imagine = {"prompt": "a photo of a dog", "seed": 5, "steps": args.imagine_steps, "count": 1}
    if args.tiny:
        imagine.update(width=64, height=64)
    figures: dict = {"device": ready["device"], "dtype": ready["dtype"], "model": model}
    try:
        for name in ("cold", "warm"):
            began = time.monotonic()
            end = await client.run(1, "train", {**recipe, "out_dir": str(work / f"alone-{name}")})
            assert end["event"] == "done", end
            figures[f"train_alone_{name}_s"] = round(time.monotonic() - began, 3)
            figures[f"train_alone_{name}_timings"] = end["result"].get("timings")

        out = {**recipe, "out_dir": str(work / "interrupted")}
        began = time.monotonic()
        training = asyncio.create_task(client.run(2, "train", out))
        await asyncio.sleep(args.imagine_after)
        asked = time.monotonic()
        await client.request_yield(2)
        paused = await training
        assert paused["event"] == "paused", paused
        yielded = time.monotonic()
        end = await client.run(3, "imagine", {**imagine, "out_dir": str(work / "images-3")})
        assert end["event"] == "done", end
        served = time.monotonic()
        end = await client.run(2, "train", out)
        assert end["event"] == "done", end
        figures.update(imagine_during_training_wait_s=round(served - asked, 3),
                       yield_latency_s=round(yielded - asked, 3), paused_at_step=paused["step"],
                       train_interrupted_s=round(time.monotonic() - began, 3))
        figures["interruption_cost_s"] = round(figures["train_interrupted_s"] - figures["train_alone_warm_s"]
                                               - (served - yielded), 3)
        idle = []
        for i in range(args.repeats):
            began = time.monotonic()
            end = await client.run(10 + i, "imagine", {**imagine, "out_dir": str(work / f"images-{10 + i}")})
            assert end["event"] == "done", end
            idle.append(time.monotonic() - began)
        figures["imagine_idle_s"] = round(sorted(idle)[len(idle) // 2], 3)
    finally:
        await client.stop()
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_yield", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU (smoke test)")
    parser.add_argument("--model", default="random-sd15", help="model directory or hub id (default: random SD 1.5)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--checkpoint-s", type=float, default=10.0, help="the crash checkpoint interval")
    parser.add_argument("--imagine-after", type=float, default=8.0, help="seconds into the training (issue 15: 8)")
    parser.add_argument("--imagine-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps = args.steps or 20
        args.imagine_after = min(args.imagine_after, 1.0)
        args.imagine_steps, args.repeats = 2, 1
    figures = asyncio.run(measure(args))
    figures["versions"] = {"python": sys.version.split()[0]}
    try:
        import diffusers
        import torch

        figures["versions"].update(torch=torch.__version__, diffusers=diffusers.__version__)
    except ImportError:
        pass
    figures["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
