"""Cap this process's address space, so that an upload that would need more makes it fail, not the machine swap.

Called first thing in the intake child process (`python -m trainer.intake`), before NumPy, PIL and OpenCV load.
RLIMIT_AS is POSIX; Windows has no `resource` module and macOS refuses the limit: there the child still runs
apart from the bot, only without the cap (the intake's own bounds still apply), and says so on stderr.
"""
from __future__ import annotations

import sys

# Set in the child's environment by whoever starts it: one thread each for the maths libraries and at most two
# malloc arenas, because every extra thread reserves (not uses) tens of megabytes of address space.
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "MALLOC_ARENA_MAX": "2", "OPENCV_FOR_THREADS_NUM": "1"}


def limit_address_space(megabytes: int) -> bool:
    """True when the limit is in force."""
    try:
        import resource
    except ImportError:  # Windows
        print("intake: no address-space limit on this system", file=sys.stderr)
        return False
    limit = megabytes * 1024 * 1024
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError, AttributeError):  # macOS refuses RLIMIT_AS
        print("intake: the address-space limit could not be set on this system", file=sys.stderr)
        return False
    return True
