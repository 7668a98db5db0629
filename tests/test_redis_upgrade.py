"""Upgrading to the cluster-ready scripts loses nothing: state written under the literal key names
of earlier versions (not built through ``Keys``, so a rename would fail here) is served as it is,
on one server and on a Redis Cluster."""

from __future__ import annotations

import json

import pytest

from sluiceway import connection, fleet, schedule
from sluiceway.contract import Keys
from sluiceway.transports.base import Outcomes
from sluiceway.transports.redis import RedisTransport

pytestmark = pytest.mark.redis

OLD = "sluiceway:{default/jobs}:"  # the prefix every earlier version wrote


@pytest.fixture(params=["redis", "redis-cluster"])
def url(request: pytest.FixtureRequest) -> str:
    name = "redis_url" if request.param == "redis" else "redis_cluster_url"
    return str(request.getfixturevalue(name))


def test_state_under_the_earlier_names_is_served_after_the_upgrade(url: str) -> None:
    client = connection.client(url)
    client.lpush(OLD + "queue", b'{"n":1}')
    client.zadd(OLD + "inflight:old-pod", {b'7:{"n":2}': 0})  # an expired lease of an old worker
    client.sadd(OLD + "leased-workers", "old-pod")
    client.lpush(OLD + "dlq", json.dumps({"reason": "error", "payload": '{"n":3}'}))
    client.set(OLD + "schedule:nightly:2026-12-01T00:00", "1", ex=600)

    keys = Keys("default", "jobs")
    t = RedisTransport(client, keys, "new-pod", lease_seconds=30)
    assert t.recover() == 1, "the old worker's expired lease goes back to the queue"
    assert fleet.replay_dead_letters(client, keys, 10) == 1
    got = t.begin_exchange(Outcomes(), 10).result().batch.deliveries
    assert sorted(json.loads(d.payload)["n"] for d in got) == [1, 2, 3]
    assert not schedule.publish_once(
        client,
        keys,
        taskqueue="jobs",
        schedule="nightly",
        wall="2026-12-01T00:00",
        fire_epoch=0,
        message={},
        ttl_seconds=600,
    ), "a scheduled time recorded before the upgrade is not published again"
