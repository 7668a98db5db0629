"""The heartbeat's finish rate (sluiceway.ratemeter): no ceiling, about the last 10 s."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sluiceway.ratemeter import WINDOW, RateMeter


def test_a_fast_worker_reports_its_rate_past_the_latency_window_s_sample_cap() -> None:
    meter = RateMeter(started=0.0)
    # 10,000 tasks/s, read every half second: the old rate topped out at 409.6.
    rates = [meter.rate(t / 2, 5000 * t) for t in range(1, 61)]
    assert rates[-1] == 10_000


def test_the_rate_follows_the_last_window_not_the_whole_life() -> None:
    meter = RateMeter(started=0.0)
    for t in range(1, 21):
        meter.rate(float(t), 100 * t)  # 100/s for 20 s
    for t in range(21, 41):
        last = meter.rate(float(t), 2000 + 10 * (t - 20))  # then 10/s
    assert last == 10


@given(steps=st.lists(st.tuples(st.floats(0.01, 5.0), st.floats(0.0, 50_000.0)), min_size=1, max_size=60))
def test_the_rate_is_the_finishes_over_a_span_of_at_least_the_window_or_the_life(
    steps: list[tuple[float, float]],
) -> None:
    meter, now, count, history = RateMeter(started=0.0), 0.0, 0, [(0.0, 0)]
    for gap, per_second in steps:
        now += gap
        count += int(gap * per_second)
        rate = meter.rate(now, count)
        since, base = max(((t, n) for t, n in history if t <= now - WINDOW), default=history[0])
        assert rate == (count - base) / max(now - since, 0.001)
        history.append((now, count))
