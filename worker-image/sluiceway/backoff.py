"""Retry backoff: exponential with jitter. Pure: the random draw is an argument."""

from __future__ import annotations


def retry_delay(attempt: int, *, base: float, cap: float, draw: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    "Equal jitter": half of the exponential step is fixed and half is random, so retries of a
    failed batch spread out yet never come back sooner than half the nominal delay.
    ``draw`` is a uniform random number in [0, 1).
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must be non-negative")
    # min() before the power would overflow for huge attempt counts; 2**60 is plenty.
    nominal = min(cap, base * 2.0 ** min(attempt - 1, 60))
    half = nominal / 2.0
    return half + half * min(max(draw, 0.0), 1.0)
