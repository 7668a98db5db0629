"""Golden cases of the Argo CD health check: each state a TaskQueue reaches on the real control plane,
read back from the real API server, and evaluated by Argo CD's own code.

``argocd admin settings resource-overrides health`` (Argo CD v3.2.11, built from its Go module by
``localcluster.argocd``) loads deploy/argocd/argocd-cm.yaml the way the application-controller does
and runs the script in its sandboxed Lua VM, offline. The lupa oracle (tests/argocd/oracle.py) must
give the same answer on the same object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.argocd.oracle import evaluate

from localcluster.argocd import ArgoCD, ensure_argocd, health
from localcluster.cluster import LocalCluster
from sluiceway.publish import Publisher
from support import (
    TQ_PATH,
    Operator,
    cond,
    get_tq,
    module_operator,
    taskqueue,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(600)]


# The broken TaskQueue below must outlast the start-up grace before it is Degraded; the default 30 s
# allows for image pulls, which the test kubelet does not do.
NO_LIVE_WORKERS_GRACE = 5.0


@pytest.fixture(scope="module")
def operator(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with module_operator(
        kube_cluster,
        tmp_path_factory.mktemp("operator"),
        "--no-live-workers-grace",
        str(NO_LIVE_WORKERS_GRACE),
    ) as op:
        yield op


@pytest.fixture(scope="module")
def argocd() -> ArgoCD:
    return ensure_argocd()  # built on first use (about 8 min cold), cached after


def check(argocd: ArgoCD, obj: dict[str, Any], status: str, fragment: str, tmp: Path) -> None:
    got = health(argocd.binary, obj, workdir=tmp)
    assert got.status == status, f"{got} for status {obj.get('status')}"
    assert fragment.lower() in got.message.lower(), got
    assert evaluate(obj) == (got.status, got.message), "the lupa oracle disagrees with Argo CD"


def reached(
    op: Operator, c: LocalCluster, ns: str, name: str, test: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    found: dict[str, Any] = until(
        op, lambda: (t := get_tq(c, ns, name)) and test(t) and t, 90, f"{name}'s state"
    )
    return found


def reason(t: dict[str, Any], type_: str) -> str:
    return str(cond(t, type_).get("reason", ""))


def test_health_of_each_state_from_the_real_api(
    kube_cluster: LocalCluster,
    operator: Operator,
    ns: str,
    redis_url: str,
    r: redis.Redis,
    argocd: ArgoCD,
    tmp_path: Path,
) -> None:
    c = kube_cluster
    path = TQ_PATH.format(ns=ns, name="")[:-1]

    # Just created: the API server's answer carries no status yet.
    created = c.api.create(path, taskqueue("life", redis_url))
    check(argocd, created, "Progressing", "observe this TaskQueue", tmp_path)
    idle = reached(operator, c, ns, "life", lambda t: reason(t, "Ready") == "IdleAtZero")
    check(argocd, idle, "Healthy", "scaled to zero", tmp_path)

    # A spec change: the PATCH response has the new generation and the old status.
    stale = c.api.merge_patch(f"{path}/life", {"spec": {"concurrency": {"perPod": 3}}})
    assert stale["metadata"]["generation"] > stale["status"]["observedGeneration"]
    check(argocd, stale, "Progressing", f"generation {stale['metadata']['generation']}", tmp_path)

    # Pinned to a size: healthy once the workers are ready.
    c.apply(taskqueue("pinned", redis_url, replicas=1), ns)
    ready = reached(operator, c, ns, "pinned", lambda t: reason(t, "Ready") == "WorkersReady")
    check(argocd, ready, "Healthy", "ready", tmp_path)
    zero = c.api.merge_patch(f"{path}/pinned", {"spec": {"replicas": 0}})
    zero = reached(
        operator,
        c,
        ns,
        "pinned",
        lambda t: t["status"].get("observedGeneration") == zero["metadata"]["generation"],
    )
    check(argocd, zero, "Suspended", "pinned to zero", tmp_path)

    # Work waits and the workers never come up (the function does not exist): first Progressing,
    # then, once that outlasts the start-up grace, Degraded with NoLiveWorkers.
    c.apply(taskqueue("broken", redis_url, function="tests.tasks:no_such_function"), ns)
    Publisher(redis_url).publish_batch(f"{ns}/broken", ({"n": i} for i in range(20)))
    waiting = reached(operator, c, ns, "broken", lambda t: reason(t, "Ready") == "WaitingForWorkers")
    check(argocd, waiting, "Progressing", "waiting for workers", tmp_path)
    dead = reached(operator, c, ns, "broken", lambda t: reason(t, "Degraded") == "NoLiveWorkers")
    check(argocd, dead, "Degraded", "no worker heartbeats", tmp_path)

    # A fault: the coordination Secret does not exist.
    c.apply(
        taskqueue("nosecret", redis_url, coordination={"urlSecretRef": {"name": "absent", "key": "url"}}), ns
    )
    missing = reached(operator, c, ns, "nosecret", lambda t: reason(t, "Degraded") == "SecretMissing")
    check(argocd, missing, "Degraded", "absent", tmp_path)

    # A second TaskQueue on the first one's queue.
    c.apply(taskqueue("copy", redis_url, broker={"type": "redis", "queue": "life"}), ns)
    conflict = reached(operator, c, ns, "copy", lambda t: cond(t, "Conflict").get("status") == "True")
    check(argocd, conflict, "Degraded", "also used by", tmp_path)
