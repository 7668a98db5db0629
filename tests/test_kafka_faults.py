"""Kafka's own fault cases, on a real broker: kill -9 of a consumer, a rebalance 1 -> 3 -> 1 during
a burst, and a broker restart mid-run. Each reports messages, lost and duplicates."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluiceway.transports import kafka_common as kc
from sluiceway.transports.base import Outcomes
from sluiceway.transports.kafka import KafkaSink, KafkaTransport
from tests.support import kafka_topics
from tests.support.kafka_server import KafkaServer

pytestmark = pytest.mark.slow
NS = "kf"


def payloads(n: int) -> list[bytes]:
    return [b'{"i": %d}' % i for i in range(n)]


def create(url: str, queue: str, partitions: int) -> None:
    kafka_topics.create(url, NS, queue, partitions)


def committed(url: str, queue: str, partitions: int) -> list[int]:
    return kafka_topics.committed(url, NS, queue, partitions)


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Child:
    def __init__(self, url: str, queue: str, name: str, tmp: Path, task_seconds: float = 0.0) -> None:
        self.out = tmp / f"{name}.out"
        self.out.touch()
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.kafka_child",
                url,
                NS,
                queue,
                name,
                str(self.out),
                str(task_seconds),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[bytes]:
        return [line for line in self.out.read_bytes().splitlines() if line]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    made: list[Child] = []

    def make(url: str, queue: str, task_seconds: float = 0.0) -> Child:
        c = Child(url, queue, f"c{len(made)}", tmp_path, task_seconds)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop(signal.SIGKILL)


class InProcess:
    """A consumer in this process, on its own thread, recording what it processed."""

    def __init__(self, url: str, queue: str, name: str) -> None:
        self.t = KafkaTransport(url, NS, queue, name, create_topics=False)
        self.done: list[bytes] = []
        self.first_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = self.t.fetch(64, 0.2)
            if batch:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                self.done += [d.payload for d in batch]
                self.t.settle(Outcomes(acks=[d.token for d in batch]))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.t.close()


def report(name: str, sent: list[bytes], processed: list[bytes], **extra: object) -> tuple[int, int]:
    counts = Counter(processed)
    lost = sum(1 for p in sent if counts[p] == 0)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    print(
        f"[figures] {name}: messages={len(sent)} lost={lost} duplicates={duplicates} dead_lettered=0 {more}"
    )
    return lost, duplicates


def test_kill_9_of_a_consumer_moves_its_partitions(
    kafka_url: str, tmp_path: Path, children: Callable[..., Child]
) -> None:
    queue = f"k{uuid.uuid4().hex[:8]}"
    create(kafka_url, queue, 4)
    sent = payloads(400)
    KafkaSink(kafka_url).send(NS, queue, sent, keys=[b"%d" % i for i in range(400)])
    victim = children(kafka_url, queue, task_seconds=0.02)
    wait_for(lambda: len(victim.lines()) >= 40, 120, "the first consumer to run records")
    survivor = InProcess(kafka_url, queue, "survivor")
    try:
        # Let the group settle on two members, then kill the one holding records mid-task.
        wait_for(lambda: survivor.first_at is not None, 120, "the second consumer to get a partition")
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        before = len(survivor.done)
        wait_for(
            lambda: len(set(victim.lines()) | set(survivor.done)) >= len(sent), 180, "every record to run"
        )
        moved_after = time.monotonic() - killed_at
        lost, _duplicates = report(
            "kill -9",
            sent,
            victim.lines() + survivor.done,
            seconds_until_all_ran=f"{moved_after:.1f}",
            session_timeout_s=kc.SESSION_TIMEOUT_MS / 1000,
            survivor_ran_before_kill=before,
        )
        assert lost == 0
    finally:
        survivor.close()


def test_rebalance_1_3_1_during_a_burst_loses_nothing_and_never_commits_past_unfinished(
    kafka_url: str, children: Callable[..., Child]
) -> None:
    queue = f"r{uuid.uuid4().hex[:8]}"
    partitions = 6
    create(kafka_url, queue, partitions)
    sent = payloads(1200)
    KafkaSink(kafka_url).send(NS, queue, sent, keys=[b"%d" % i for i in range(len(sent))])
    first = children(kafka_url, queue, task_seconds=0.01)
    wait_for(lambda: len(first.lines()) >= 100, 120, "the first consumer to start")
    more = [children(kafka_url, queue, task_seconds=0.01) for _ in range(2)]
    wait_for(lambda: all(len(c.lines()) > 0 for c in more), 120, "the new consumers to get partitions")
    for c in more:
        c.stop(signal.SIGTERM)  # scale back to 1: each drains, commits and leaves
    every = [first, *more]
    wait_for(lambda: len({p for c in every for p in c.lines()}) >= len(sent), 240, "every record to run")
    first.stop(signal.SIGTERM)
    processed = [p for c in every for p in c.lines()]
    lost, _duplicates = report("rebalance 1->3->1", sent, processed, consumers=3)
    assert lost == 0
    # Every record was processed before the consumers exited, so the commits reached the end; a
    # commit past an unfinished record would have shown as a lost record (it never runs again).
    assert sum(committed(kafka_url, queue, partitions)) == len(sent)


def test_broker_restart_mid_run_loses_nothing(kafka_server: KafkaServer, kafka_url: str) -> None:
    queue = f"s{uuid.uuid4().hex[:8]}"
    create(kafka_url, queue, 2)
    sent = payloads(600)
    sink = KafkaSink(kafka_url)
    sink.send(NS, queue, sent[:300])
    consumer = InProcess(kafka_url, queue, "through-restart")
    try:
        wait_for(lambda: len(consumer.done) >= 50, 120, "consumption to start")
        kafka_server.restart()
        sink.send(NS, queue, sent[300:])
        wait_for(lambda: len(set(consumer.done)) >= len(sent), 240, "every record to run after the restart")
        lost, _duplicates = report(
            "broker restart", sent, consumer.done, transport_errors=len(consumer.t.errors)
        )
        assert lost == 0
    finally:
        consumer.close()
        sink.close()
