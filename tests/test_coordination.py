"""Pure readings of heartbeats (coordination, the same for every broker)."""

from __future__ import annotations

from sluiceway.contract import Heartbeat
from sluiceway.coordination.base import alive, in_flight


def _beat(at: float, held: int) -> Heartbeat:
    return Heartbeat(
        worker="w", pod="p", state="running", started=0.0, time=at, interval=2.0, concurrency=4,
        busy=1, in_flight=held, processed=0, failed=0, dead_lettered=0, rate=0.0,
        latency_p50=0.0, latency_p95=0.0, latency_p99=0.0, version="test",
    )  # fmt: skip


def test_in_flight_sums_what_live_workers_hold() -> None:
    assert in_flight([_beat(0, 3), _beat(0, 5), _beat(0, -1)]) == 8
    assert in_flight([]) == 0


def test_a_heartbeat_is_live_until_the_missed_intervals_pass() -> None:
    assert alive(_beat(100.0, 0), now=105.9, missed_heartbeats=3)
    assert not alive(_beat(100.0, 0), now=106.0, missed_heartbeats=3)
