"""Heartbeat liveness end to end: a pod that runs but never heartbeats is reported and replaced,
and a backlog with no live worker is an alarm that scales up at once."""

from __future__ import annotations

import time

import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway.publish import Publisher
from support import (
    Operator,
    cond,
    get_tq,
    taskqueue,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]


def pod_names(c: LocalCluster, ns: str) -> set[str]:
    pods = c.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=sluiceway.dev/taskqueue")["items"]
    return {p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")}


def test_a_pod_that_never_heartbeats_is_reported_and_replaced(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    c.apply(
        taskqueue(
            "silent",
            redis_url,
            function="tests.hangs_on_import:never",
            liveness={"heartbeatSeconds": 0.5, "leaseSeconds": 60, "replaceAfterSeconds": 4},
            scaling={"minReplicas": 1, "maxReplicas": 1},
        ),
        ns,
    )
    first = until(operator, lambda: next(iter(pod_names(c, ns)), None), 60, "the first worker pod")
    started = time.monotonic()
    degraded = until(
        operator,
        lambda: (d := cond(get_tq(c, ns, "silent"), "Degraded")).get("reason") == "SilentPods" and d,
        60,
        "Degraded=SilentPods on the TaskQueue",
    )
    assert first in degraded["message"]
    until(operator, lambda: first not in pod_names(c, ns) and pod_names(c, ns), 60, "a replacement pod")
    replaced_after = time.monotonic() - started
    print(f"\n[e2e figures] silent pod {first} replaced {replaced_after:.1f} s after it appeared (bound 4 s)")
    assert replaced_after >= 3, "a pod gets its start-up allowance before it counts as silent"
    assert b"replacing a pod that runs but does not heartbeat" in operator.log.read_bytes()


def test_backlog_with_no_live_worker_is_an_alarm_that_scales_up_at_once(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    # One pod runs but can never heartbeat (and is not replaced within the test).
    c.apply(
        taskqueue(
            "alarm",
            redis_url,
            function="tests.hangs_on_import:never",
            liveness={"heartbeatSeconds": 0.5, "leaseSeconds": 60, "replaceAfterSeconds": 600},
            scaling={"minReplicas": 1, "maxReplicas": 4},
        ),
        ns,
    )
    until(operator, lambda: len(pod_names(c, ns)) == 1, 60, "one worker pod")
    Publisher(redis_url).publish_batch(f"{ns}/alarm", ({"n": i} for i in range(200)))
    published = time.monotonic()
    last = until(
        operator,
        lambda: (s := get_tq(c, ns, "alarm").get("status", {}).get("lastScale") or {}).get("to", 0) > 1 and s,
        30,
        "a scale-up from the alarm",
    )
    print(
        f"\n[e2e figures] no live worker with a backlog: {last['from']} -> {last['to']} "
        f"({last['reason']}) {time.monotonic() - published:.1f} s after the backlog appeared"
    )
    assert last["reason"] == "NoLiveWorkers"
    assert last["from"] == 1
    assert last["to"] == 4, "straight to the need (clamped to max) in one step, not a ramp"
