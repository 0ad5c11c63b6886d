"""Which /imagine requests may share one denoising loop: the rule the bot's dispatcher (which queued jobs it sends
as one `run_many`) and GenerationService (which requests of a `run_many` it denoises together) both follow.
Pure Python, so the bot process may import it."""
from __future__ import annotations

from collections.abc import Mapping

MAX_BATCH_IMAGES = 8  # more images would not share one denoising loop
SHARED_OPTIONS = ("width", "height", "steps", "cfg", "scheduler")  # equal in every request of a batch


def batch_key(options: Mapping[str, object], *, variation: bool) -> tuple | None:
    """Requests with equal keys may share one denoising loop; None: this one runs alone (a variation of an image)."""
    if variation:
        return None
    return tuple(options[name] for name in SHARED_OPTIONS)
