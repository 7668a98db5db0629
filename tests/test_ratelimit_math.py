from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway import ratelimit as rl
from sluiceway.backoff import retry_delay

qps_st = st.floats(min_value=0.5, max_value=5000)
calls_st = st.lists(
    st.tuples(st.floats(min_value=0, max_value=300_000), st.integers(min_value=0, max_value=50)),
    min_size=1,
    max_size=60,
)


def simulate(qps: float, burst: int, horizon_us: float, calls: list[tuple[float, int]]) -> list[float]:
    """Absolute start times (µs) of every slot granted to a sequence of (gap, wanted) calls."""
    now = 1e15
    tat: float | None = None
    starts: list[float] = []
    for gap, wanted in calls:
        now += gap
        g = rl.grant(tat_us=tat, now_us=now, qps=qps, burst=burst, horizon_us=horizon_us, wanted=wanted)
        if g.count:
            tat = g.new_tat_us
        starts += [now + off for off in rl.slot_times(g)]
        assert g.count <= wanted
    return starts


@settings(max_examples=300)
@given(
    qps_st, st.integers(min_value=0, max_value=5), st.floats(min_value=1_000, max_value=1_000_000), calls_st
)
def test_no_window_holds_more_than_rate_plus_burst(
    qps: float, burst: int, horizon: float, calls: list[tuple[float, int]]
) -> None:
    starts = simulate(qps, burst, horizon, calls)
    window = 1_000_000.0
    # Slots are spaced exactly one interval apart, apart from the burst let through after idling.
    assert rl.max_in_window(starts, window) <= math.floor(qps) + 1 + burst


@given(qps_st, st.floats(min_value=1_000, max_value=1_000_000), calls_st)
def test_slots_never_start_before_now_and_never_beyond_the_horizon(
    qps: float, horizon: float, calls: list[tuple[float, int]]
) -> None:
    now = 0.0
    tat: float | None = None
    for gap, wanted in calls:
        now += gap
        g = rl.grant(tat_us=tat, now_us=now, qps=qps, burst=0, horizon_us=horizon, wanted=wanted)
        if g.count:
            tat = g.new_tat_us
            offsets = rl.slot_times(g)
            assert offsets[0] >= 0
            assert g.first_offset_us + (g.count - 1) * g.interval_us <= horizon + 1e-6
        elif wanted:
            assert g.retry_after_us > 0


@given(qps_st, st.integers(min_value=1, max_value=10_000))
def test_a_saturated_limiter_grants_exactly_the_rate(qps: float, seconds_x10: int) -> None:
    """Polled continuously, the long-run mean equals the configured rate."""
    seconds = seconds_x10 / 10
    step = rl.interval_us(qps)
    g = rl.grant(tat_us=None, now_us=0, qps=qps, burst=0, horizon_us=seconds * 1e6, wanted=10**9)
    assert g.count == math.floor(seconds * 1e6 / step) + 1


def test_release_hands_back_only_the_newest_lease() -> None:
    g1 = rl.grant(tat_us=None, now_us=0, qps=10, burst=0, horizon_us=1e6, wanted=5)
    g2 = rl.grant(tat_us=g1.new_tat_us, now_us=0, qps=10, burst=0, horizon_us=1e6, wanted=3)
    # Someone leased after g1: returning g1's slots would overlap g2's.
    assert rl.release(tat_us=g2.new_tat_us, expected_tat_us=g1.new_tat_us, qps=10, count=2) == g2.new_tat_us
    assert rl.release(tat_us=g2.new_tat_us, expected_tat_us=g2.new_tat_us, qps=10, count=2) == pytest.approx(
        g2.new_tat_us - 2 * 100_000
    )


def test_interval_rejects_nonsense() -> None:
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="qps"):
            rl.interval_us(bad)


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0, max_value=10),
    st.floats(min_value=0, max_value=1000),
    st.floats(min_value=0, max_value=1),
)
def test_backoff_is_bounded_and_grows(attempt: int, base: float, extra: float, draw: float) -> None:
    cap = base + extra
    d = retry_delay(attempt, base=base, cap=cap, draw=draw)
    nominal = min(cap, base * 2 ** min(attempt - 1, 60))
    assert nominal / 2 - 1e-9 <= d <= nominal + 1e-9
    assert (
        retry_delay(attempt + 1, base=base, cap=cap, draw=1.0)
        >= retry_delay(attempt, base=base, cap=cap, draw=1.0) - 1e-9
    )


def test_backoff_examples() -> None:
    assert retry_delay(1, base=1, cap=300, draw=0) == 0.5
    assert retry_delay(1, base=1, cap=300, draw=1) == 1
    assert retry_delay(4, base=1, cap=300, draw=1) == 8
    assert retry_delay(30, base=1, cap=300, draw=1) == 300
    with pytest.raises(ValueError, match="attempt"):
        retry_delay(0, base=1, cap=1, draw=0)
