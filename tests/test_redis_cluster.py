"""The Redis transport, coordination, the rate limiter and the operator's Redis functions on a real
Redis Cluster of three masters (tests/support/redis_cluster.py), chosen by a ``redis+cluster://``
URL: every script of one queue runs on the node owning its slot, and a moved slot is followed."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from typing import Any, cast

import pytest
import redis

import sluiceway
from sluiceway import connection, fleet, schedule
from sluiceway.contract import Heartbeat, Keys
from sluiceway.coordination.redis import RedisCoordinator
from sluiceway.ratelimit.redis import RedisLimiter
from sluiceway.run import START_RETRY_EVENT
from sluiceway.transports.base import DeadLetter, Delivery, Exchanged, Outcomes, Retry
from sluiceway.transports.redis import AsyncRedisSink, RedisTransport
from sluiceway_operator.backlog.redis import RedisSource, due_delayed
from tests.support.redis_cluster import RedisClusterServer
from tests.support.workers import SpawnWorker, wait_for

pytestmark = pytest.mark.redis

KEYS = Keys("default", "jobs")


def transport(url: str, worker: str = "w1", **kwargs: Any) -> RedisTransport:
    return RedisTransport(connection.client(url), KEYS, worker, lease_seconds=30, **kwargs)


def publish(url: str, n: int) -> None:
    pub = sluiceway.Publisher(url)
    pub.publish_batch("jobs", ({"n": i} for i in range(n)))
    pub.close()


def holding(url: str, published: int, take: int) -> tuple[RedisTransport, list[Delivery]]:
    """A transport on ``url`` holding ``take`` of ``published`` fresh messages."""
    publish(url, published)
    t = transport(url)
    return t, t.begin_exchange(Outcomes(), take).result().batch.deliveries


def other_master(redis_cluster: RedisClusterServer, t: RedisTransport) -> tuple[int, int]:
    """The slot of the queue's keys and the port of a master that does not own it now."""
    slot = t.client.keyslot(KEYS.ready)
    before = redis_cluster.owner(slot)
    return slot, next(p for p in redis_cluster.ports if p != before)


def assert_clean(result: Exchanged, took: int) -> None:
    """Every outcome was settled (none gone, no error) and ``took`` new deliveries came."""
    assert (result.gone, result.settle_error) == (0, "")
    assert len(result.batch.deliveries) == took


def acked_in_flight_ready(t: RedisTransport) -> tuple[int, int, int]:
    stats = fleet.queue_stats(t.client, KEYS)
    return stats.acked, stats.in_flight, stats.ready


def n_of(payload: bytes) -> int:
    return int(json.loads(payload)["n"])


def _record(payload: bytes) -> bytes:
    return json.dumps({"reason": "test", "payload": payload.decode()}).encode()


def test_a_cluster_url_selects_redis_cluster_and_a_plain_url_does_not(redis_cluster_url: str) -> None:
    assert connection.is_cluster(connection.client(redis_cluster_url))
    assert not connection.is_cluster(connection.client("redis://127.0.0.1:1/0"))
    with pytest.raises(ValueError, match="only database 0"):
        connection.client(redis_cluster_url + "/2")
    # The cluster client connects as it is made; nothing listening is an outage like any other.
    with pytest.raises(redis.ConnectionError, match="Redis Cluster"):
        connection.client("redis+cluster://127.0.0.1:1")


def test_messages_settle_and_reap_on_the_node_of_their_slot(
    redis_cluster: RedisClusterServer, redis_cluster_url: str
) -> None:
    publish(redis_cluster_url, 20)
    client = connection.client(redis_cluster_url)
    owner = redis_cluster.owner(client.keyslot(KEYS.ready))
    # Every key of the queue lives on that one node, so no script could have spanned two.
    on_owner = {k.decode() for k in redis.Redis(port=owner).keys("sluiceway:*")}
    assert KEYS.ready in on_owner

    t = transport(redis_cluster_url)
    batch = t.begin_exchange(Outcomes(), 8).result().batch
    assert len(batch.deliveries) == 8
    d = batch.deliveries
    settled = t.begin_exchange(
        Outcomes(
            acks=[d[0].token, d[1].token],
            retries=[Retry(d[2].token, d[2].payload, 0.0)],
            deads=[DeadLetter(d[3].token, _record(d[3].payload), "test")],
        ),
        0,
    ).result()
    assert (settled.settle_error, settled.gone) == ("", 0)
    assert t.renew([x.token for x in d[4:]]) == 4
    assert t.give_back([d[4].token], None, 0) == 1

    stats = fleet.queue_stats(client, KEYS)
    assert (stats.acked, stats.dead, stats.in_flight, stats.ready + stats.delayed) == (2, 1, 3, 14)

    # A second worker adopts nothing of w1's; the operator requeues w1's leases once it is gone.
    assert fleet.orphaned_workers(client, KEYS, known=set()) == ["w1"]
    assert fleet.requeue_worker(client, KEYS, "w1") == 3
    assert fleet.replay_dead_letters(client, KEYS, 10) == 1
    rest = transport(redis_cluster_url, "w2")
    seen: list[int] = []
    while got := rest.begin_exchange(Outcomes(), 50).result().batch.deliveries:
        seen += [n_of(x.payload) for x in got]
        rest.begin_exchange(Outcomes(acks=[x.token for x in got]), 0).result()
    assert sorted(seen) == sorted(set(range(20)) - {0, 1})
    assert fleet.queue_stats(client, KEYS).in_flight == 0

    source = RedisSource(client, KEYS)
    backlog = source.backlog()
    assert (backlog.ready, backlog.in_flight, backlog.acked) == (0, 0, 20)
    assert source.purge() > 0
    assert all(not redis.Redis(port=p).keys("sluiceway:*") for p in redis_cluster.ports)


