"""Benchmark (not a test): the hostile upload corpus through /train's photo intake, as the bot runs it.

    python -m bench.intake_memory [--small] [--in-process]

Writes the corpus (tests/trainer/hostile.py; the million-entry zip at full size unless --small) in a process of
its own, then sends each case through `take_in_photos` (a child process under the address-space limit, what
`submit_training` calls) and prints, per case, the wall seconds, the child's CPU seconds and the answer; then this
process's RSS before and after the whole corpus. `--in-process` runs `intake_photos` in this process instead (the
same bounded code, no child), to show what the child keeps away from the bot.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bot.services.photo_intake import intake_workspace, take_in_photos
from tests.trainer.hostile import good_photos, write_corpus_in_child
from trainer.contract.errors import UserError
from trainer.intake.photos import IntakeLimits, intake_photos

LIMITS = IntakeLimits(min_photos=1)


def resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def take_in(files, data_dir: Path, in_process: bool):
    if in_process:
        return await asyncio.to_thread(intake_photos, files, limits=LIMITS, class_name="man")
    async with intake_workspace(data_dir) as work_dir:
        return await take_in_photos(files, work_dir, limits=LIMITS, class_name="man", style=False)


def answer(report) -> str:
    if report.ok:
        return f"accepted ({len(report.accepted)})"
    return "refused: " + "; ".join(f"{name}: {reason}" for name, reason in report.rejected[:1])


async def run(full: bool, in_process: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="intake-bench-") as scratch:
        scratch = Path(scratch)
        corpus = write_corpus_in_child(scratch / "corpus", full=full)
        await take_in(good_photos(3), scratch / "data", in_process)  # warm-up: imports, the first child
        gc.collect()
        before = resident_mb()
        print(f"{'case':<18} {'wall s':>7} {'child cpu s':>12}  answer")
        slowest = 0.0
        for case, path in corpus:
            cpu = children_cpu_s()
            started = time.perf_counter()
            try:
                text = answer(await take_in([(case.name, path)], scratch / "data", in_process))
            except UserError as refusal:
                text = f"refused: {refusal}"
            seconds = time.perf_counter() - started
            slowest = max(slowest, seconds)
            print(f"{case.name:<18} {seconds:7.2f} {children_cpu_s() - cpu:12.2f}  {text[:110]}")
        gc.collect()
        after = resident_mb()
    print(f"\n{'in this process' if in_process else 'in the intake child'}: RSS before {before:.0f} MB, after "
          f"{after:.0f} MB ({after - before:+.0f} MB); slowest case {slowest:.2f} s; "
          f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the million-entry zip with 100,000 entries")
    parser.add_argument("--in-process", action="store_true", help="decode in this process (the old way)")
    args = parser.parse_args(argv)
    return asyncio.run(run(full=not args.small, in_process=args.in_process))


if __name__ == "__main__":
    sys.exit(main())
