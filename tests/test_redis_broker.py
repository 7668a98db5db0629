"""The Redis transport's round trip against a real Redis: sent now, read later, exact on failures."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pytest
import redis

import sluiceway
from sluiceway import connection, fleet
from sluiceway.contract import Keys
from sluiceway.transports.base import Outcomes
from sluiceway.transports.redis import RedisTransport
from tests.support.workers import wait_for

pytestmark = pytest.mark.redis

KEYS = Keys("default", "jobs")


def broker(url: str, worker: str = "w1") -> RedisTransport:
    return RedisTransport(connection.client(url), KEYS, worker, lease_seconds=30)


def acks(tokens: Sequence[Hashable]) -> Outcomes:
    return Outcomes(acks=list(tokens))


def publish(url: str, n: int) -> None:
    pub = sluiceway.Publisher(url)
    pub.publish_batch("jobs", ({"n": i} for i in range(n)))
    pub.close()


def test_one_round_trip_settles_then_leases_and_can_be_read_later(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 10)
    b = broker(redis_url)
    first = b.begin_exchange(Outcomes(), 4).result().batch
    assert len(first.deliveries) == 4
    tokens = [d.token for d in first.deliveries]
    assert b.begin_exchange(acks(tokens[:2]), 0).result().gone == 0
    assert fleet.queue_stats(r, KEYS).acked == 2
    pending = b.begin_exchange(acks(tokens[2:]), 3)
    # Redis runs it before the reply is read: the worker keeps working meanwhile.
    wait_for(lambda: fleet.queue_stats(r, KEYS).acked == 4, 5, what="the round trip in transit to run")
    result = pending.result()
    assert result.gone == 0
    second = result.batch
    assert len(second.deliveries) == 3
    assert r.zcard(KEYS.inflight("w1")) == 3
    assert {d.payload for d in first.deliveries}.isdisjoint(d.payload for d in second.deliveries)


def test_scripts_lost_by_redis_run_exactly_once_after_reloading(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 10)
    b = broker(redis_url)
    batch = b.begin_exchange(Outcomes(), 5).result().batch
    r.script_flush()  # what a Redis restart does to the script cache
    result = b.begin_exchange(acks([d.token for d in batch.deliveries[:2]]), 2).result()
    assert (result.gone, result.settle_error) == (0, "")
    assert len(result.batch.deliveries) == 2
    stats = fleet.queue_stats(r, KEYS)
    assert stats.acked == 2
    assert r.zcard(KEYS.inflight("w1")) == 5  # 5 leased - 2 acked + 2 leased
    assert stats.ready == 3


def test_a_failed_settle_keeps_the_fetched_batch_and_the_connection_in_step(
    r: redis.Redis, redis_url: str
) -> None:
    publish(redis_url, 3)
    b = broker(redis_url)
    batch = b.begin_exchange(Outcomes(), 1).result().batch
    r.delete(KEYS.stats)
    r.set(KEYS.stats, "not a hash")  # the ack script's HINCRBY now fails
    result = b.begin_exchange(acks([batch.deliveries[0].token]), 1).result()
    assert "WRONGTYPE" in result.settle_error
    assert len(result.batch.deliveries) == 1, "a failed settle must not drop what the fetch leased"
    r.delete(KEYS.stats)
    # Every reply of the pipeline was read, so the pooled connection answers in step, and
    # settling again is harmless.
    assert b.client.ping() is True
    again = b.begin_exchange(acks([batch.deliveries[0].token]), 5).result()
    assert again.settle_error == ""
    assert again.gone == 1  # the first try removed the lease before HINCRBY failed
    assert len(again.batch.deliveries) == 1


def test_a_failed_fetch_is_raised(r: redis.Redis, redis_url: str) -> None:
    r.set(KEYS.ready, "not a list")
    with pytest.raises(redis.ResponseError):
        broker(redis_url).begin_exchange(acks([]), 5).result()


def test_more_acks_than_lua_can_unpack_settle_in_one_round_trip(r: redis.Redis, redis_url: str) -> None:
    total = 9000  # Lua's unpack() stops near 8,000 values
    publish(redis_url, total)
    b = broker(redis_url)
    tokens: list[Hashable] = []
    while len(tokens) < total:
        tokens += [d.token for d in b.begin_exchange(Outcomes(), 256).result().batch.deliveries]
    result = b.begin_exchange(acks(tokens), 0).result()
    assert (result.gone, result.settle_error) == (0, "")
    assert r.zcard(KEYS.inflight("w1")) == 0
    assert fleet.queue_stats(r, KEYS).acked == total


def test_a_connection_lost_between_round_trips_is_replaced(r: redis.Redis, redis_url: str) -> None:
    publish(redis_url, 6)
    b = broker(redis_url)
    batch = b.begin_exchange(Outcomes(), 2).result().batch
    r.client_kill_filter(_type="normal", skipme=True)
    result = b.begin_exchange(acks([d.token for d in batch.deliveries]), 2).result()
    assert result.gone == 0
    assert len(result.batch.deliveries) == 2


def test_round_trips_on_a_connection_opened_before_counting_began_are_counted(redis_url: str) -> None:
    # A cluster client connects while it learns the slot map, before anyone can count; its
    # requests on that connection must count all the same (they did not, on the node that held
    # the queue's slot).
    client = connection.client(redis_url)
    client.ping()
    assert client.connection_pool._available_connections, "redis-py's pool internals moved"
    trips = connection.count_round_trips(client)
    client.ping()
    assert trips.count == 1


def test_round_trips_are_counted_where_every_request_passes(r: redis.Redis, redis_url: str) -> None:
    client = connection.client(redis_url)
    trips = connection.count_round_trips(client)
    client.ping()
    # Opening the connection took round trips too (CLIENT SETINFO): counted, as they are real.
    opened = trips.count - 1
    assert opened >= 0
    client.ping()
    assert trips.count == opened + 2
    pipe = client.pipeline(transaction=False)
    for i in range(50):
        pipe.set(f"k{i}", i)
    pipe.execute()
    assert trips.count == opened + 3  # fifty commands, one round trip
    b = RedisTransport(client, KEYS, "w1", lease_seconds=30)
    publish(redis_url, 3)
    r.script_flush()
    b.begin_exchange(Outcomes(), 3).result()
    # A script Redis does not know: the pipeline gets NOSCRIPT, then the rerun goes EVALSHA ->
    # NOSCRIPT, SCRIPT LOAD, EVALSHA. Counted at the connection, the count cannot miss one.
    assert trips.count == opened + 3 + 4
    b.begin_exchange(Outcomes(), 3).result()
    assert trips.count == opened + 3 + 4 + 1