def test_expired_leases_are_reaped_for_every_holder(redis_cluster_url: str) -> None:
    publish(redis_cluster_url, 6)
    a, b = transport(redis_cluster_url, "a"), transport(redis_cluster_url, "b")
    a.lease_ms = b.lease_ms = 1
    assert len(a.begin_exchange(Outcomes(), 3).result().batch.deliveries) == 3
    assert len(b.begin_exchange(Outcomes(), 3).result().batch.deliveries) == 3
    time.sleep(0.01)  # the leases were 1 ms long; this is the time passing, not a wait for a state
    assert a.recover() == 6
    stats = fleet.queue_stats(a.client, KEYS)
    assert (stats.ready, stats.in_flight, stats.reaped) == (6, 0, 6)


def test_scripts_the_nodes_lost_run_exactly_once(
    redis_cluster: RedisClusterServer, redis_cluster_url: str
) -> None:
    t, held = holding(redis_cluster_url, 10, 5)
    for port in redis_cluster.ports:
        redis.Redis(port=port).script_flush()  # what a restart of the nodes does
    assert_clean(t.begin_exchange(Outcomes(acks=[d.token for d in held[:2]]), 2).result(), 2)
    assert acked_in_flight_ready(t) == (2, 5, 3)


def test_a_moved_slot_is_followed_and_the_next_exchange_goes_to_its_new_node(
    redis_cluster: RedisClusterServer, redis_cluster_url: str
) -> None:
    t, held = holding(redis_cluster_url, 10, 4)
    slot, target = other_master(redis_cluster, t)
    redis_cluster.move_slot(slot, target)  # t's client still has the old slot map

    result = t.begin_exchange(Outcomes(acks=[d.token for d in held]), 3).result()
    assert_clean(result, 3)
    cluster: Any = t.client
    assert cluster.get_node_from_key(KEYS.ready).port == target, "the MOVED reply refreshed the map"
    nxt = t.begin_exchange(Outcomes(acks=[d.token for d in result.batch.deliveries]), 10).result()
    assert len(nxt.batch.deliveries) == 3
    assert acked_in_flight_ready(t) == (7, 3, 0)


def test_the_rate_limiter_and_coordination_run_on_a_cluster(redis_cluster_url: str) -> None:
    client = connection.client(redis_cluster_url)
    limiter = RedisLimiter(client, KEYS.ratelimit, qps=10, horizon_seconds=1.0)
    began = time.monotonic()
    slots = limiter.acquire(20)
    assert slots.count == 11  # now, and one every 100 ms up to the 1-s horizon
    assert limiter.release(slots.lease, 5)
    again = limiter.acquire(20).count
    # The 5 given back, plus one slot per 100 ms that passed since the first grant (a loaded
    # machine can take that long between two round trips).
    accrued = int((time.monotonic() - began) / 0.1)
    assert 5 <= again <= 5 + accrued + 1, (again, accrued)  # +1: a slot on the window's edge

    coordinator = RedisCoordinator(client, KEYS, "w1")
    beat = cast(Heartbeat, {"worker": "w1", "in_flight": 2})
    coordinator.write_heartbeat(beat, ttl_seconds=10)
    assert fleet.heartbeats(client, KEYS) == [beat]
    coordinator.deregister()
    assert fleet.heartbeats(client, KEYS) == []


def test_a_schedule_publishes_once_and_delayed_messages_are_counted(redis_cluster_url: str) -> None:
    client = connection.client(redis_cluster_url)
    once: dict[str, Any] = {"taskqueue": "tq", "schedule": "s", "wall": "2026-12-02T03:00", "fire_epoch": 0}
    assert schedule.publish_once(client, KEYS, message={"n": 1}, ttl_seconds=60, **once)
    assert not schedule.publish_once(client, KEYS, message={"n": 1}, ttl_seconds=60, **once)
    assert client.llen(KEYS.ready) == 1

    async def publish_later() -> None:
        sink = AsyncRedisSink(redis_cluster_url)
        await sink.send(KEYS.namespace, KEYS.queue, [b'{"n":2}', b'{"n":3}'], delay=0.5)
        await sink.send(KEYS.namespace, KEYS.queue, [b'{"n":4}', b'{"n":5}'])
        await sink.aclose()

    asyncio.run(publish_later())
    assert due_delayed(client, KEYS, delayed=2, lead=5.0) == 2
    assert client.llen(KEYS.ready) == 3


