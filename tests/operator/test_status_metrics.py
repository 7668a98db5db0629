"""The TaskQueue status gauges the chart's alerts read (charts/sluiceway/templates/prometheusrule.yaml)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from sluiceway_operator.metrics import StatusCollector


def test_status_collector_mirrors_live_workers_and_conditions() -> None:
    statuses: list[tuple[str, str, dict[str, Any]]] = [
        (
            "team",
            "jobs",
            {
                "liveWorkers": 0,
                "backlog": 7,
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "WorkersReady"},
                    {"type": "Degraded", "status": "True", "reason": "NoLiveWorkers"},
                ],
            },
        ),
        ("team", "fresh", {}),  # nothing written yet: no series, rather than a made-up 0
    ]
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: statuses))
    text = generate_latest(registry).decode()
    assert 'sluiceway_taskqueue_live_workers{namespace="team",taskqueue="jobs"} 0.0' in text
    assert (
        'sluiceway_taskqueue_condition{namespace="team",reason="NoLiveWorkers",status="True",'
        'taskqueue="jobs",type="Degraded"} 1.0'
    ) in text
    assert 'taskqueue="fresh"' not in text
    statuses.clear()  # a deleted TaskQueue's loop is gone: its series go with it
    assert "taskqueue=" not in generate_latest(registry).decode()
