"""The Redis broker's round trip against a real Redis: sent now, read later, exact on failures."""

from __future__ import annotations

import pytest
import redis

import sluiceway
from sluiceway import connection, fleet
from sluiceway.brokers.redis import RedisBroker
from sluiceway.contract import Keys
from tests.support.workers import wait_for

pytestmark = pytest.mark.redis

KEYS = Keys("default", "jobs")


def broker(url: str, worker: str = "w1") -> RedisBroker:
    return RedisBroker(connection.client(url), KEYS, worker, lease_seconds=30)


def publish(url: str, n: int) -> None:
    pub = sluiceway.Publisher(url)
    pub.publish_batch("jobs", ({"n": i} for i in range(n)))
    pub.close()


def test_one_round_trip_settles_then_leases_and_can_be_read_later(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 10)
    b = broker(redis_url)
    _, first = b.begin_exchange([], [], [], 4).result()
    assert len(first.deliveries) == 4
    tokens = [d.token for d in first.deliveries]
    acked, _ = b.begin_exchange(tokens[:2], [], [], 0).result()
    assert acked == 2
    pending = b.begin_exchange(tokens[2:], [], [], 3)
    # Redis runs it before the reply is read: the worker keeps working meanwhile.
    wait_for(lambda: fleet.queue_stats(r, KEYS).acked == 4, 5, what="the round trip in transit to run")
    acked, second = pending.result()
    assert acked == 2
    assert len(second.deliveries) == 3
    assert r.zcard(KEYS.inflight("w1")) == 3
    assert {d.payload for d in first.deliveries}.isdisjoint(d.payload for d in second.deliveries)


def test_scripts_lost_by_redis_run_exactly_once_after_reloading(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 10)
    b = broker(redis_url)
    _, batch = b.begin_exchange([], [], [], 5).result()
    r.script_flush()  # what a Redis restart does to the script cache
    acked, more = b.begin_exchange([d.token for d in batch.deliveries[:2]], [], [], 2).result()
    assert acked == 2
    assert len(more.deliveries) == 2
    stats = fleet.queue_stats(r, KEYS)
    assert stats.acked == 2
    assert r.zcard(KEYS.inflight("w1")) == 5  # 5 leased - 2 acked + 2 leased
    assert stats.ready == 3


def test_an_error_reply_is_raised_and_the_connection_stays_in_step(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 3)
    b = broker(redis_url)
    _, batch = b.begin_exchange([], [], [], 1).result()
    r.delete(KEYS.stats)
    r.set(KEYS.stats, "not a hash")  # the ack script's HINCRBY now fails
    with pytest.raises(redis.ResponseError):
        b.begin_exchange([batch.deliveries[0].token], [], [], 1).result()
    r.delete(KEYS.stats)
    # Every reply of the failed pipeline was read, so the pooled connection answers in step.
    assert b.client.ping() is True
    _, again = b.begin_exchange([], [], [], 5).result()
    assert len(again.deliveries) >= 1


def test_a_connection_lost_between_round_trips_is_replaced(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 6)
    b = broker(redis_url)
    _, batch = b.begin_exchange([], [], [], 2).result()
    r.client_kill_filter(_type="normal", skipme=True)
    acked, more = b.begin_exchange([d.token for d in batch.deliveries], [], [], 2).result()
    assert acked == 2
    assert len(more.deliveries) == 2
