"""Kafka's pure logic: the committable offset under out-of-order completion, and group lag."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway.transports.kafka_offsets import PartitionTrack
from sluiceway_operator.backlog.kafka_lag import PartitionOffsets, partition_lag, total_lag

# --- the committable offset ----------------------------------------------------------------------


def test_commit_stops_at_the_lowest_unfinished_record() -> None:
    t = PartitionTrack(committed=10)
    for o in range(10, 15):
        t.start(o)
    assert t.committable() == 10
    t.finish(12)
    t.finish(13)
    assert t.committable() == 10  # 10 and 11 still run: nothing past them may be committed
    t.finish(10)
    assert t.committable() == 11
    t.finish(11)
    assert t.committable() == 14
    t.finish(14)
    assert t.committable() == 15


def test_a_record_given_back_holds_the_commit_until_it_runs_again() -> None:
    t = PartitionTrack(committed=0)
    for o in range(3):
        t.start(o)
    t.finish(0)
    assert t.give_back(1)
    t.finish(2)
    assert t.committable() == 1
    assert not t.holds(1)  # fetched again after the seek back: it must run
    assert t.holds(2)  # finished: a re-fetch after the seek must not run it twice
    t.start(1)
    t.finish(1)
    assert t.committable() == 3


def test_settling_twice_or_an_unknown_offset_is_harmless() -> None:
    t = PartitionTrack(committed=5)
    t.start(5)
    assert t.finish(5)
    assert not t.finish(5)
    assert not t.finish(99)
    assert not t.give_back(5)
    assert t.committable() == 6


ops = st.lists(st.tuples(st.sampled_from(["fetch", "finish", "give_back", "commit"]), st.integers(0, 50)))


@given(ops)
def test_never_commits_past_an_unfinished_record(steps: list[tuple[str, int]]) -> None:
    """A model: records are fetched in offset order (re-fetched after a give-back), finish in any
    order; the committable offset never passes a record that is not finished, and reaches every
    contiguous finished prefix."""
    base = 100
    t = PartitionTrack(committed=base)
    finished: set[int] = set()
    handed: set[int] = set()  # fetched, not finished, not given back
    returned: set[int] = set()
    next_new = base
    for op, n in steps:
        if op == "fetch":
            if returned:
                o = min(returned)
                returned.discard(o)
            else:
                o = next_new
                next_new += 1
            assert not t.holds(o)
            t.start(o)
            handed.add(o)
        elif op == "finish" and handed:
            o = sorted(handed)[n % len(handed)]
            assert t.finish(o)
            handed.discard(o)
            finished.add(o)
        elif op == "give_back" and handed:
            o = sorted(handed)[n % len(handed)]
            assert t.give_back(o)
            handed.discard(o)
            returned.add(o)
        elif op == "commit":
            t.mark_committed(t.committable())
        point = t.committable()
        assert all(o in finished for o in range(base, point)), "committed past an unfinished record"
        first_unfinished = min(handed | returned | {next_new})
        assert point == first_unfinished, "a finished prefix was left uncommitted"
        for o in finished:
            assert t.holds(o)


batch_ops = st.lists(
    st.tuples(
        st.sampled_from(["fetch", "finish", "give_back", "commit"]), st.integers(0, 50), st.integers(1, 8)
    )
)


@given(batch_ops)
def test_the_bulk_calls_are_the_per_record_calls(steps: list[tuple[str, int, int]]) -> None:
    """start_new / finish_open (the transport's batch path) leave a track exactly as start /
    finish one record at a time would, across give-backs and commits."""
    one, bulk = PartitionTrack(committed=7), PartitionTrack(committed=7)
    handed: list[int] = []
    returned: list[int] = []
    for op, n, k in steps:
        if op == "fetch" and returned:
            o = returned.pop(0)  # a re-fetched record: never a run of new ones
            one.start(o)
            bulk.start(o)
            handed.append(o)
        elif op == "fetch":
            run = list(range(one.next_offset, one.next_offset + k))
            for o in run:
                one.start(o)
            bulk.start_new(run)
            handed += run
        elif op == "finish" and handed:
            some = sorted(handed)[n % len(handed) :][:k]
            for o in some:
                assert one.finish(o)
                handed.remove(o)
            bulk.finish_open(some)
        elif op == "give_back" and handed:
            o = sorted(handed)[n % len(handed)]
            assert one.give_back(o) and bulk.give_back(o)
            handed.remove(o)
            returned.append(o)
        elif op == "commit":
            one.mark_committed(one.committable())
            bulk.mark_committed(bulk.committable())
        assert (one.committable(), one.next_offset, one.unfinished) == (
            bulk.committable(),
            bulk.next_offset,
            bulk.unfinished,
        )
        assert all(one.holds(o) == bulk.holds(o) for o in range(0, one.next_offset + 2))


# --- the backlog: group lag ----------------------------------------------------------------------


def test_the_keda_case_250_not_52() -> None:
    """Measured here: 400 keyed records on 4 partitions, 150 processed; p0 and p1 had never been
    committed. The true backlog is 250; KEDA's default (latest, lag 1 per uncommitted) read 52."""
    parts = [
        PartitionOffsets(0, low=0, high=100, committed=None),
        PartitionOffsets(1, low=0, high=100, committed=None),
        PartitionOffsets(2, low=0, high=75, committed=25),
        PartitionOffsets(3, low=0, high=125, committed=125),
    ]
    assert total_lag(parts, "earliest") == 250
    # Under `latest`, a group that never committed skips what is there: those records never run.
    assert total_lag(parts, "latest") == 50


def test_retention_past_the_committed_offset_resets_by_the_policy() -> None:
    p = PartitionOffsets(0, low=40, high=100, committed=10)
    assert partition_lag(p, "earliest") == 60
    assert partition_lag(p, "latest") == 0


def test_inconsistent_watermarks_are_an_error_naming_the_partition() -> None:
    with pytest.raises(ValueError, match="partition 3"):
        partition_lag(PartitionOffsets(3, low=10, high=5, committed=None), "earliest")


@st.composite
def partitions(draw: st.DrawFn) -> PartitionOffsets:
    low = draw(st.integers(0, 10**6))
    high = draw(st.integers(low, low + 10**6))
    committed = draw(st.none() | st.integers(0, high + 10))
    return PartitionOffsets(draw(st.integers(0, 100)), low, high, committed)


@given(st.lists(partitions(), max_size=12))
def test_lag_is_bounded_by_the_log_and_matches_the_policy(parts: list[PartitionOffsets]) -> None:
    for p in parts:
        for reset in ("earliest", "latest"):
            lag = partition_lag(p, reset)
            assert 0 <= lag <= p.high - p.low
            if p.committed is not None and p.low <= p.committed <= p.high:
                assert lag == p.high - p.committed  # a valid commit decides, whatever the policy
        if p.committed is None:
            assert partition_lag(p, "earliest") == p.high - p.low
            assert partition_lag(p, "latest") == 0
    assert total_lag(parts, "earliest") >= total_lag(parts, "latest")


# --- the replica cap: a group never gives one partition to two members ----------------------------


def test_replicas_never_exceed_the_partition_count_and_the_reason_says_so() -> None:
    from sluiceway_operator.scaling import Observation, Policy, Reason, ScalingState, decide

    policy = Policy(min_replicas=0, max_replicas=50, target_drain_seconds=10, per_pod=4)
    big = Observation(now=1000.0, backlog=100_000, in_flight=0, workers=(), current_replicas=0, max_useful=6)
    d = decide(big, policy, ScalingState())
    assert d.desired == 6
    assert d.reason is Reason.WAKE  # from zero the wake-up says so; the cap shows in the size
    d2 = decide(
        Observation(now=1001.0, backlog=100_000, in_flight=0, workers=(), current_replicas=6, max_useful=6),
        policy,
        d.state,
    )
    assert d2.desired == 6
    assert d2.reason in (Reason.MAX_USEFUL, Reason.NO_LIVE_WORKERS)
    # A QPS ceiling below the partition count binds first.
    qps = Policy(
        min_replicas=0, max_replicas=50, target_drain_seconds=10, per_pod=4, qps=10, assumed_task_seconds=1
    )
    d3 = decide(big, qps, ScalingState())
    assert d3.desired < 6 and d3.ceiling == d3.desired
    # No broker bound (Redis, RabbitMQ): the old behaviour.
    free = decide(
        Observation(now=1000.0, backlog=100_000, in_flight=0, workers=(), current_replicas=0),
        policy,
        ScalingState(),
    )
    assert free.desired == 50
