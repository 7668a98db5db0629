"""Scheduled publication against a real Redis: one message per scheduled time, however many callers."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import redis

from sluiceway import codec, schedule
from sluiceway.connection import client as make_client
from sluiceway.contract import Keys

pytestmark = pytest.mark.redis

KEYS = Keys("team-a", "reports")
FIRE = 1_717_218_000  # 2024-06-01T05:00:00Z


def wall(fire: int) -> str:
    return dt.datetime.fromtimestamp(fire, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def publish(c: redis.Redis, fire: int = FIRE, schedule_name: str = "nightly") -> bool:
    return schedule.publish_once(
        c,
        KEYS,
        taskqueue="reports",
        schedule=schedule_name,
        wall=wall(fire),
        fire_epoch=fire,
        message={"n": 7},
        ttl_seconds=60,
    )


def test_concurrent_callers_for_one_time_publish_one_message(redis_url: str, r: redis.Redis) -> None:
    # Two operator processes (two clients, two connections) racing on the same scheduled time,
    # many rounds so the race is real.
    clients = [make_client(redis_url), make_client(redis_url)]
    for round_ in range(50):
        fire = FIRE + 60 * round_
        barrier = threading.Barrier(2)
        results: list[bool] = []

        def run(
            c: redis.Redis, fire: int = fire, barrier: threading.Barrier = barrier, out: list[bool] = results
        ) -> None:
            barrier.wait()
            out.append(publish(c, fire))

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]
    assert r.llen(KEYS.ready) == 50
    for c in clients:
        c.close()


def test_message_is_the_kwargs_with_traceable_metadata(r: redis.Redis) -> None:
    assert publish(r)
    assert not publish(r)  # a retry (restart, lost reply) is a no-op
    (raw,) = r.lrange(KEYS.ready, 0, -1)
    msg = codec.decode(raw)
    assert msg.kwargs == {"n": 7}
    assert msg.meta.published_at == FIRE
    assert msg.meta.trace == "schedule/nightly"
    assert msg.meta.id == schedule.fire_id("team-a", "reports", "nightly", wall(FIRE))
    assert msg.meta.id != schedule.fire_id("team-a", "reports", "nightly", wall(FIRE + 60))
    key = KEYS.schedule_fire("nightly", wall(FIRE))
    assert key == "sluiceway:{team-a/reports}:schedule:nightly:2024-06-01T05:00:00Z"
    assert 0 < r.ttl(key) <= 60


def test_another_time_or_schedule_publishes_again(r: redis.Redis) -> None:
    assert publish(r)
    assert publish(r, FIRE + 60)
    assert publish(r, FIRE, "hourly")
    assert r.llen(KEYS.ready) == 3
