"""End to end on a Redis Cluster: a TaskQueue whose coordination Secret holds a
``redis+cluster://`` URL wakes from zero on the backlog the operator reads from the cluster, its
worker pods drain a burst from the cluster's list with nothing lost, and it returns to zero.

Real control plane, the test kubelet (worker pods are local processes running the real worker),
the operator as its own process, and a real three-master Redis Cluster
(tests/support/redis_cluster.py). The tasks record into the plain test Redis, so what they wrote
is read apart from the cluster that holds the queue, the rate limit, the heartbeats and the leases.
"""

from __future__ import annotations

import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway import connection, fleet
from sluiceway.contract import Keys
from support import Burst, Operator, burst_taskqueue, get_tq, record_payloads, until, url_secret

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = 300
QPS = 100
PER_POD = 2
TASK_SECONDS = 0.05


def test_a_redis_cluster_url_wakes_the_fleet_from_zero_drains_a_burst_and_returns_to_zero(
    kube_cluster: LocalCluster,
    operator: Operator,
    ns: str,
    redis_url: str,
    r: redis.Redis,
    redis_cluster_url: str,
) -> None:
    c = kube_cluster
    cluster_ref = url_secret(c, ns, redis_cluster_url, "redis-cluster")
    c.apply(
        burst_taskqueue(
            "rc",
            redis_url,
            qps=QPS,
            per_pod=PER_POD,
            task_seconds=TASK_SECONDS,
            max_replicas=3,
            drain_seconds=5,
            coordination={"urlSecretRef": cluster_ref},
        ),
        ns,
    )
    keys = Keys(ns, "rc")
    cluster = connection.client(redis_cluster_url)
    burst = Burst(c, operator, ns, "rc")
    burst.publish(redis_cluster_url, f"{ns}/rc", record_payloads(MESSAGES, TASK_SECONDS))
    assert fleet.queue_stats(cluster, keys).backlog > 0, "the burst is on the cluster"
    until(operator, lambda: (burst.replicas() or 0) > 0, 60, "the wake from zero on the cluster's backlog")
    woke = burst.last_scale()
    assert woke["from"] == 0
    assert woke["reason"] == "WakeFromZero"
    assert woke["inputs"]["backlog"] > 0, woke
    # The workers' heartbeats reach the operator through the cluster too.
    until(
        operator,
        lambda: get_tq(c, ns, "rc").get("status", {}).get("liveWorkers", 0) > 0,
        120,
        "live workers in the status",
    )
    seen = burst.drain(r, MESSAGES, done_within=300, zero_within=120)
    f = burst.figures(f"redis cluster burst {MESSAGES} @ {QPS} qps", r, MESSAGES, ceiling=3, limit=None)
    print(f"\n{f.line()}\nreplicas over time: {seen}")
    assert seen[0] == 0 and seen[-1] == 0, seen
    assert f.peak_replicas > 0, seen
    assert f.lost == 0, f.line()
    assert f.processed == MESSAGES
    stats = fleet.queue_stats(cluster, keys)
    assert (stats.backlog, stats.in_flight, stats.dead) == (0, 0, 0)
    # Nothing went to the plain Redis the tasks record into: the queue lives on the cluster only.
    assert fleet.queue_stats(r, keys).backlog == 0
    cluster.close()
    c.kubectl("delete", "taskqueue", "rc", "-n", ns, "--wait=false")
