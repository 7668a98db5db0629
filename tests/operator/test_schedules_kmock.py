"""Schedules in the TaskQueue loop: the real APScheduler, a real Redis, a mock API server (kmock).

The catch-up policy (coalesce + misfire grace time) with real missed times, once per fire time,
a bad schedule marking only itself, and pause. ``e2e/test_schedules.py`` runs the same on the real
control plane with worker pods.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import kmock as km
import pytest
import redis

from sluiceway import codec
from sluiceway.contract import Keys
from sluiceway_operator.autoscaler import TaskQueueLoop
from sluiceway_operator.conditions import rfc3339
from sluiceway_operator.schedules import process_scheduler
from tests.operator.test_handlers_kmock import EVENTS, NS, STATUS, api, body, loop, requests

__all__ = ["api", "loop"]  # fixtures, imported for pytest

pytestmark = pytest.mark.redis
KEYS = Keys(NS, "jobs")


def with_status(raw: dict[str, Any], schedules: list[dict[str, Any]], generation: int = 2) -> dict[str, Any]:
    raw["metadata"]["generation"] = generation
    raw["metadata"]["creationTimestamp"] = rfc3339(time.time() - 86400)
    raw["status"] = {"schedules": schedules}
    return raw


async def eventually(check: Callable[[], Any], within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within} s")


def events(api: km.KubernetesEmulator, reason: str) -> list[Any]:
    return [e.data for e in requests(api, "POST", EVENTS) if e.data["reason"] == reason]


def last_status(api: km.KubernetesEmulator) -> dict[str, Any]:
    status: dict[str, Any] = requests(api, "PATCH", STATUS)[-1].data["status"]
    return status


async def test_after_downtime_only_the_latest_missed_time_is_published(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    now = dt.datetime.now(dt.UTC)
    latest = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=now.minute % 5)
    last = latest - dt.timedelta(minutes=40)  # 7 fires missed, the latest at most 5 min ago
    raw = with_status(
        body(schedules=[{"name": "s", "cron": "*/5 * * * *", "message": {"k": "v"}}]),
        [{"name": "s", "lastFireTime": rfc3339(last.timestamp())}],
    )
    await loop.safe_tick(raw)
    await eventually(lambda: r.llen(KEYS.ready) == 1)
    raw_msg = r.lindex(KEYS.ready, 0)
    assert raw_msg is not None
    msg = codec.decode(raw_msg)
    assert msg.kwargs == {"k": "v"} and msg.meta.published_at == latest.timestamp()
    (fired,) = await eventually(lambda: events(api, "ScheduleFired"))
    assert "skipped 7 missed" in fired["message"]
    await loop.safe_tick(raw)
    entry = last_status(api)["schedules"][0]
    assert entry["lastFireTime"] == rfc3339(latest.timestamp())
    assert entry["nextFireTime"] == rfc3339((latest + dt.timedelta(minutes=5)).timestamp())
    assert r.llen(KEYS.ready) == 1


async def test_a_missed_time_beyond_the_grace_time_is_not_published(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    due = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).replace(second=0, microsecond=0)
    raw = with_status(
        body(schedules=[{"name": "daily", "cron": f"{due.minute} {due.hour} * * *"}]),
        [{"name": "daily", "lastFireTime": rfc3339((due - dt.timedelta(days=1)).timestamp())}],
    )
    await loop.safe_tick(raw)
    (missed,) = await eventually(lambda: events(api, "ScheduleMissed"))
    assert missed["type"] == "Warning" and "1 scheduled time(s) missed" in missed["message"]
    assert r.llen(KEYS.ready) == 0
    await loop.safe_tick(raw)
    entry = last_status(api)["schedules"][0]
    assert entry["nextFireTime"] == rfc3339((due + dt.timedelta(days=1)).timestamp())


async def test_an_interval_publishes_once_per_fire_time(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    start = rfc3339(time.time() - 10)
    raw = body(schedules=[{"name": "every", "interval": {"seconds": 1, "start": start}, "message": {}}])
    await loop.safe_tick(raw)
    await eventually(lambda: r.llen(KEYS.ready) >= 3)
    loop.schedules.close()  # as the loop's end does: no job outlives it
    assert process_scheduler().get_jobs() == []
    stamps = [codec.decode(m).meta.published_at for m in r.lrange(KEYS.ready, 0, -1)]
    assert len(stamps) == len(set(stamps)) and all(s is not None and s.is_integer() for s in stamps)
    dedupe = list(r.scan_iter(match=KEYS.prefix + "schedule:every:*"))
    assert len(dedupe) == len(stamps)


async def test_a_bad_schedule_marks_only_itself_and_the_taskqueue_is_degraded(
    api: km.KubernetesEmulator, loop: TaskQueueLoop
) -> None:
    raw = body(
        schedules=[
            {"name": "good", "cron": "0 3 * * *"},
            {"name": "mars", "cron": "0 3 * * *", "timeZone": "Mars/Phobos"},
            {"name": "range", "cron": "61 25 * * *"},
            {"name": "feb", "cron": "0 0 30 2 *"},
        ]
    )
    await loop.safe_tick(raw)
    status = last_status(api)
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["reason"] != "InvalidSpec"  # the TaskQueue itself runs
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["reason"] == "ScheduleFailed"
    entries = {e["name"]: e for e in status["schedules"]}
    assert "lastError" not in entries["good"] and "nextFireTime" in entries["good"]
    assert entries["mars"]["lastError"].startswith("spec.schedules[1].timeZone: unknown time zone")
    assert entries["range"]["lastError"].startswith("spec.schedules[2].cron: minute '61'")
    assert "never fires" in entries["feb"]["lastError"]
    assert len(events(api, "ScheduleFailed")) == 3
    await loop.safe_tick(raw)
    assert len(events(api, "ScheduleFailed")) == 3  # one Event per fault, not per tick
    assert [j.id for j in process_scheduler().get_jobs()] == [f"{NS}/jobs/good"]


async def test_paused_scales_to_zero_and_stops_the_schedules(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    r.lpush(KEYS.ready, *[b'{"n":1}'] * 50)
    schedules = [{"name": "every", "interval": {"seconds": 1}}]
    await loop.safe_tick(body(schedules=schedules, paused=True))
    status = last_status(api)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Paused" and status["desiredReplicas"] == 0
    assert process_scheduler().get_jobs() == []
    assert "nextFireTime" in status["schedules"][0]
    assert r.llen(KEYS.ready) == 50  # nothing consumed, nothing deleted
    await loop.safe_tick(body(schedules=schedules, paused=False))
    assert last_status(api)["desiredReplicas"] > 0
    assert [j.id for j in process_scheduler().get_jobs()] == [f"{NS}/jobs/every"]


async def test_a_failed_publication_is_reported_then_heals(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    raw = body(schedules=[{"name": "every", "interval": {"seconds": 1}, "message": {}}])
    await loop.safe_tick(raw)
    good = loop.schedules.client
    loop.schedules.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    state = loop.schedules.states["every"]
    # Retried until the next fire time, then given up on, and shown on the schedule.
    await eventually(lambda: state.problem and "publish of" in state.problem)
    failed = (await eventually(lambda: events(api, "ScheduleFailed")))[0]
    assert "connection refused" in failed["message"]  # a class of failure, never the host (faults.py)
    loop.schedules.client = good
    await eventually(lambda: state.problem is None and r.llen(KEYS.ready) >= 1)
    await loop.safe_tick(raw)
    assert "lastError" not in last_status(api)["schedules"][0]
