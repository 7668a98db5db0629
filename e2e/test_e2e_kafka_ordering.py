"""End to end on Kafka with ``ordering: key``: on the real control plane, with several worker pods
sharing a 6-partition topic, each key's messages run one at a time and in offset order.

Messages are published with ``key=`` (one key, one partition, publish order = offset order), each
carrying its sequence number within its key; the task records when each run started and ended
and in which pod (process). The check: for every key, the runs sorted by start are in sequence
order, and each starts only after the previous one ended, whichever pod ran it.
"""

from __future__ import annotations

import itertools

import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway.publish import Publisher
from sluiceway.transports import kafka_common as kc
from support import Operator, kafka_broker, replicas, taskqueue, until

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(600)]

PARTITIONS = 6
PODS = 3
KEYS = 12
PER_KEY = 15
TASK_SECONDS = 0.02


def runs(r: redis.Redis, key: str) -> list[tuple[int, float, float, str]]:
    out = []
    for raw in r.lrange(f"test:order:{key}", 0, -1):
        seq, start, end, pid = raw.decode().split()
        out.append((int(seq), float(start), float(end), pid))
    return sorted(out, key=lambda x: x[1])


def members_with_partitions(url: str, group_id: str) -> int:
    """How many members of the consumer group hold at least one partition now."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kc.bootstrap(url), "log_level": 3})
    (future,) = admin.describe_consumer_groups([group_id], request_timeout=5).values()
    described = future.result(timeout=10)
    return sum(1 for m in described.members if m.assignment and m.assignment.topic_partitions)


def test_ordering_by_key_holds_across_pods(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis, kafka_url: str
) -> None:
    c = kube_cluster
    c.apply(
        taskqueue(
            "ko",
            redis_url,
            function="tests.kafka_tasks:ordered",
            broker=kafka_broker(c, ns, kafka_url, partitions=PARTITIONS, ordering="key"),
            # Enough threads per pod that, without the ordering rule, one key's records (which
            # sit together on one partition) would run at once.
            concurrency={"perPod": 8},
            scaling={"minReplicas": PODS, "maxReplicas": PODS},
        ),
        ns,
    )
    until(operator, lambda: replicas(c, ns, "ko") == PODS, 120, f"{PODS} worker pods")
    # Pods up is not pods consuming: publish once every pod holds partitions of the group, or the
    # first to join takes every record before the others are assigned any (seen in CI).
    until(
        operator,
        lambda: members_with_partitions(kafka_url, kc.group(ns, "ko")) >= PODS,
        120,
        f"{PODS} group members holding partitions",
    )
    pub = Publisher(kafka_url)
    try:
        # Interleaved across keys, in sequence order within each key.
        for seq in range(PER_KEY):
            pub.publish_batch(
                f"{ns}/ko",
                [{"key": f"k{k}", "seq": seq, "sleep": TASK_SECONDS} for k in range(KEYS)],
                keys=[f"k{k}" for k in range(KEYS)],
            )
    finally:
        pub.close()
    total = KEYS * PER_KEY
    until(operator, lambda: r.hlen("test:done") >= total, 300, "every message done")
    pids: set[str] = set()
    out_of_order = overlaps = duplicates = 0
    for k in range(KEYS):
        got = runs(r, f"k{k}")
        pids |= {pid for *_, pid in got}
        seqs = [seq for seq, *_ in got]
        duplicates += len(seqs) - len(set(seqs))
        first = [s for i, s in enumerate(seqs) if s not in seqs[:i]]
        out_of_order += sum(1 for a, b in itertools.pairwise(first) if b < a)
        overlaps += sum(1 for a, b in itertools.pairwise(got) if b[1] < a[2])
    print(
        f"\n[figures] kafka ordering=key: messages={total} keys={KEYS} pods={PODS} "
        f"processes_that_ran_tasks={len(pids)} out_of_order={out_of_order} overlapping_runs={overlaps} "
        f"duplicates={duplicates}"
    )
    assert len(pids) >= 2, "the messages must have been spread over several pods"
    assert out_of_order == 0
    assert overlaps == 0
    c.kubectl("delete", "taskqueue", "ko", "-n", ns, "--wait=false")
