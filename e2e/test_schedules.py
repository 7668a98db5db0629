"""TaskQueue schedules against the real local control plane, a real Redis and real worker processes.

One TaskQueue with an every-minute cron schedule, a suspended one, a 5-second interval and a date.
The test waits for a real minute boundary (no test clock in the operator), then checks: one message
per fire time, the status times, the Events, that the fleet woke from zero to run them, and that a
restarted operator publishes no fire time twice. Admission rejects bad schedules naming the field;
a stored object that predates those rules marks only its bad schedules and reads Degraded.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml

from localcluster.cluster import LocalCluster
from sluiceway.contract import Keys
from support import (
    CRD,
    MaxReplicas,
    Operator,
    cond,
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


def dedupe_walls(r: redis.Redis, ns: str, schedule: str) -> list[str]:
    pattern = f"sluiceway:{{{ns}/clock}}:schedule:{schedule}:*"
    return sorted(k.decode().rsplit(f":{schedule}:", 1)[1] for k in r.scan_iter(match=pattern))


def test_cron_interval_and_date_schedules_publish_once_per_fire_time_across_a_restart(
    kube_cluster: LocalCluster, setup: tuple[Any, ...], redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    kubeconfig, op_ns, log, holder = setup
    op: Operator = holder[0]
    ns = c.fresh_namespace("sched")
    redis_secret(c, ns, redis_url)
    at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=20)
    schedules = [
        {"name": "tick", "cron": "* * * * *", "message": {"n": 1}},
        {"name": "paused", "cron": "* * * * *", "message": {"n": 2}, "suspend": True},
        {"name": "every", "interval": {"seconds": 5}, "message": {"n": 3}},
        {"name": "once", "at": at.isoformat().replace("+00:00", "Z"), "message": {"n": 4}},
    ]
    # As JSON: kubectl reads YAML 1.1, where an unquoted key `n` would become the boolean false.
    body = json.dumps(taskqueue("clock", redis_url, schedules=schedules))
    c.kubectl("apply", "-n", ns, "-f", "-", input=body, check=True)
    sampler = MaxReplicas(c, ns, "clock")
    created = parse(get_tq(c, ns, "clock")["metadata"]["creationTimestamp"])

    # Before the first fire: next times shown, nothing from the suspended schedule.
    tq = until(
        op,
        lambda: (t := get_tq(c, ns, "clock")) and "nextFireTime" in schedule_status(t, "paused") and t,
        30,
        "status.schedules",
    )
    assert "lastFireTime" not in schedule_status(tq, "paused")
    assert cond(tq, "Degraded").get("status") != "True", cond(tq, "Degraded")

    # The first minute boundary after creation fires (at most 60 s away, plus a tick).
    tq = until(
        op,
        lambda: (t := get_tq(c, ns, "clock")) and schedule_status(t, "tick").get("lastFireTime") and t,
        75,
        "the first cron fire",
    )
    fired = schedule_status(tq, "tick")
    last, nxt = parse(fired["lastFireTime"]), parse(fired["nextFireTime"])
    assert last.second == 0 and nxt - last == dt.timedelta(minutes=1)
    assert "lastError" not in fired

    # The fleet woke from zero and ran the messages; the date fired once.
    keys = Keys(ns, "clock")
    try:
        until(op, lambda: r.hget("test:done", "1") and r.hget("test:done", "4"), 60, "the messages processed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndead letters: {r.lrange(keys.dead, 0, -1)}") from None
    assert max(sampler.seen) >= 1, sampler.seen
    assert dedupe_walls(r, ns, "tick")[0] == last.strftime("%Y-%m-%dT%H:%M:%S")  # the UTC wall time
    assert dedupe_walls(r, ns, "once") == [at.strftime("%Y-%m-%dT%H:%M:%SZ")]
    assert r.hget("test:seen", "2") is None  # suspended: never published
    events = c.get(f"/api/v1/namespaces/{ns}/events")["items"]
    ours = [e for e in events if e["involvedObject"]["name"] == "clock"]
    assert any(e["reason"] == "ScheduleFired" and e["type"] == "Normal" for e in ours), ours

    # A restarted operator resumes from status: it publishes no fire time twice.
    before = set(dedupe_walls(r, ns, "every"))
    op.stop()
    holder[0] = op = start_operator(kubeconfig, op_ns, log)
    until(op, lambda: healthy(op), 30, "the operator restarted")
    until(op, lambda: set(dedupe_walls(r, ns, "every")) - before, 30, "an interval fire after the restart")

    def runs(n: int) -> int:
        return int(r.hget("test:seen", str(n)) or 0)

    def settled() -> bool:
        # Every run corresponds to one recorded fire (a run of the latest fire may be under way).
        return all(
            runs(n) == len(dedupe_walls(r, ns, name)) == int(r.hget("test:done", str(n)) or 0)
            for n, name in ((1, "tick"), (3, "every"), (4, "once"))
        )

    until(op, settled, 60, "one run per fire time")
    assert runs(4) == 1
    # The interval's fire times keep the phase of the TaskQueue's creation, before and after the restart.
    walls = [
        dt.datetime.strptime(w, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        for w in dedupe_walls(r, ns, "every")
    ]
    assert len(walls) >= 2
    assert all((w - created).total_seconds() % 5 == 0 for w in walls), walls
    c.kubectl("delete", "taskqueue", "clock", "-n", ns, "--wait=false")
    sampler.stop()


LEGACY_RULES = ("getHours", "(?i)^")  # the CEL rules this change added to timeZone and cron


def legacy_crd() -> dict[str, Any]:
    """The CRD as it was before admission checked cron ranges and zones: objects stored then can
    still hold what admission now rejects."""
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    item = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["schedules"]["items"]
    for prop in ("cron", "timeZone"):
        node = item["properties"][prop]
        node["x-kubernetes-validations"] = [
            v for v in node["x-kubernetes-validations"] if not any(m in v["rule"] for m in LEGACY_RULES)
        ]
    return dict(crd)


def test_bad_schedules_in_a_stored_object_mark_only_themselves_and_degrade(
    kube_cluster: LocalCluster, setup: tuple[Any, ...], redis_url: str
) -> None:
    c = kube_cluster
    _, _, _, holder = setup
    op: Operator = holder[0]
    ns = c.fresh_namespace("legacy")
    redis_secret(c, ns, redis_url)
    schedules = [
        {"name": "good", "cron": "0 3 * * *"},
        {"name": "mars", "cron": "0 3 * * *", "timeZone": "Mars/Phobos"},
        {"name": "range", "cron": "61 25 * * *"},
        {"name": "feb", "cron": "0 0 30 2 *"},
    ]
    body = json.dumps(taskqueue("old", redis_url, schedules=schedules))
    c.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(legacy_crd()), check=True
    )
    try:
        until(
            op,
            lambda: c.kubectl("apply", "-n", ns, "-f", "-", input=body).returncode == 0,
            30,
            "the object admitted by the old CRD",
        )
    finally:
        install_crd(c)
    # Admission now rejects the same object, naming the field.
    again = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=body.replace('"old"', '"new"'))
    assert again.returncode != 0 and "spec.schedules[1].timeZone" in again.stderr, again.stderr

    tq = until(
        op,
        lambda: (t := get_tq(c, ns, "old")) and len(t.get("status", {}).get("schedules", [])) == 4 and t,
        30,
        "status.schedules",
    )
    assert cond(tq, "Ready").get("reason") != "InvalidSpec", cond(tq, "Ready")
    degraded = cond(tq, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ScheduleFailed", degraded
    for name in ("mars", "range", "feb"):
        assert name in degraded["message"]
    assert "timeZone" in schedule_status(tq, "mars")["lastError"]
    assert "cron" in schedule_status(tq, "range")["lastError"]
    assert "never fires" in schedule_status(tq, "feb")["lastError"]
    good = schedule_status(tq, "good")
    assert "lastError" not in good and "nextFireTime" in good
    events = c.get(f"/api/v1/namespaces/{ns}/events")["items"]
    failed = [e for e in events if e["involvedObject"]["name"] == "old" and e["reason"] == "ScheduleFailed"]
    assert len(failed) == 3 and all(e["type"] == "Warning" for e in failed), failed
    # The stored object still takes writes under the new CRD: a user's label, and every status
    # write the operator made (its status loop has run many times by now).
    labelled = c.kubectl("label", "taskqueue", "old", "-n", ns, "team=a")
    assert labelled.returncode == 0, labelled.stderr
    refused = [
        ln
        for ln in op.log.read_text(errors="replace").splitlines()
        if "status not written" in ln and ns in ln
    ]
    assert not refused, refused[:3]
    c.kubectl("delete", "taskqueue", "old", "-n", ns, "--wait=false")


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
