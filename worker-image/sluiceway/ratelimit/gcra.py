"""The fleet rate limiter's math (GCRA with leased future slots). Pure: no clock, no I/O.

The Lua scripts in ``lua/`` run exactly this arithmetic atomically on the Redis server's clock;
``tests/test_ratelimit_redis.py`` checks the two agree on a real Redis. Keeping the math here lets us property-test the
guarantee: granted slot times form one sequence spaced exactly ``interval`` apart, so any window of
length ``W`` holds at most ``floor(W / interval) + 1 + burst`` task starts, however many workers
share the limit and whenever they join or leave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Grant:
    count: int
    # Offset (µs) of the first granted slot from the server's "now"; negative means "start now"
    # (a burst slot). Slot i starts at first_offset_us + i * interval_us.
    first_offset_us: float
    interval_us: float
    new_tat_us: float
    # When nothing was granted: how long (µs) until a slot falls inside the horizon.
    retry_after_us: float


def interval_us(qps: float) -> float:
    if not (qps > 0 and math.isfinite(qps)):
        raise ValueError(f"qps must be a positive finite number, got {qps!r}")
    return MICROS / qps


def grant(
    *,
    tat_us: float | None,
    now_us: float,
    qps: float,
    burst: int,
    horizon_us: float,
    wanted: int,
) -> Grant:
    """Lease up to ``wanted`` slots whose start times fall no later than ``now + horizon``.

    ``tat_us`` is the theoretical arrival time of the next slot (``None`` when the key is absent).
    ``burst`` slots may start at once after an idle period, as in GCRA's tolerance.
    """
    step = interval_us(qps)
    tolerance = burst * step
    start = max(tat_us if tat_us is not None else now_us - tolerance, now_us - tolerance)
    latest = now_us + horizon_us
    if wanted <= 0 or start > latest:
        return Grant(0, start - now_us, step, start, max(0.0, start - latest))
    available = math.floor((latest - start) / step) + 1
    count = min(wanted, available)
    return Grant(count, start - now_us, step, start + count * step, 0.0)


def release(*, tat_us: float, expected_tat_us: float, qps: float, count: int) -> float:
    """Hand back the last ``count`` slots of a lease that ended at ``expected_tat_us``.

    Only the newest lease can be handed back: if someone leased after us, giving our slots back
    would let their later slots and the returned ones overlap, and the fleet would overshoot.
    """
    if count <= 0 or tat_us != expected_tat_us:
        return tat_us
    return tat_us - count * interval_us(qps)


def slot_times(g: Grant) -> list[float]:
    """Start offsets (µs from the server's now) of each granted slot, clamped at zero."""
    return [max(0.0, g.first_offset_us + i * g.interval_us) for i in range(g.count)]


def max_in_window(starts: list[float], window: float) -> int:
    """Largest number of start times inside any half-open window ``[t, t + window)``."""
    ordered = sorted(starts)
    best = 0
    left = 0
    for right, t in enumerate(ordered):
        while ordered[left] <= t - window:
            left += 1
        best = max(best, right - left + 1)
    return best
