"""End to end on Kafka: a TaskQueue with 6 partitions wakes from zero on lag, scales no higher than
its partition count and its QPS ceiling, drains a burst with nothing lost, and returns to zero.

Real control plane, the test kubelet (worker pods are local processes running the real worker),
the operator as its own process, real Redis for coordination, and a real Kafka broker
(tests/support/kafka_server.py).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from datetime import datetime

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
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
            function="tests.tasks:record_traced",
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
    wall0 = time.time()
    burst.publish(kafka_url, f"{ns}/kq", record_payloads(messages, TASK_SECONDS))
    spread = per_partition(kafka_url, topic)
    print(f"\nrecords per partition: {spread}")
    # Keyless records go to the partitions in turn: a group drains no faster than its fullest one.
    assert max(spread) - min(spread) <= 1, spread
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
    print(timeline(c, ns, r, burst, operator, wall0))
    assert f.peak_replicas <= PARTITIONS, seen
    assert seen[-1] == 0
    assert f.lost == 0, f.line()
    assert f.processed == messages
    assert f.worst_window <= start_bound(QPS), f.line()
    c.kubectl("delete", "taskqueue", "kq", "-n", ns, "--wait=false")


# The worker's log lines that date a pod's start and its stop in the timeline.
LIFECYCLE = (
    "worker starting",
    "stopping: no more fetches",
    "handed messages back to the queue",
    "worker stopped",
)


def per_partition(kafka_url: str, topic: str) -> list[int]:
    """The records on each partition of ``topic``: how the burst spread, which bounds how many pods
    can work on it at once."""
    c = Consumer({"bootstrap.servers": kc.bootstrap(kafka_url), "group.id": "e2e-watermarks"})
    try:
        n = len(c.list_topics(topic, timeout=10).topics[topic].partitions)
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(n)]
    finally:
        c.close()


def timeline(c: LocalCluster, ns: str, r: redis.Redis, burst: Burst, op: Operator, wall0: float) -> str:
    """What each pod owned and ran, when (seconds from the publish), and the operator's decisions:
    the evidence a slow drain is read from."""
    lines = [
        "replicas: "
        + ", ".join(
            f"{t - burst.t0:.1f}s={n}"
            for t, n in zip(burst.sampler.changed_at if burst.sampler else [], burst.seen, strict=False)
        )
    ]
    for raw in op.log.read_text(errors="replace").splitlines():
        if " scaled " in f" {raw} " or "scaled" in raw.split():
            lines.append(f"operator: {raw.strip()[:220]}")
    ran: dict[str, list[float]] = {}
    for entry in r.lrange("test:trace", 0, -1):
        t, pod, _n = entry.decode().split()
        ran.setdefault(pod, []).append(float(t) - wall0)
    pods = {d.name.split("_")[1]: d for d in (c.run_dir / "pods").glob(f"{ns}_*")}
    for pod in sorted(set(pods) | set(ran), key=lambda p: min(ran.get(p, [1e9]))):
        times = sorted(ran.get(pod, []))
        buckets = Counter(int(t // 5) * 5 for t in times)
        lines.append(
            f"pod {pod}: ran {len(times)}"
            + (f", {times[0]:.1f}-{times[-1]:.1f}s; per 5 s: " if times else "")
            + " ".join(f"{b}:{buckets[b]}" for b in sorted(buckets))
        )
        for log in sorted(pods[pod].glob("*.log")) if pod in pods else ():
            for e in _events(log.read_text(errors="replace")):
                event = e.get("event", "")
                if (event.startswith("kafka_") and event != "kafka_client") or event in LIFECYCLE:
                    when = _seconds(e.get("timestamp", "")) - wall0
                    what = e.get("holds", e.get("partitions", "")) or e.get("redone_by_next_owner", "")
                    short = str(what or e.get("reason", "")).replace(f"sluiceway.{ns}.", "")
                    lines.append(f"    {when:6.1f}s {event} {short}")
    return "\n".join(lines)


# A worker's log line in either format: JSON, or the console renderer's
# "<iso time> [level    ] <event>   key=value key='a value'".
_CONSOLE = re.compile(r"^(\S+) \[\s*\w+\s*\] (.+?)(?:\s{2,}|\s*$)(.*)$")
_PAIR = re.compile(r"(\w+)=('[^']*'|\S+)")


def _events(text: str) -> list[dict[str, str]]:
    out = []
    for raw in text.splitlines():
        try:
            e = json.loads(raw)
        except ValueError:
            m = _CONSOLE.match(raw)
            if m is None:
                continue
            e = {"timestamp": m[1], "event": m[2].strip()}
            e.update({k: v.strip("'") for k, v in _PAIR.findall(m[3])})
        if isinstance(e, dict):
            out.append({k: str(v) for k, v in e.items()})
    return out


def _seconds(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
