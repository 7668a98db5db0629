"""``spec.paused`` on the real control plane: the fleet goes to zero, messages stay queued, the
schedules stop, the status says Paused; unpausing finishes every message, with nothing lost."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway import codec
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from support import MaxReplicas, Operator, cond, get_dep, get_tq, taskqueue, until

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(300)]

MESSAGES = 40


def pods(c: LocalCluster, ns: str, name: str) -> list[str]:
    found = c.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=sluiceway.dev/taskqueue={name}")["items"]
    return [p["metadata"]["name"] for p in found]


def paused(c: LocalCluster, ns: str, value: bool) -> None:
    patch = json.dumps({"spec": {"paused": value}})
    c.kubectl("patch", "taskqueue", "hold", "-n", ns, "--type=merge", "-p", patch, check=True)


def fire_walls(r: redis.Redis, ns: str) -> set[str]:
    pattern = f"sluiceway:{{{ns}/hold}}:schedule:every:*"
    return {k.decode().rsplit(":every:", 1)[1] for k in r.scan_iter(match=pattern)}


def test_pause_stops_consumption_and_schedules_and_resume_loses_nothing(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    keys = Keys(ns, "hold")
    spec = taskqueue(
        "hold",
        redis_url,
        scaling={"maxReplicas": 2},
        schedules=[{"name": "every", "interval": {"seconds": 2}, "message": {"n": 1000}}],
    )
    # As JSON: kubectl reads YAML 1.1, where an unquoted key `n` would become the boolean false.
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(spec), check=True)
    until(operator, lambda: get_dep(c, ns, "hold"), 30, "the worker Deployment")
    Publisher(redis_url).publish_batch(f"{ns}/hold", ({"n": i, "sleep": 1.0} for i in range(MESSAGES)))
    until(operator, lambda: r.hlen("test:done") >= 4, 60, "the first messages done")

    paused(c, ns, True)
    sampler = MaxReplicas(c, ns, "hold")
    until(
        operator,
        lambda: (get_dep(c, ns, "hold") or {}).get("spec", {}).get("replicas") == 0,
        30,
        "zero replicas",
    )
    until(operator, lambda: not pods(c, ns, "hold"), 60, "the worker pods gone")
    tq = until(
        operator,
        lambda: (t := get_tq(c, ns, "hold")) and cond(t, "Ready").get("reason") == "Paused" and t,
        30,
        "Ready says Paused",
    )
    assert tq["status"]["lastScale"]["reason"] == "Paused"
    assert cond(tq, "Degraded").get("status") != "True", cond(tq, "Degraded")

    # The drain finished running tasks and handed the rest back: every message is done or queued.
    def done() -> set[int]:
        return {int(k) for k in r.hkeys("test:done")} - {1000}

    def queued() -> set[int]:
        # The ready list also holds the interval's own messages (n=1000) from before the pause.
        return {int(codec.decode(m).kwargs["n"]) for m in r.lrange(keys.ready, 0, -1)} - {1000}

    # (A lease held at SIGTERM returns through the pod's deletion; wait for it, do not race it.)
    def where() -> str:
        missing = set(range(MESSAGES)) - done() - queued()
        held = {k.decode(): r.zcard(k) for k in r.scan_iter(match=keys.prefix + "inflight:*")}
        return f"missing {sorted(missing)}; delayed {r.zcard(keys.delayed)}; leases {held}"

    # A lease whose hand-back missed the drain comes back with the pod's deletion, at the latest at
    # its expiry (leaseSeconds 60 in these tests): wait that long, never longer.
    try:
        until(operator, lambda: done() | queued() == set(range(MESSAGES)), 90, "every message done or queued")
    except AssertionError as exc:
        raise AssertionError(f"{where()}\n{exc}") from None
    assert queued()
    assert r.llen(keys.dead) == 0

    # While paused, the interval publishes nothing: wait past two of its periods, as the status
    # promised them, and look.
    walls = fire_walls(r, ns)
    upcoming = dt.datetime.fromisoformat(
        next(s for s in tq["status"]["schedules"] if s["name"] == "every")["nextFireTime"].replace(
            "Z", "+00:00"
        )
    )
    until(
        operator,
        lambda: dt.datetime.now(dt.UTC) > upcoming + dt.timedelta(seconds=4),
        30,
        "two interval periods while paused",
    )
    assert fire_walls(r, ns) == walls
    assert int((get_dep(c, ns, "hold") or {})["spec"]["replicas"]) == 0
    assert not pods(c, ns, "hold")
    assert done() | queued() == set(range(MESSAGES))
    resumed_at = dt.datetime.now(dt.UTC)

    paused(c, ns, False)
    until(
        operator,
        lambda: len(done()) == MESSAGES,
        120,
        "every message done after resuming",
    )
    assert r.llen(keys.dead) == 0
    until(operator, lambda: fire_walls(r, ns) - walls, 30, "the interval publishing again")
    new = sorted(fire_walls(r, ns) - walls)
    # Times that passed while paused are not published later.
    firsts = [dt.datetime.strptime(w, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC) for w in new]
    assert min(firsts) >= resumed_at - dt.timedelta(seconds=2), (new, resumed_at)
    assert max(sampler.stop()) > 0  # the fleet came back
    until(
        operator,
        lambda: cond(get_tq(c, ns, "hold"), "Ready").get("reason") != "Paused",
        30,
        "Ready no longer Paused",
    )
