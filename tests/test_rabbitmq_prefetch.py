"""The rule that sizes an unlimited worker's consumer prefetch (pure; no broker)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sluiceway.transports import rabbitmq_topology as topo

counts = st.integers(min_value=0, max_value=100_000)
rates = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(counts, counts, rates)
def test_the_target_is_what_the_worker_holds_plus_its_room_plus_the_in_flight_part(
    held: int, room: int, rate: float
) -> None:
    target = topo.prefetch_target(held, room, rate)
    ahead = min(topo.MAX_IN_FLIGHT_AHEAD, int(rate * topo.IN_FLIGHT_SECONDS))
    assert target == max(1, min(topo.MAX_PREFETCH, held + room + ahead))


def test_a_slow_worker_gets_no_extra_window() -> None:
    # 8 tasks of a second each: 8 held, 8 of room, 8 deliveries/s measured.
    assert topo.prefetch_target(8, 8, 8.0) == 17


def test_a_full_buffer_does_not_feed_the_prefetch() -> None:
    """What the broker already sent is not in the target: a worker whose buffer is full keeps
    its prefetch. (Counting it once grew a -c 1 worker's window to 12,000 in ten seconds.)"""
    prefetch, held, room, rate = 2_257, 128, 129, 20_000.0
    for _ in range(100):
        # The broker fills the window; the worker's own figures do not change.
        nxt = topo.new_prefetch(prefetch, topo.prefetch_target(held, room, rate), since_last=10.0)
        prefetch = nxt if nxt is not None else prefetch
    assert prefetch == held + room + topo.MAX_IN_FLIGHT_AHEAD


@given(st.integers(min_value=1, max_value=60_000), st.integers(min_value=1, max_value=65_535))
def test_a_large_growth_resubscribes_at_once(current: int, target: int) -> None:
    got = topo.new_prefetch(current, target, since_last=0.0)
    if target > current * (1 + topo.REQOS_GROWTH):
        assert got == target
    elif target >= current / 2:
        assert got is None  # small changes and no change wait for the interval


@given(st.integers(min_value=1, max_value=60_000), st.integers(min_value=1, max_value=65_535))
def test_after_the_interval_any_growth_and_a_halving_resubscribe(current: int, target: int) -> None:
    got = topo.new_prefetch(current, target, since_last=topo.REQOS_INTERVAL)
    if target > current or target < current / 2:
        assert got == target
    else:
        assert got is None


@given(st.integers(min_value=1, max_value=60_000), st.floats(min_value=0, max_value=0.999))
def test_shrinking_waits_for_the_interval(current: int, since: float) -> None:
    assert topo.new_prefetch(current, 1, since_last=since * topo.REQOS_INTERVAL) is None


def test_a_worker_starting_on_a_full_queue_reaches_its_window_in_one_step() -> None:
    # -c 1 starts with a prefetch of 2; once its engine reports room for 256, one re-subscription.
    assert topo.new_prefetch(2, topo.prefetch_target(1, 256, 0.0), since_last=0.01) == 257


@given(
    st.integers(min_value=1, max_value=65_535),
    st.integers(min_value=1, max_value=65_535),
    st.integers(min_value=1, max_value=10),
)
def test_a_growth_adds_a_consumer_for_the_difference_and_anything_else_resubscribes(
    current: int, want: int, consumers: int
) -> None:
    added = topo.added_consumer_prefetch(current, want, consumers)
    if want > current and consumers < topo.MAX_CONSUMERS:
        assert added is not None
        assert current + added == want  # the consumers together hold exactly the new window
        assert 1 <= added <= topo.MAX_PREFETCH
    else:
        assert added is None


def test_a_worker_growing_step_by_step_holds_at_most_max_consumers() -> None:
    window, consumers = 16, 1
    for want in (24, 40, 80, 200, 500, 1000):
        added = topo.added_consumer_prefetch(window, want, consumers)
        if added is None:
            window, consumers = want, 1  # re-subscribed as one consumer
        else:
            window, consumers = window + added, consumers + 1
        assert window == want
        assert consumers <= topo.MAX_CONSUMERS


@given(
    st.integers(min_value=1, max_value=1000),
    st.integers(min_value=0, max_value=1000),
    st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
)
def test_only_a_grant_filled_from_a_queue_that_held_more_skips_the_next_count(
    granted: int, taken: int, ready: int | None
) -> None:
    taken = min(taken, granted)
    backlog = topo.backlog_after(granted, taken, ready)
    if taken < granted:
        assert not backlog  # short: the queue ran out (or others took it)
    elif ready is not None and ready <= granted:
        assert not backlog  # it took all that was ready: the queue may be empty now
    else:
        assert backlog
