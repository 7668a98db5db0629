"""The worker's metrics, folded in per round trip, read as if each message were observed alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sluiceway.metrics import WorkerMetrics


def _scrape(m: WorkerMetrics) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in m.collect():
        for s in family.samples:
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in m.labels)
            samples[f"{s.name}{{{extra}}}"] = s.value
    return samples


def test_a_batch_of_successes_counts_each_one_in_its_bucket() -> None:
    m = WorkerMetrics("tq", "q")
    m.observe_ok([0.0005, 0.001, 0.003, 700.0])
    m.observe_ok([])
    m.observe_ok([0.02])
    s = _scrape(m)
    assert s["sluiceway_messages_total{outcome=ok,reason=}"] == 5
    # Buckets are cumulative and a bound holds the values equal to it.
    assert s["sluiceway_task_duration_seconds_bucket{le=0.001}"] == 2
    assert s["sluiceway_task_duration_seconds_bucket{le=0.005}"] == 3
    assert s["sluiceway_task_duration_seconds_bucket{le=0.025}"] == 4
    assert s["sluiceway_task_duration_seconds_bucket{le=600.0}"] == 4
    assert s["sluiceway_task_duration_seconds_bucket{le=+Inf}"] == 5
    assert s["sluiceway_task_duration_seconds_count{}"] == 5
    assert abs(s["sluiceway_task_duration_seconds_sum{}"] - 700.0245) < 1e-9


@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0, max_value=1e5, allow_nan=False),
            st.sampled_from([0.0, 0.001, 0.005, 0.025, 600.0]),  # on the bounds themselves
        ),
        max_size=300,
    )
)
def test_a_batch_lands_in_the_buckets_each_figure_would_alone(durations: list[float]) -> None:
    batch, alone = WorkerMetrics("tq", "q"), WorkerMetrics("tq", "q")
    batch.observe_ok(durations)
    for d in durations:
        alone.observe(d, "ok")
    assert batch.duration.counts == alone.duration.counts
    if durations:  # an empty batch leaves a zero count where no observe left any
        assert _scrape(batch) == _scrape(alone)


def test_failures_and_successes_share_the_counter_and_the_histogram() -> None:
    m = WorkerMetrics("tq", "q")
    m.observe_ok([0.002])
    m.observe(0.002, "retried", "error")
    m.observe(None, "dead_lettered", "invalid_json")  # never ran: counted, not timed
    s = _scrape(m)
    assert s["sluiceway_messages_total{outcome=retried,reason=error}"] == 1
    assert s["sluiceway_messages_total{outcome=dead_lettered,reason=invalid_json}"] == 1
    assert s["sluiceway_task_duration_seconds_count{}"] == 2
