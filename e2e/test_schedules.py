"""TaskQueue schedules against the real local control plane, a real Redis and real worker processes.

One TaskQueue with an every-minute schedule, a suspended one and one in an unknown time zone. The
test waits for a real minute boundary (no test clock in the operator), then checks: one message per
scheduled time, the status times, the Events, that the fleet woke from zero to run it, and that a
restarted operator does not publish the same time again.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway.contract import Keys
from support import (
    MaxReplicas,
    Operator,
    get_tq,
    install_crd,
    install_operator_rbac,
    redis_secret,
    start_operator,
    taskqueue,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def setup(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    c = kube_cluster
    install_crd(c)
    ns = c.fresh_namespace("op-sched")
    kubeconfig = install_operator_rbac(c, ns)
    log = tmp_path_factory.mktemp("operator-schedules") / "operator.log"
    holder = [start_operator(kubeconfig, ns, log)]
    yield kubeconfig, ns, log, holder
    holder[0].stop()


def schedule_status(tq: dict[str, Any], name: str) -> dict[str, Any]:
    for s in tq.get("status", {}).get("schedules", []):
        if s["name"] == name:
            return dict(s)
    return {}


def healthy(op: Operator) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.http_port}/healthz", timeout=2) as resp:
        return bool(resp.status == 200)


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_every_minute_schedule_publishes_once_wakes_the_fleet_and_survives_a_restart(
    kube_cluster: LocalCluster, setup: tuple[Any, ...], redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    kubeconfig, op_ns, log, holder = setup
    op: Operator = holder[0]
    ns = c.fresh_namespace("sched")
    redis_secret(c, ns, redis_url)
    schedules = [
        {"name": "tick", "cron": "* * * * *", "message": {"n": 1}},
        {"name": "paused", "cron": "* * * * *", "message": {"n": 2}, "suspend": True},
        {"name": "nowhere", "cron": "0 3 * * *", "timeZone": "Mars/Olympus", "message": {"n": 3}},
    ]
    # As JSON: kubectl reads YAML 1.1, where an unquoted key `n` would become the boolean false.
    body = json.dumps(taskqueue("clock", redis_url, schedules=schedules))
    c.kubectl("apply", "-n", ns, "-f", "-", input=body, check=True)
    sampler = MaxReplicas(c, ns, "clock")

    # Before the first fire: next times shown, the bad zone reported, nothing published.
    tq = until(
        op,
        lambda: (t := get_tq(c, ns, "clock")) and schedule_status(t, "nowhere").get("lastError") and t,
        30,
        "status.schedules",
    )
    assert "Mars/Olympus" in schedule_status(tq, "nowhere")["lastError"]
    paused = schedule_status(tq, "paused")
    assert "nextFireTime" in paused and "lastFireTime" not in paused

    # The first minute boundary after creation fires (at most 60 s away, plus a tick).
    tq = until(
        op,
        lambda: (t := get_tq(c, ns, "clock")) and schedule_status(t, "tick").get("lastFireTime") and t,
        75,
        "the first fire",
    )
    fired = schedule_status(tq, "tick")
    last, nxt = parse(fired["lastFireTime"]), parse(fired["nextFireTime"])
    assert last.second == 0 and nxt - last == dt.timedelta(minutes=1)
    assert "lastError" not in fired

    # The fleet wakes from zero, runs the message, and it is the only one for that time.
    keys = Keys(ns, "clock")
    try:
        until(op, lambda: r.hget("test:done", "1"), 60, "the scheduled message processed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndead letters: {r.lrange(keys.dead, 0, -1)}") from None
    assert max(sampler.seen) >= 1, sampler.seen
    assert r.exists(keys.schedule_fire("tick", int(last.timestamp())))
    assert r.hget("test:seen", "2") is None  # suspended: never published
    events = c.get(f"/api/v1/namespaces/{ns}/events")["items"]
    ours = [e for e in events if e["involvedObject"]["name"] == "clock"]
    assert any(e["reason"] == "ScheduleFired" and e["type"] == "Normal" for e in ours), ours
    failed = [e for e in ours if e["reason"] == "ScheduleFailed"]
    assert len(failed) == 1 and failed[0]["type"] == "Warning" and "nowhere" in failed[0]["message"]

    # A restarted operator resumes from status: it does not publish the same time again.
    op.stop()
    holder[0] = op = start_operator(kubeconfig, op_ns, log)
    until(op, lambda: healthy(op), 30, "the operator restarted")
    time.sleep(4)  # a few ticks of the new process

    def fires_and_runs() -> tuple[int, int]:
        dedupe = len(list(r.scan_iter(match=f"sluiceway:{{{ns}/clock}}:schedule:tick:*")))
        return dedupe, int(r.hget("test:seen", "1") or 0)

    # Every message run corresponds to one recorded fire, before and after the restart (a run of
    # the next minute's fire may be under way; wait for it to finish).
    until(
        op,
        lambda: (fr := fires_and_runs())[0] == fr[1] and int(r.hget("test:done", "1") or 0) == fr[1],
        60,
        "one run per scheduled time",
    )
    dedupe, runs = fires_and_runs()
    assert runs == dedupe >= 1
    c.kubectl("delete", "taskqueue", "clock", "-n", ns, "--wait=false")
    sampler.stop()


@pytest.mark.parametrize(
    ("schedule", "field", "fragment"),
    [
        ({"cron": "61 25 * * *"}, "spec.schedules[0].cron", "minute 0-59"),
        ({"cron": "* * * *"}, "spec.schedules[0].cron", "5 fields"),
        ({"cron": "*/0 * * * *"}, "spec.schedules[0].cron", "at least 1"),
        ({"cron": "0 3 * * *", "timeZone": "Mars/Phobos"}, "spec.schedules[0].timeZone", "IANA database"),
        ({"cron": "0 3 * * *", "timeZone": "Local"}, "spec.schedules[0].timeZone", "IANA database"),
        ({"cron": "* * * * *", "interval": {"seconds": 5}}, "spec.schedules[0]", "exactly one"),
        ({}, "spec.schedules[0]", "exactly one"),
        ({"interval": {"seconds": 0}}, "spec.schedules[0].interval.seconds", ""),
        ({"at": "tomorrow"}, "spec.schedules[0].at", ""),
    ],
)
def test_admission_rejects_a_bad_schedule_naming_the_field(
    kube_cluster: LocalCluster, setup: tuple[Any, ...], schedule: dict[str, Any], field: str, fragment: str
) -> None:
    c = kube_cluster
    ns = c.fresh_namespace("admit")
    body = taskqueue("bad", "redis://unused:1/0", schedules=[{"name": "s", **schedule}])
    done = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(body))
    assert done.returncode != 0, f"admitted: {schedule}"
    assert field in done.stderr and fragment in done.stderr, done.stderr


def test_admission_accepts_what_the_scheduler_can_run(
    kube_cluster: LocalCluster, setup: tuple[Any, ...]
) -> None:
    c = kube_cluster
    ns = c.fresh_namespace("admit")
    schedules = [
        {"name": "a", "cron": "*/5 0-6,22-23 1,15 jan-jun MON-fri", "timeZone": "Europe/Berlin"},
        {"name": "b", "cron": "00 03 * * 7", "timeZone": "America/New_York"},
        {"name": "c", "interval": {"seconds": 30, "start": "2026-12-01T10:00:00+01:00"}},
        {"name": "d", "at": "2030-01-01T00:00:00Z"},
        # Admission cannot see these two; the operator marks only this schedule (test below).
        {"name": "e", "cron": "0 0 30 2 *"},
    ]
    body = taskqueue("good", "redis://unused:1/0", schedules=schedules, paused=True)
    done = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(body))
    assert done.returncode == 0, done.stderr
