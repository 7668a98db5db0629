"""The operator's backlog seam: the Redis source against a real Redis, and the pure view."""

from __future__ import annotations

import pytest
import redis

import sluiceway
from sluiceway import connection
from sluiceway.contract import Heartbeat, Keys
from sluiceway.transports.base import Outcomes
from sluiceway.transports.redis import RedisTransport
from sluiceway_operator.backlog import registry
from sluiceway_operator.backlog.base import Backlog
from sluiceway_operator.observe import view

KEYS = Keys("default", "jobs")


@pytest.mark.redis
def test_the_redis_source_reads_backlog_and_in_flight_and_purges(r: redis.Redis, redis_url: str) -> None:
    sluiceway.Publisher(redis_url).publish_batch("jobs", ({"n": i} for i in range(5)))
    transport = RedisTransport(connection.client(redis_url), KEYS, "gone-pod", lease_seconds=30)
    assert len(transport.begin_exchange(Outcomes(), 2).result().batch.deliveries) == 2
    source = registry.source("redis", namespace="default", queue="jobs", coordination=r, broker_url=redis_url)
    assert source.backlog() == Backlog(ready=3, delayed=0, in_flight=2, acked=0, dead=0)
    assert source.max_useful_replicas() is None
    assert source.orphaned_workers(known=set()) == ["gone-pod"]
    assert source.requeue_worker("gone-pod") == 2
    assert source.backlog().ready == 5 and source.backlog().in_flight == 0
    assert source.purge() > 0
    assert r.keys(KEYS.prefix + "*") == []


def test_an_unknown_broker_has_no_source() -> None:
    with pytest.raises(registry.SourceUnavailableError, match="must be one of"):
        registry.source("nats", namespace="a", queue="b", coordination=None, broker_url="")


def _beat(pod: str, in_flight: int, processed: int) -> Heartbeat:
    return Heartbeat(
        worker=pod, pod=pod, state="running", started=0.0, time=100.0, interval=2.0, concurrency=4,
        busy=1, in_flight=in_flight, processed=processed, failed=0, dead_lettered=0, rate=1.0,
        latency_p50=0.1, latency_p95=0.1, latency_p99=0.1, version="test",
    )  # fmt: skip


def test_without_a_broker_count_in_flight_comes_from_the_heartbeats() -> None:
    beats = [_beat("a", 3, 10), _beat("b", 2, 5)]
    v = view(Backlog(ready=7, delayed=1), beats, now=101.0, missed=3)
    assert (v.backlog, v.in_flight, v.acked) == (8, 5, 15)
    exact = view(Backlog(ready=7, in_flight=9, acked=40), beats, now=101.0, missed=3)
    assert (exact.in_flight, exact.acked) == (9, 40)
    assert v.heartbeat_times == {"a": 100.0, "b": 100.0}
