"""Safe deletion and shared queues on the real local control plane, a real Redis and real workers.

- ``deletionPolicy: Retain`` (the default): deleting a TaskQueue mid-burst stops its workers and keeps
  every key of the queue; re-creating it runs every one of the 1,000 messages.
- ``deletionPolicy: Purge``: the queue's keys are gone.
- Retain with the coordination Redis unreachable: the deletion goes through at once, with a Warning.
- Two TaskQueues on one queue: the younger one gets ``Conflict`` and a Warning Event, and a purge
  never happens while the other still uses the queue.

The deletion Event is read back from the API, with its counts.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from localcluster.cluster import LocalCluster
from localcluster.procs import free_port
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from support import Operator, cond, get_dep, get_tq, redis_secret, taskqueue, until

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(300)]


def _events(c: LocalCluster, ns: str, reason: str) -> list[dict[str, Any]]:
    items = c.get(f"/api/v1/namespaces/{ns}/events").get("items") or []
    return [e for e in items if e.get("reason") == reason]


def _gone(c: LocalCluster, ns: str, name: str) -> bool:
    return c.kubectl("get", "taskqueue", name, "-n", ns).returncode != 0 and get_dep(c, ns, name) is None


def _keys(r: redis.Redis, ns: str, queue: str) -> set[bytes]:
    return set(r.scan_iter(match=f"sluiceway:{{{ns}/{queue}}}:*"))


def test_retain_keeps_the_backlog_and_a_recreated_taskqueue_runs_all_1000(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    messages = 1000
    spec: dict[str, Any] = {"scaling": {"maxReplicas": 2}}
    c.apply(taskqueue("keep", redis_url, **spec), ns)
    tq = until(operator, lambda: (t := get_tq(c, ns, "keep")) and cond(t, "Ready") and t, 30, "status")
    assert tq["spec"]["deletionPolicy"] == "Retain"  # the CRD's default
    keys = Keys(ns, "keep")
    r.lpush(keys.dead, '{"reason": "planted", "payload": "{}"}')  # a DLQ entry that must survive
    marker = keys.prefix + "schedule:nightly:1800000000"  # a schedule's exactly-once marker, likewise
    r.set(marker, 1, ex=3600)
    Publisher(redis_url).publish_batch(f"{ns}/keep", ({"n": i, "sleep": 0.05} for i in range(messages)))
    until(operator, lambda: r.hlen("test:done") >= 50, 90, "the fleet working through the burst")

    c.kubectl("delete", "taskqueue", "keep", "-n", ns, "--wait=false", check=True)
    until(operator, lambda: _gone(c, ns, "keep"), 60, "TaskQueue and Deployment gone")
    until(operator, lambda: not any(c.pods_processes(ns).values()), 60, "the workers stopped")
    done_at_delete = r.hlen("test:done")
    assert done_at_delete < messages, "the burst finished before the delete; nothing was tested"
    stats = r.llen(keys.ready) + r.zcard(keys.delayed)
    assert stats > 0 and r.llen(keys.dead) == 1 and r.exists(marker)
    (event,) = until(operator, lambda: _events(c, ns, "QueueRetained"), 30, "the QueueRetained Event")
    assert event["type"] == "Normal" and "deletionPolicy Retain" in event["message"]
    assert " ready, " in event["message"] and "1 dead-lettered" in event["message"]

    # Re-created under the same name: the same queue, picked up with nothing lost.
    c.apply(taskqueue("keep", redis_url, **spec), ns)
    until(
        operator,
        lambda: all(r.hget("test:done", str(i)) for i in range(messages)),
        180,
        "every one of the 1,000 messages done",
    )
    assert r.llen(keys.dead) == 1  # nothing was dead-lettered on the way


def test_purge_deletes_the_queue(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    c.apply(taskqueue("gone", redis_url, replicas=0, deletionPolicy="Purge"), ns)
    until(operator, lambda: cond(get_tq(c, ns, "gone"), "Ready"), 30, "status")
    Publisher(redis_url).publish_batch(f"{ns}/gone", ({"n": i} for i in range(100)))
    assert _keys(r, ns, "gone")
    c.kubectl("delete", "taskqueue", "gone", "-n", ns, "--wait=false", check=True)
    until(operator, lambda: _gone(c, ns, "gone"), 60, "TaskQueue gone")
    assert not _keys(r, ns, "gone")
    (event,) = until(operator, lambda: _events(c, ns, "QueuePurged"), 30, "the QueuePurged Event")
    assert "100 ready, 0 delayed, 0 in flight, 0 dead-lettered" in event["message"]


def test_a_shared_queue_is_reported_and_never_purged_while_in_use(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    c.apply(taskqueue("first", redis_url, replicas=0, broker={"type": "redis", "queue": "shared"}), ns)
    until(operator, lambda: cond(get_tq(c, ns, "first"), "Ready"), 30, "first's status")
    second = taskqueue(
        "second", redis_url, replicas=0, deletionPolicy="Purge", broker={"type": "redis", "queue": "shared"}
    )
    c.apply(second, ns)
    conflict = until(
        operator, lambda: cond(get_tq(c, ns, "second"), "Conflict"), 30, "second's Conflict condition"
    )
    assert conflict["status"] == "True" and conflict["reason"] == "QueueShared"
    assert "'first'" in conflict["message"]
    assert not cond(get_tq(c, ns, "first"), "Conflict")  # the older one owns the queue
    (warning,) = until(operator, lambda: _events(c, ns, "QueueShared"), 30, "the QueueShared Event")
    assert warning["type"] == "Warning" and warning["involvedObject"]["name"] == "second"

    Publisher(redis_url).publish_batch(f"{ns}/shared", ({"n": i} for i in range(50)))
    c.kubectl("delete", "taskqueue", "second", "-n", ns, "--wait=false", check=True)
    until(operator, lambda: _gone(c, ns, "second"), 60, "second gone")
    assert r.llen(Keys(ns, "shared").ready) == 50  # Purge was asked for, and not applied
    (kept,) = until(operator, lambda: _events(c, ns, "QueueRetained"), 30, "the QueueRetained Event")
    assert "TaskQueue first still uses it" in kept["message"]

    # With the other user gone, the same policy on the remaining TaskQueue does purge.
    c.kubectl(
        "patch", "taskqueue", "first", "-n", ns, "--type=merge", "-p", '{"spec":{"deletionPolicy":"Purge"}}'
    )
    c.kubectl("delete", "taskqueue", "first", "-n", ns, "--wait=false", check=True)
    until(operator, lambda: _gone(c, ns, "first"), 60, "first gone")
    assert not _keys(r, ns, "shared")


def test_retain_with_redis_unreachable_never_holds_up_the_deletion(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    redis_secret(c, ns, f"redis://127.0.0.1:{free_port()}/0", name="nowhere")  # nothing listens there
    ref = {"urlSecretRef": {"name": "nowhere", "key": "url"}}
    c.apply(taskqueue("lost", redis_url, replicas=0, coordination=ref), ns)
    until(
        operator,
        lambda: cond(get_tq(c, ns, "lost"), "Degraded").get("reason") == "RedisUnreachable",
        30,
        "Degraded",
    )
    c.kubectl("delete", "taskqueue", "lost", "-n", ns, "--wait=false", check=True)
    # Well inside the 60 s --finalizer-timeout that a Purge would spend retrying.
    until(operator, lambda: _gone(c, ns, "lost"), 30, "TaskQueue gone")
    (event,) = until(
        operator, lambda: _events(c, ns, "QueueCleanupFailed"), 30, "the QueueCleanupFailed Event"
    )
    assert event["type"] == "Warning" and "so it was kept" in event["message"]
    assert "127.0.0.1" not in event["message"]  # a reason class, never the Secret's target
