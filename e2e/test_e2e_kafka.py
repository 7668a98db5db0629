"""End to end on Kafka: a TaskQueue with 6 partitions wakes from zero on lag, scales no higher than
its partition count and its QPS ceiling, drains a burst with nothing lost, and returns to zero.

Real control plane, the test kubelet (worker pods are local processes running the real worker),
the operator as its own process, real Redis for coordination, and a real Kafka broker
(tests/support/kafka_server.py).
"""

from __future__ import annotations

import base64
import time

import pytest
import redis
from confluent_kafka.admin import AdminClient

from localcluster.cluster import LocalCluster
from sluiceway.publish import Publisher
from sluiceway.transports import kafka_common as kc
from sluiceway_operator.scaling import qps_ceiling
from support import MaxReplicas, Operator, figures, get_tq, replicas, start_bound, taskqueue, until

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(600)]

PARTITIONS = 6
QPS = 100
PER_POD = 2
TASK_SECONDS = 0.2
HEADROOM = 0.1


def test_kafka_burst_wakes_from_zero_caps_at_partitions_and_returns_to_zero(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis, kafka_url: str
) -> None:
    c = kube_cluster
    messages = 1000
    # 100 qps x 0.2 s / 2 per pod x 1.1 = 11 pods by the QPS ceiling; the 6 partitions bind first.
    ceiling = qps_ceiling(QPS, latency=TASK_SECONDS, per_pod=PER_POD, headroom=HEADROOM)
    assert ceiling is not None and ceiling > PARTITIONS
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "kafka", "namespace": ns},
            "data": {"url": base64.b64encode(kafka_url.encode()).decode()},
        }
    )
    c.apply(
        taskqueue(
            "kq",
            redis_url,
            broker={
                "type": "kafka",
                "urlSecretRef": {"name": "kafka", "key": "url"},
                "kafka": {"partitions": PARTITIONS},
            },
            rateLimit={"qps": QPS},
            concurrency={"perPod": PER_POD},
            timeoutSeconds=10,
            scaling={
                "minReplicas": 0,
                "maxReplicas": 10,
                "qpsHeadroom": HEADROOM,
                "assumedTaskSeconds": TASK_SECONDS,
                "targetDrainSeconds": 5,
                "cooldownSeconds": 3,
                "scaleDownStabilizationSeconds": 2,
                "pollIntervalSeconds": 1,
            },
        ),
        ns,
    )
    until(operator, lambda: replicas(c, ns, "kq") == 0, 60, "the worker Deployment at 0")
    topic = kc.topic(ns, "kq")
    admin = AdminClient({"bootstrap.servers": kc.bootstrap(kafka_url)})

    def partitions() -> int:
        md = admin.list_topics(topic, timeout=5).topics.get(topic)
        return len(md.partitions) if md is not None and md.error is None else 0

    until(
        operator, lambda: partitions() == PARTITIONS, 60, f"the operator to create {topic} with 6 partitions"
    )
    sampler = MaxReplicas(c, ns, "kq")
    t0 = time.monotonic()
    pub = Publisher(kafka_url)
    pub.publish_batch(f"{ns}/kq", ({"n": i, "sleep": TASK_SECONDS} for i in range(messages)))
    pub.close()
    until(operator, lambda: (replicas(c, ns, "kq") or 0) > 0, 60, "the wake from zero on lag")
    tq = get_tq(c, ns, "kq")
    assert tq["status"]["lastScale"]["from"] == 0
    assert tq["status"]["lastScale"]["reason"] == "WakeFromZero"
    until(operator, lambda: r.hlen("test:done") >= messages, 300, "every message done")
    drained = time.monotonic() - t0
    until(operator, lambda: replicas(c, ns, "kq") == 0, 120, "the fleet back at zero")
    at_zero = time.monotonic() - t0
    seen = sampler.stop()
    f = figures(
        f"kafka burst {messages} @ {QPS} qps, {PARTITIONS} partitions",
        r,
        messages,
        seen_replicas=seen,
        ceiling=min(ceiling, PARTITIONS),
        limit=start_bound(QPS),
        drain_seconds=drained,
        zero_seconds=at_zero,
    )
    print(f"\n{f.line()}\nreplicas over time: {seen}; caps: partitions {PARTITIONS}, QPS ceiling {ceiling}")
    assert f.peak_replicas <= PARTITIONS, seen
    assert seen[-1] == 0
    assert f.lost == 0, f.line()
    assert f.processed == messages
    assert f.worst_window <= start_bound(QPS), f.line()
    c.kubectl("delete", "taskqueue", "kq", "-n", ns, "--wait=false")
