"""Statistics for repeated measurements: medians with their spread, and latency percentiles.

Pure functions over lists of floats; the harness and its tests use nothing else."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True, slots=True)
class Summary:
    """A measurement over repetitions: the median, and min..max so the reader sees the spread."""

    median: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def summarize(values: Iterable[float]) -> Summary:
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("summarize() needs at least one value")
    n = len(vals)
    mid = n // 2
    median = vals[mid] if n % 2 else (vals[mid - 1] + vals[mid]) / 2
    return Summary(median, vals[0], vals[-1], n)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default),
    so p50 of [1, 2, 3, 4] is 2.5 and p100 is the maximum."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("percentile() needs at least one value")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(vals) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference
