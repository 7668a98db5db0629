"""End to end: the operator's API calls, counted by the real API server (``apiserver_request_total``).

docs/operator.md claims that a steady tick writes nothing and that pod-deletion-cost goes only to
pods whose value changed, and docs/scaling.md that the ReplicaSet then removes the lowest-cost pod
first. kmock checked the first two against a mock; here the API server itself counts the requests.
In this cluster only the operator PATCHes taskqueues, deployments and pods (the kubelet writes
pods/status, the controllers PUT), so those counters are the operator's calls.
"""

from __future__ import annotations

import re

import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from support import Operator, cond, get_tq, taskqueue, ticks, until

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def api_requests(c: LocalCluster, verb: str, resource: str, subresource: str = "") -> int:
    """How many ``verb`` requests on ``resource`` (and ``subresource``) the API server has served."""
    text = str(c.get("/metrics").get("text", ""))
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if (labels.get("verb"), labels.get("resource"), labels.get("subresource", "")) == (
            verb,
            resource,
            subresource,
        ):
            total += float(m.group("value"))
    return int(total)


def test_a_steady_tick_writes_nothing(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    c.apply(taskqueue("quiet", redis_url), ns)
    until(operator, lambda: cond(get_tq(c, ns, "quiet"), "Ready").get("reason") == "IdleAtZero", 30, "idle")
    # Earlier tests' TaskQueues may still be finalizing (kopf patches them): count only once this
    # is the one TaskQueue in the cluster.
    until(
        operator,
        lambda: (
            [t["metadata"]["name"] for t in c.get("/apis/sluiceway.dev/v1alpha1/taskqueues")["items"]]
            == ["quiet"]
        ),
        120,
        "no other TaskQueue left",
    )
    # Settled: one more tick after the status went idle, then count.
    seen = ticks(operator)
    until(operator, lambda: ticks(operator) >= seen + 2, 30, "two more ticks")
    writes = {
        "taskqueues": api_requests(c, "PATCH", "taskqueues"),
        "taskqueues/status": api_requests(c, "PATCH", "taskqueues", "status"),
        "deployments": api_requests(c, "PATCH", "deployments"),
        "pods": api_requests(c, "PATCH", "pods"),
    }
    seen = ticks(operator)
    until(operator, lambda: ticks(operator) >= seen + 5, 60, "five steady ticks")
    after = {
        "taskqueues": api_requests(c, "PATCH", "taskqueues"),
        "taskqueues/status": api_requests(c, "PATCH", "taskqueues", "status"),
        "deployments": api_requests(c, "PATCH", "deployments"),
        "pods": api_requests(c, "PATCH", "pods"),
    }
    print(f"\nPATCH requests before and after five steady ticks: {writes} -> {after}")
    assert after == writes
    c.kubectl("delete", "taskqueue", "quiet", "-n", ns, "--wait=false")


def test_deletion_cost_goes_only_to_changed_pods_and_the_lowest_cost_pod_goes_first(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    # Sized by hand (spec.replicas, as `kubectl scale tq` sets it), so measured latencies cannot
    # move the size: 3 pods of 1 task each run two long tasks (15 s and 40 s) and a short one.
    c.apply(
        taskqueue(
            "costs",
            redis_url,
            replicas=3,
            concurrency={"perPod": 1},
            # The default heartbeat: with the suite's 0.5 s, a loaded machine lets a heartbeat go
            # stale now and then, and a stale worker's cost is -1 (silent: removed first), rightly.
            liveness={"heartbeatSeconds": 2},
            timeoutSeconds=60,
        ),
        ns,
    )
    keys = Keys(ns, "costs")

    def busy_pods() -> dict[str, int]:
        return {hb["pod"]: hb["busy"] for hb in fleet.heartbeats(r, keys) if hb["state"] == "running"}

    def pods() -> set[str]:
        items = c.get(f"/api/v1/namespaces/{ns}/pods")["items"]
        return {p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp")}

    def pin(n: int) -> None:
        patch = f'{{"spec":{{"replicas":{n}}}}}'
        c.kubectl("patch", "taskqueue", "costs", "-n", ns, "--type=merge", "-p", patch, check=True)

    until(operator, lambda: len(busy_pods()) == 3, 60, "3 workers heartbeating")
    # Costs are written only just before a scale-in: none until the first one.
    patches = api_requests(c, "PATCH", "pods")
    pub = Publisher(redis_url)
    pub.publish(f"{ns}/costs", {"n": 0, "sleep": 15})
    pub.publish(f"{ns}/costs", {"n": 1, "sleep": 40})
    pub.publish(f"{ns}/costs", {"n": 2, "sleep": 0.1})
    # Two pods busy with the long tasks, the third idle again: the first scale-in, 3 -> 2.
    idle = until(
        operator,
        lambda: (
            (b := busy_pods())
            and len(b) == 3
            and sorted(b.values()) == [0, 1, 1]
            and r.hlen("test:done")
            and b
        ),
        60,
        "two busy pods and one idle",
    )
    first_idle = next(p for p, n in idle.items() if n == 0)
    pin(2)
    until(operator, lambda: len(pods()) == 2, 30, "a pod removed")
    first_patches = api_requests(c, "PATCH", "pods") - patches
    assert first_idle not in pods(), f"the ReplicaSet removed a busy pod, not the idle {first_idle}"
    # Nothing carried a cost yet: all three pods got one (idle 0, busy 1).
    assert first_patches == 3, (first_patches, operator.tail(40))

    # The 15 s task ends: its pod turns idle, and only its cost changes (1 -> 0).
    idle = until(
        operator,
        lambda: (b := busy_pods()) and len(b) == 2 and sorted(b.values()) == [0, 1] and b,
        60,
        "one busy pod and one idle",
    )
    second_idle = next(p for p, n in idle.items() if n == 0)
    patches = api_requests(c, "PATCH", "pods")
    pin(1)
    until(operator, lambda: len(pods()) == 1, 30, "a pod removed")
    second_patches = api_requests(c, "PATCH", "pods") - patches
    assert second_idle not in pods(), f"the ReplicaSet removed the busy pod, not the idle {second_idle}"
    assert second_patches == 1, (second_patches, operator.tail(40))
    until(operator, lambda: r.hlen("test:done") >= 3, 90, "every task done")
    assert {int(k): int(v) for k, v in r.hgetall("test:done").items()} == {0: 1, 1: 1, 2: 1}
    c.kubectl("delete", "taskqueue", "costs", "-n", ns, "--wait=false")
