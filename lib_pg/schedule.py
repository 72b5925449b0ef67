"""ω as a function of sampling progress (METHOD.md, "Dynamic ω").

Pure functions: progress s = step index / total steps, in [0, 1).
"""

import math

SCHEDULES = ("constant", "linear", "cosine")


def in_active_range(progress: float, start: float, end: float) -> bool:
    """True where PG acts; an `end` of 1 covers the last step too."""
    return start <= progress and (progress < end or end >= 1.0)


def omega_at(progress: float, omega: float, omega_end: float, schedule: str, start: float = 0.0, end: float = 1.0) -> float:
    """The interpolation weight ω of the weak model at this point of sampling.

    Outside [start, end) the step is plain CFG, which is ω = 1.
    """
    if not in_active_range(progress, start, end):
        return 1.0
    if schedule == "constant" or end <= start:
        return omega
    t = min(max((progress - start) / (end - start), 0.0), 1.0)
    if schedule == "linear":
        shape = t
    elif schedule == "cosine":
        shape = (1.0 - math.cos(math.pi * t)) / 2.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return omega + (omega_end - omega) * shape

