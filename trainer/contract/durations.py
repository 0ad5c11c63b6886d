"""How long something takes or may take, as people read it: in Discord messages, errors and the CLI's bars."""
from __future__ import annotations

import math


def format_duration(seconds: float | None) -> str:
    """'45 s', '3 min', '1 h 20 min', '2 h'; '?' when unknown. Seconds round up, minutes to the nearest."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = int(seconds / 60 + 0.5)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h" + (f" {minutes} min" if minutes else "")
