"""The worker's metrics, folded in per round trip, read as if each message were observed alone."""

from __future__ import annotations

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


def test_failures_and_successes_share_the_counter_and_the_histogram() -> None:
    m = WorkerMetrics("tq", "q")
    m.observe_ok([0.002])
    m.observe(0.002, "retried", "error")
    m.observe(None, "dead_lettered", "invalid_json")  # never ran: counted, not timed
    s = _scrape(m)
    assert s["sluiceway_messages_total{outcome=retried,reason=error}"] == 1
    assert s["sluiceway_messages_total{outcome=dead_lettered,reason=invalid_json}"] == 1
    assert s["sluiceway_task_duration_seconds_count{}"] == 2
