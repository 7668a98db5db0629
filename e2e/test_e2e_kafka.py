"""End to end on Kafka: a TaskQueue with 6 partitions wakes from zero on lag, scales no higher than
its partition count and its QPS ceiling, drains a burst with nothing lost, and returns to zero.

Real control plane, the test kubelet (worker pods are local processes running the real worker),
the operator as its own process, real Redis for coordination, and a real Kafka broker
(tests/support/kafka_server.py).
"""

from __future__ import annotations

import pytest
import redis
from confluent_kafka.admin import AdminClient

from localcluster.cluster import LocalCluster
from sluiceway.transports import kafka_common as kc
from sluiceway_operator.scaling import qps_ceiling
from support import (
    Burst,
    Operator,
    burst_taskqueue,
    kafka_broker,
    record_payloads,
    replicas,
    start_bound,
    until,
)

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
        burst_taskqueue(
            "kq",
            redis_url,
            qps=QPS,
            per_pod=PER_POD,
            task_seconds=TASK_SECONDS,
            max_replicas=10,
            drain_seconds=5,
            scaling={"qpsHeadroom": HEADROOM},
            broker=kafka_broker(c, ns, kafka_url, partitions=PARTITIONS),
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
    burst = Burst(c, operator, ns, "kq")
    burst.publish(kafka_url, f"{ns}/kq", record_payloads(messages, TASK_SECONDS))
    until(operator, lambda: (burst.replicas() or 0) > 0, 60, "the wake from zero on lag")
    woke = burst.last_scale()
    assert woke["from"] == 0
    assert woke["reason"] == "WakeFromZero"
    seen = burst.drain(r, messages, done_within=300, zero_within=120)
    f = burst.figures(
        f"kafka burst {messages} @ {QPS} qps, {PARTITIONS} partitions",
        r,
        messages,
        ceiling=min(ceiling, PARTITIONS),
        limit=start_bound(QPS),
    )
    print(f"\n{f.line()}\nreplicas over time: {seen}; caps: partitions {PARTITIONS}, QPS ceiling {ceiling}")
    assert f.peak_replicas <= PARTITIONS, seen
    assert seen[-1] == 0
    assert f.lost == 0, f.line()
    assert f.processed == messages
    assert f.worst_window <= start_bound(QPS), f.line()
    c.kubectl("delete", "taskqueue", "kq", "-n", ns, "--wait=false")