def test_calls_return_their_results_through_a_cluster(
    redis_cluster_url: str, spawn_worker: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reply keys carry no hash tag: each is written by plain commands and spread over the nodes;
    # the notification is a cluster-wide PUBLISH, heard on whichever node the caller subscribed.
    # The URL is passed: the SDK keeps one publisher per URL, and an earlier test's may be cached
    # for the environment's default.
    monkeypatch.delenv("SLUICEWAY_BROKER", raising=False)
    spawn_worker(
        "-f",
        "tests.support.call_tasks:echo",
        "-q",
        "echo",
        "--heartbeat",
        "0.5",
        "--lease",
        "3",
        SLUICEWAY_REDIS_URL=redis_cluster_url,
    )
    assert sluiceway.call("echo", {"value": {"a": 1}}, timeout=30, url=redis_cluster_url) == {"a": 1}

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(
                sluiceway.call_async("echo", {"value": i}, timeout=30, url=redis_cluster_url)
                for i in range(50)
            )
        )

    assert asyncio.run(many()) == list(range(50))


def test_a_worker_whose_cluster_is_unreachable_at_start_waits_naming_it(spawn_worker: SpawnWorker) -> None:
    # RedisCluster reads the slot map as it is made, so the start is where an outage shows; it is
    # waited out like any other (sluiceway/run.py), and a stop signal meanwhile exits cleanly.
    w = spawn_worker(
        "-f", "tests.support.call_tasks:echo", "-q", "echo", SLUICEWAY_REDIS_URL="redis+cluster://127.0.0.1:1"
    )
    wait_for(lambda: START_RETRY_EVENT in w.output(), 60, what="the worker's retry line")
    assert "Redis Cluster" in w.output()
    w.terminate()
    assert w.wait(60) == 0, w.output()


def test_a_restart_of_every_node_loses_no_lease_and_the_transport_reconnects(
    redis_cluster: RedisClusterServer, redis_cluster_url: str
) -> None:
    t, held = holding(redis_cluster_url, 10, 5)
    redis_cluster.restart()  # AOF with appendfsync always: every acknowledged write survives
    outcome: list[Any] = []

    def exchanged() -> bool:
        try:
            outcome.append(t.begin_exchange(Outcomes(acks=[d.token for d in held]), 10).result())
        except redis.RedisError:  # the worker backs off and tries again, as here
            return False
        return True

    wait_for(exchanged, 30, interval=0.1, what="an exchange after the restart")
    assert_clean(outcome[0], 5)
    assert acked_in_flight_ready(t) == (5, 5, 0)


def test_a_slot_in_migration_is_an_outage_until_it_ends_and_nothing_runs_twice(
    redis_cluster: RedisClusterServer, redis_cluster_url: str
) -> None:
    # While a slot migrates, the old owner answers ASK for keys it no longer has and the new one
    # TRYAGAIN for a script whose keys are not all there yet (Redis refuses multi-key commands
    # across a half-moved slot). The exchange runs nothing and raises, as for any outage; the
    # worker keeps its outcomes and sends them again once the migration ends.
    t, held = holding(redis_cluster_url, 6, 2)
    slot, target = other_master(redis_cluster, t)
    redis_cluster.move_slot(slot, target, finish=False)
    try:
        with pytest.raises(redis.RedisError):
            t.begin_exchange(Outcomes(acks=[d.token for d in held]), 2).result()
    finally:
        redis_cluster.finish_move(slot, target)
    assert_clean(t.begin_exchange(Outcomes(acks=[d.token for d in held]), 2).result(), 2)
    assert acked_in_flight_ready(t) == (2, 2, 2)


def test_the_cli_reads_stats_on_a_cluster(redis_cluster_url: str) -> None:
    publish(redis_cluster_url, 1)
    done = subprocess.run(
        [sys.executable, "-m", "sluiceway", "stats", "-q", "jobs", "--redis-url", redis_cluster_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert re.search(r"ready\s+1\b", done.stdout)


def test_round_trips_are_counted_on_every_node(redis_cluster_url: str) -> None:
    client = connection.client(redis_cluster_url)
    trips = connection.count_round_trips(client)
    publish(redis_cluster_url, 6)
    t = RedisTransport(client, KEYS, "w1", lease_seconds=30)
    # The first exchange opens the node's connection and loads the scripts: counted, as real.
    assert len(t.begin_exchange(Outcomes(), 3).result().batch.deliveries) == 3
    assert trips.count >= 1
    before = trips.count
    assert len(t.begin_exchange(Outcomes(), 3).result().batch.deliveries) == 3
    assert trips.count == before + 1  # settle and fetch: one request to the node of the slot
    cluster: Any = client
    home = cluster.get_node_from_key(KEYS.ready).name
    other = next(k for k in (f"k{i}" for i in range(100)) if cluster.get_node_from_key(k).name != home)
    client.set(other, 1)  # another master's connection counts too
    assert trips.count >= before + 2
