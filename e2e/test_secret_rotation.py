"""A rotated Secret rolls the pods, and a Purge that cannot reach Redis gives up: on the real control plane.

Issue 9 item 5 and the finalizer claim in docs/operator.md, with the operator as its own
least-privilege process, real Redis and real worker processes:

- changing the data of a TaskQueue's coordination Secret changes the Deployment's config hash; the
  pods are replaced through a rolling update, the new ones started with the new URL, and every
  message published before the rotation runs;
- ``deletionPolicy: Purge`` with the coordination Redis unreachable retries, then gives up after
  ``--finalizer-timeout``: the deletion proceeds, with a Warning Event.

The operator re-reads Secrets every 2 s here (``--secret-refresh-interval``), not the default 60 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from localcluster.cluster import LocalCluster
from localcluster.procs import free_port
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from sluiceway_operator.manifests import CONFIG_HASH_ANNOTATION
from support import (
    Operator,
    cond,
    get_dep,
    get_tq,
    module_operator,
    redis_secret,
    taskqueue,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(300)]

FINALIZER_TIMEOUT = 6.0


@pytest.fixture(scope="module")
def operator(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with module_operator(
        kube_cluster,
        tmp_path_factory.mktemp("operator"),
        "--secret-refresh-interval",
        "2",
        "--finalizer-timeout",
        str(FINALIZER_TIMEOUT),
    ) as op:
        yield op


def _events(c: LocalCluster, ns: str, reason: str) -> list[dict[str, Any]]:
    items = c.get(f"/api/v1/namespaces/{ns}/events").get("items") or []
    return [e for e in items if e.get("reason") == reason]


def _template_hash(c: LocalCluster, ns: str, name: str) -> str | None:
    dep = get_dep(c, ns, name)
    if dep is None:
        return None
    annotations = dep["spec"]["template"]["metadata"].get("annotations") or {}
    return annotations.get(CONFIG_HASH_ANNOTATION)


def _running(c: LocalCluster, ns: str) -> dict[str, str]:
    """Running pod -> the config hash of its template, for pods with a live container process."""
    alive = {pod for pod, pids in c.pods_processes(ns).items() if pids}
    items = c.get(f"/api/v1/namespaces/{ns}/pods").get("items") or []
    return {
        p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(CONFIG_HASH_ANNOTATION, "")
        for p in items
        if p["metadata"]["name"] in alive and not p["metadata"].get("deletionTimestamp")
    }


def _redis_url_of(c: LocalCluster, ns: str, pod: str) -> str:
    """The coordination URL a pod's container process was started with (read from /proc)."""
    pid = c.pods_processes(ns)[pod][0]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        key, _, value = entry.partition(b"=")
        if key == b"SLUICEWAY_REDIS_URL":
            return value.decode()
    return ""


def test_a_rotated_secret_rolls_the_pods_and_loses_nothing(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    messages = 60
    c.apply(taskqueue("rot", redis_url, replicas=2), ns)
    old_hash = until(operator, lambda: _template_hash(c, ns, "rot"), 30, "the worker Deployment")
    old_pods = until(
        operator,
        lambda: (p := _running(c, ns)) and len(p) == 2 and set(p.values()) == {old_hash} and p,
        90,
        "2 running worker pods",
    )
    assert all(_redis_url_of(c, ns, pod) == redis_url for pod in old_pods)

    Publisher(redis_url).publish_batch(f"{ns}/rot", ({"n": i, "sleep": 0.3} for i in range(messages)))
    until(operator, lambda: r.hlen("test:done") >= 4, 60, "the pods working through the backlog")

    # The same Redis under a different URL: the data changes, the workers keep working.
    rotated = f"{redis_url}?health_check_interval=30"
    redis_secret(c, ns, rotated)
    new_hash = until(
        operator,
        lambda: (h := _template_hash(c, ns, "rot")) != old_hash and h,
        60,
        "a new config hash in the pod template",
    )
    done_at_roll = r.hlen("test:done")
    new_pods = until(
        operator,
        lambda: (p := _running(c, ns)) and len(p) == 2 and set(p.values()) == {new_hash} and p,
        120,
        "the pods replaced by ones with the new config hash",
    )
    assert not set(new_pods) & set(old_pods), "an old pod survived the roll"
    assert all(_redis_url_of(c, ns, pod) == rotated for pod in new_pods)
    rs = c.get(f"/apis/apps/v1/namespaces/{ns}/replicasets").get("items") or []
    assert len(rs) >= 2, "the pods were not replaced through a new ReplicaSet (a rolling update)"

    until(
        operator,
        lambda: all(r.hget("test:done", str(i)) for i in range(messages)),
        120,
        "every message published before the rotation done",
    )
    assert done_at_roll < messages, "the backlog was done before the roll; nothing was tested"
    assert r.llen(Keys(ns, "rot").dead) == 0


def test_purge_with_redis_unreachable_gives_up_after_the_finalizer_timeout(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    redis_secret(c, ns, f"redis://127.0.0.1:{free_port()}/0", name="nowhere")  # nothing listens there
    ref = {"urlSecretRef": {"name": "nowhere", "key": "url"}}
    c.apply(taskqueue("stuck", redis_url, replicas=0, deletionPolicy="Purge", coordination=ref), ns)
    until(
        operator,
        lambda: cond(get_tq(c, ns, "stuck"), "Degraded").get("reason") == "RedisUnreachable",
        30,
        "Degraded",
    )
    c.kubectl("delete", "taskqueue", "stuck", "-n", ns, "--wait=false", check=True)
    # Under Purge a failed cleanup is retried (Retain would have let go at once) ...
    until(operator, lambda: "queue cleanup failed" in operator.tail(400), 30, "a retried cleanup")
    assert get_tq(c, ns, "stuck")["metadata"].get("deletionTimestamp"), "deleted without a retry"
    # ... until --finalizer-timeout (or 5 attempts), then the deletion proceeds.
    until(
        operator,
        lambda: c.kubectl("get", "taskqueue", "stuck", "-n", ns).returncode != 0,
        60,
        "TaskQueue gone",
    )
    (event,) = until(
        operator, lambda: _events(c, ns, "QueueCleanupFailed"), 30, "the QueueCleanupFailed Event"
    )
    assert event["type"] == "Warning" and "nothing was purged" in event["message"]
    assert "127.0.0.1" not in event["message"]
