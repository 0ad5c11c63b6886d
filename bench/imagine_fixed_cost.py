"""Where one /imagine's time goes besides the sampler steps: the worker's own imagine job (in this process, its real
Worker) timed at 1, 2, N/2 and N steps, the part that does not shrink with fewer steps worked out from the last two
(`fixed_s`), then one N-step job under cProfile (the functions that took longest, on stderr).

    python -m bench.imagine_fixed_cost [--device cuda] [--steps 20] [--repeats 5] [--members M] [--tiny]

`--members M` (M > 1): M members' one-image jobs served together by one `run_many`, as the bot batches a burst; the
timings are of the whole batch.

On a GPU the sampler steps are queued ahead of the GPU, so their time shows up where the host first waits for the
GPU (the image's copy to the CPU); what the host does after that (PNG encoding, files) is on the member's clock too.
`--tiny`: the tiny random model at 64 px (the code path, for CI).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--members", type=int, default=1, help="one-image jobs served together (default: 1)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model on the CPU at 64 px")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be at least 4")
    if args.members < 1:
        parser.error("--members must be at least 1")

    from bench.ours import OursWorker, imagine_params

    root = Path(tempfile.mkdtemp(prefix="imagine-fixed-"))
    device, size = ("cpu", 64) if args.tiny else (args.device, 512)
    if args.tiny:
        from trainer.models.tiny import make_tiny_model

        model = make_tiny_model(root / "model")
    else:
        from bench.sd15 import build_sd15_pipeline

        model = root / "model"
        build_sd15_pipeline(device).save_pretrained(str(model), safe_serialization=True)
    worker = OursWorker(model, device, root / "data")

    def job_s(steps: int, n: int) -> float:
        params = [imagine_params([], root / "out" / f"{steps}-{n}-{m}", steps=steps, cfg=7.0, size=size,
                                 seed=n * args.members + m) for m in range(args.members)]
        if args.members == 1:
            return worker.run("imagine", params[0])[1]
        return worker.run_many("imagine", params)[1]

    for n in range(3):
        job_s(args.steps, n)  # graphs captured, caches warm
    half = args.steps // 2
    seconds = {steps: statistics.median(job_s(steps, 100 + n) for n in range(args.repeats))
               for steps in (1, 2, half, args.steps)}
    per_step = (seconds[args.steps] - seconds[half]) / (args.steps - half)
    profiler = cProfile.Profile()
    profiler.enable()
    profiled = job_s(args.steps, 999)
    profiler.disable()
    report = {"device": device, "size": size, "steps": args.steps, "members": args.members,
              "job_s": {str(steps): round(s, 4) for steps, s in seconds.items()},
              "per_step_s": round(per_step, 5), "fixed_s": round(seconds[args.steps] - per_step * args.steps, 4),
              "profiled_s": round(profiled, 4)}
    print(json.dumps(report, indent=2))
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(35)
        print(out.getvalue(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
