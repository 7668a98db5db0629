"""End to end on RabbitMQ: a TaskQueue with ``broker.type: rabbitmq`` wakes from zero on a burst,
drains it under its QPS limit, loses nothing when a worker pod is killed, and returns to zero.

Real control plane, the test kubelet, the operator as its own process, a real RabbitMQ node
(``tests/support/rabbitmq_server.py``, one vhost for this test) for the messages, and the real
coordination Redis for the rate limiter, heartbeats and the tasks' records. The broker URL reaches
the workers and the operator only through the TaskQueue's ``broker.urlSecretRef`` Secret.
"""

from __future__ import annotations

import base64
import os
import signal

import pika
import pytest
import redis

from localcluster.cluster import LocalCluster
from sluiceway_operator.scaling import qps_ceiling
from support import (
    Burst,
    Operator,
    burst_taskqueue,
    record_payloads,
    start_bound,
    until,
)

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.redis,
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.timeout(420),
]

QPS = 100
PER_POD = 4
TASK_SECONDS = 0.05
HEADROOM = 0.1
MESSAGES = 1500


def _ready(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def test_rabbitmq_burst_wakes_from_zero_drains_under_qps_survives_a_kill_and_returns_to_zero(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis, rabbitmq_url: str
) -> None:
    c = kube_cluster
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "rabbit", "namespace": ns},
            "data": {"url": base64.b64encode(rabbitmq_url.encode()).decode()},
        }
    )
    ceiling = qps_ceiling(QPS, latency=TASK_SECONDS, per_pod=PER_POD, headroom=HEADROOM)
    c.apply(
        burst_taskqueue(
            "rburst",
            redis_url,
            qps=QPS,
            per_pod=PER_POD,
            task_seconds=TASK_SECONDS,
            max_replicas=6,
            drain_seconds=10,
            scaling={"qpsHeadroom": HEADROOM},
            broker={"type": "rabbitmq", "urlSecretRef": {"name": "rabbit", "key": "url"}, "queue": "rburst"},
            deletionPolicy="Purge",  # the default, Retain, keeps the queue; this test checks the purge
        ),
        ns,
    )
    burst = Burst(c, operator, ns, "rburst")
    until(operator, lambda: burst.replicas() == 0, 30, "the worker Deployment at 0")
    # The operator declares the queue when it first reads the backlog: it exists before any worker.
    until(operator, lambda: _ready(rabbitmq_url, "rburst") == 0, 30, "the queue declared by the operator")
    burst.publish(rabbitmq_url, "rburst", record_payloads(MESSAGES, TASK_SECONDS))
    until(operator, lambda: (burst.replicas() or 0) > 0, 60, "a wake from zero")
    woke = burst.last_scale()
    assert woke["from"] == 0
    assert woke["reason"] == "WakeFromZero"
    # Kill one worker process mid-burst: its unacked deliveries go back when its connection drops.
    until(operator, lambda: r.hlen("test:done") >= MESSAGES // 5, 120, "progress before the kill")
    victim, pids = until(
        operator,
        lambda: next(((pod, p) for pod, p in c.pods_processes(ns).items() if p), None),
        30,
        "a running worker pod",
    )
    os.kill(pids[0], signal.SIGKILL)
    killed_after = r.hlen("test:done")
    seen = burst.drain(r, MESSAGES, done_within=240, zero_within=90)
    drained = burst.drained
    dead = _ready(rabbitmq_url, "rburst.dead")
    f = burst.figures(
        "rabbitmq burst 1500 @ 100 qps, one pod kill -9",
        r,
        MESSAGES,
        ceiling=ceiling,
        limit=start_bound(QPS),
        dead=dead,
    )
    print(f"\n{f.line()}\nkilled {victim} after {killed_after} done; replicas over time: {seen}")
    assert seen[0] == 0 and max(seen) >= 1
    assert seen[-1] == 0
    assert f.lost == 0 and f.dead == 0 and f.processed == MESSAGES, f.line()
    assert f.worst_window <= start_bound(QPS), f.line()
    assert _ready(rabbitmq_url, "rburst") == 0
    # Only what the killed process held can run twice: under a QPS limit it holds only messages
    # it has slots for (it takes slots first, then consumes with a prefetch of exactly that
    # many, or basic_gets one or two), each soon to start, at most its concurrency.
    assert f.duplicates <= PER_POD, f.line()
    assert drained >= MESSAGES / QPS * 0.9  # the limit held the fleet back
    c.kubectl("delete", "taskqueue", "rburst", "-n", ns, "--wait=false")
    # Under Purge the finalizer deletes the queue and its dead-letter queue, as it deletes Redis keys.
    until(operator, lambda: _gone(rabbitmq_url, "rburst"), 60, "the queue deleted by the finalizer")


def _gone(url: str, queue: str) -> bool:
    try:
        _ready(url, queue)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code == 404
    return False
