"""The real worker (``sluiceway worker``) on a real Kafka broker, through the seam: a burst, bad
input to the dead-letter topic with its reason, retries through the retry topic, SIGTERM, kill -9."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

import sluiceway
from sluiceway.transports import kafka_common as kc
from tests.support.workers import SpawnWorker, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]
NS = "default"


def counts(r: redis.Redis, key: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in r.hgetall(key).items()}


def kafka_env(kafka_url: str) -> dict[str, str]:
    return {"SLUICEWAY_BROKER": "kafka", "SLUICEWAY_BROKER_URL": kafka_url}


def committed_total(kafka_url: str, queue: str) -> int:
    c = Consumer({"bootstrap.servers": kc.bootstrap(kafka_url), "group.id": kc.group(NS, queue)})
    try:
        md = c.list_topics(kc.topic(NS, queue), timeout=10).topics[kc.topic(NS, queue)]
        tps = [TopicPartition(kc.topic(NS, queue), p) for p in md.partitions]
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=30))
    finally:
        c.close()


def dead_letters(
    kafka_url: str, queue: str, n: int, timeout: float = 60
) -> list[tuple[dict[str, bytes], bytes]]:
    c = Consumer(
        {
            "bootstrap.servers": kc.bootstrap(kafka_url),
            "group.id": f"dlq-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([kc.dead_topic(NS, queue)])
    out: list[tuple[dict[str, bytes], bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                out.append(({k: bytes(v or b"") for k, v in (m.headers() or [])}, m.value() or b""))
    finally:
        c.close()
    return out


def test_a_burst_runs_once_each_and_commits_everything(
    r: redis.Redis, kafka_url: str, spawn_worker: SpawnWorker
) -> None:
    queue = f"w{uuid.uuid4().hex[:8]}"
    pub = sluiceway.Publisher(kafka_url)
    pub.publish_batch(queue, ({"n": i} for i in range(500)))
    pub.close()
    w = spawn_worker("-f", "tests.tasks:record", "-q", queue, "-c", "8", **kafka_env(kafka_url))
    wait_for(lambda: r.hlen("test:done") >= 500, 180, what="the burst to drain")
    seen = counts(r, "test:seen")
    duplicates = sum(v - 1 for v in seen.values())
    print(
        f"[figures] worker burst: messages=500 lost={500 - len(seen)} duplicates={duplicates} dead_lettered=0"
    )
    assert len(seen) == 500 and duplicates == 0
    w.terminate()
    assert w.wait(60) == 0
    assert committed_total(kafka_url, queue) == 500


def test_bad_records_go_to_the_dead_letter_topic_with_their_reason(
    r: redis.Redis, kafka_url: str, spawn_worker: SpawnWorker
) -> None:
    queue = f"d{uuid.uuid4().hex[:8]}"
    pub = sluiceway.Publisher(kafka_url)
    pub.publish(queue, {"n": 0, "mode": "ok"})  # creates the topics
    raw = Producer(kc.producer_config(kafka_url))
    raw.produce(kc.topic(NS, queue), b"{malformed json")
    raw.produce(kc.topic(NS, queue), b"[1, 2, 3]")
    assert raw.flush(30) == 0
    pub.publish(queue, {"n": 2, "mode": "raise"})
    pub.publish(queue, {"n": 4, "mode": "reject"})
    pub.publish(queue, {"n": 5, "mode": "flaky"})
    pub.close()
    w = spawn_worker(
        "-f", "tests.tasks:misbehave", "-q", queue, "-c", "4", "--max-attempts", "3",
        "--backoff", "0.05", "--max-backoff", "0.2", **kafka_env(kafka_url),
    )  # fmt: skip
    dead = dead_letters(kafka_url, queue, 4, timeout=120)
    reasons = Counter(h[kc.HEADER_REASON].decode() for h, _ in dead)
    print(f"[figures] bad input: messages=6 dead_lettered={len(dead)} by_reason={dict(reasons)}")
    assert reasons == {"invalid_json": 1, "not_an_object": 1, "error": 1, "rejected": 1}
    for headers, value in dead:
        record = json.loads(value)
        assert record["reason"] == headers[kc.HEADER_REASON].decode()
    wait_for(lambda: counts(r, "test:done") == {0: 1, 5: 1}, 60, what="the ok and the flaky record")
    assert counts(r, "test:attempts")[2] == 3, (
        "the raising record ran max-attempts times (via the retry topic)"
    )
    w.terminate()
    assert w.wait(60) == 0


def test_kill_9_of_a_worker_loses_nothing(r: redis.Redis, kafka_url: str, spawn_worker: SpawnWorker) -> None:
    queue = f"k{uuid.uuid4().hex[:8]}"
    pub = sluiceway.Publisher(kafka_url)
    pub.publish(queue, {"n": -1})  # creates the topics, with the broker's default partitions
    pub.close()
    # Four partitions, so two workers share the topic.
    from confluent_kafka.admin import AdminClient, NewPartitions

    admin = AdminClient({"bootstrap.servers": kc.bootstrap(kafka_url)})
    for f in admin.create_partitions([NewPartitions(kc.topic(NS, queue), 4)]).values():
        f.result(30)
    pub = sluiceway.Publisher(kafka_url)
    pub.publish_batch(queue, ({"n": i, "sleep": 0.05} for i in range(300)))
    pub.close()
    victim = spawn_worker("-f", "tests.tasks:record", "-q", queue, "-c", "4", **kafka_env(kafka_url))
    wait_for(lambda: r.hlen("test:seen") >= 30, 120, what="the first worker to run tasks")
    survivor = spawn_worker("-f", "tests.tasks:record", "-q", queue, "-c", "8", **kafka_env(kafka_url))
    wait_for(lambda: r.hlen("test:seen") >= 80, 120, what="progress with two workers")
    victim.kill()
    killed = time.monotonic()
    wait_for(
        lambda: all(i in counts(r, "test:done") for i in range(-1, 300)), 240, what="every record to finish"
    )
    seen = counts(r, "test:seen")
    duplicates = sum(v - 1 for v in seen.values())
    print(
        f"[figures] worker kill -9: messages=301 lost=0 duplicates={duplicates} dead_lettered=0 "
        f"seconds_until_all_done={time.monotonic() - killed:.1f}"
    )
    survivor.terminate()
    assert survivor.wait(60) == 0


def test_the_fleet_qps_limit_holds_on_kafka_and_sigterm_drains(
    r: redis.Redis, kafka_url: str, spawn_worker: SpawnWorker
) -> None:
    from tests.support.starts import start_bound, worst_window

    queue = f"q{uuid.uuid4().hex[:8]}"
    qps = 20
    pub = sluiceway.Publisher(kafka_url)
    pub.publish_batch(queue, ({"n": i} for i in range(400)))
    pub.close()
    workers = [
        spawn_worker(
            "-f", "tests.tasks:record", "-q", queue, "-c", "8", "--qps", str(qps), **kafka_env(kafka_url)
        )
        for _ in range(2)
    ]
    wait_for(lambda: r.llen("test:starts") >= 100, 120, what="100 starts under the limit")
    for w in workers:
        w.terminate()
    codes = [w.wait(60) for w in workers]
    starts = sorted(float(x) for x in r.lrange("test:starts", 0, -1))
    # Each task reads the clock after its thread runs: the window allows that record lag, as the
    # conformance suite's does (tests/support/starts.py says why).
    worst = worst_window(starts)
    print(f"[figures] kafka qps {qps} x 2 workers: starts={len(starts)} worst_1s_window={worst} exit={codes}")
    assert worst <= start_bound(qps)
    assert codes == [0, 0]
