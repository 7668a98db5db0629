"""A stopping Kafka worker stops: close() after a broker restart fenced the group, and close() with
the broker down, each return within the one budget the transport sets itself (CLOSE_SECONDS for
the poll thread, the final commits, leaving the group and the flush), never after minutes.

The bounds asserted here are correctness bounds, not performance figures: every part of close()
is a join or a deadline, so on a loaded machine it takes its timeouts and little more, while the
failures these tests guard against took minutes (consumer.close() of a fenced member was seen to
block over 145 s)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from sluiceway.transports import kafka_common as kc
from sluiceway.transports.base import Delivery, Outcomes
from sluiceway.transports.kafka import (
    CLOSE_SECONDS,
    KafkaSink,
    KafkaTransport,
)
from tests.support import kafka_topics
from tests.support.kafka_server import KafkaServer
from tests.support.workers import wait_for

pytestmark = pytest.mark.slow
NS = "kc"
SESSION_SECONDS = kc.SESSION_TIMEOUT_MS / 1000
# What a loaded 2-core machine adds to close()'s own timeouts: thread starts and joins, the poll
# thread's last POLL_TIMEOUT, a producer flush with nothing to send. Seconds of it, not minutes.
SLACK = 10.0
DRAIN_SECONDS = 5.0  # the transports' revoke drain, kept short: close() cuts a drain short anyway


@pytest.fixture
def queue() -> str:
    return f"q{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker(kafka_server: KafkaServer, kafka_url: str) -> Iterator[KafkaServer]:
    """The session broker, running again after the test whatever the test did to it."""
    del kafka_url  # started by its fixture
    yield kafka_server
    kafka_server.ensure_running()


def create(url: str, queue: str, partitions: int) -> None:
    kafka_topics.create(url, NS, queue, partitions)


def committed(url: str, queue: str, partitions: int) -> list[int]:
    return kafka_topics.committed(url, NS, queue, partitions)


def work_partitions(t: KafkaTransport) -> int:
    with t.cond:
        return sum(1 for topic, _ in t.assigned if topic == t.topic)


def fetch_until(t: KafkaTransport, n: int, timeout: float = 120.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"fetched {len(got)} of {n}"
        got += t.fetch(n - len(got), 0.5)
    return got


def stall(broker: KafkaServer) -> None:
    assert broker.proc is not None
    os.killpg(broker.proc.pid, signal.SIGSTOP)  # the JVM runs in its own process group


def resume(broker: KafkaServer) -> None:
    if broker.proc is not None:
        os.killpg(broker.proc.pid, signal.SIGCONT)


def timed_close(t: KafkaTransport) -> float:
    started = time.monotonic()
    t.close()
    return time.monotonic() - started


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


def test_close_after_a_broker_restart_fenced_the_group_returns_within_its_bounds(
    broker: KafkaServer, queue: str
) -> None:
    """Two members split a 4-partition topic; the broker stays down until both clients have given
    their session up (kafka_lost: their partitions are lost), then comes back. Once the group has
    formed again and one member holds work partitions, each member is closed: first one that
    holds none (lost, moved to another member, not given back: the member seen to hang), then
    the other."""
    create(broker.url, queue, 4)
    with capture_logs() as logs:
        a = KafkaTransport(broker.url, NS, queue, "a", drain_seconds=DRAIN_SECONDS)
        b = KafkaTransport(broker.url, NS, queue, "b", drain_seconds=DRAIN_SECONDS)
        try:
            wait_for(
                lambda: work_partitions(a) > 0 and work_partitions(b) > 0,
                180,
                what="both members to hold work partitions",
            )
            broker.stop()
            # The client gives its session up after session.timeout.ms without an answer from
            # the coordinator; the rest of the timeout is the loaded machine's.
            wait_for(
                lambda: a.lost > 0 and b.lost > 0, SESSION_SECONDS + 120, what="both members' kafka_lost"
            )
            broker.start()
            wait_for(
                lambda: work_partitions(a) > 0 or work_partitions(b) > 0,
                240,
                what="the group to form again after the restart",
            )
            first, second = (a, b) if work_partitions(a) == 0 else (b, a)
            took = [timed_close(first), timed_close(second)]
        finally:
            a.close()
            b.close()
    # Whatever close() waits for (a revoke callback the restart set off, its own commits, the
    # consumers' leave), it is cut at CLOSE_SECONDS. A fenced member's close() was seen to block
    # for over 145 s, far past this.
    bound = CLOSE_SECONDS + SLACK
    print(
        f"[figures] close after a fence: not_reassigned={took[0]:.1f}s holding={took[1]:.1f}s "
        f"lost=a:{a.lost},b:{b.lost} close_timeouts={len(events(logs, 'kafka_close_timeout'))} bound={bound:.0f}s"
    )
    assert events(logs, "kafka_lost"), "the outage fenced no member: the test did not test a fence"
    assert max(took) < bound, f"close() took {took} s after a fence, over {bound:.0f} s"


@pytest.mark.parametrize("outage", ["stopped", "stalled"])
def test_close_with_the_broker_out_returns_within_the_commit_and_close_bounds(
    broker: KafkaServer, queue: str, outage: str
) -> None:
    """Records finished after the broker went out leave a final commit that cannot be made: it
    is given up at COMMIT_RETRY_SECONDS (logged, the next owner redoes those records) and the
    consumers get what is left of CLOSE_SECONDS to leave, so close() returns within it.

    ``stopped``: the broker's port refuses connections; the client's own session timeout ends a
    blocked commit after session.timeout.ms. ``stalled`` (SIGSTOP, as a long GC pause or a frozen
    host): the connections stay open and the commit request waits for an answer for the
    client's socket.timeout.ms (60 s), which only the transport's own deadline cuts short."""
    create(broker.url, queue, 2)
    KafkaSink(broker.url).send(NS, queue, [b'{"i": %d}' % i for i in range(20)])
    with capture_logs() as logs:
        t = KafkaTransport(broker.url, NS, queue, "w", drain_seconds=DRAIN_SECONDS)
        try:
            ds = fetch_until(t, 20)
            t.settle(Outcomes(acks=[d.token for d in ds[:10]]))
            wait_for(
                lambda: sum(max(o, 0) for o in committed(broker.url, queue, 2)) == 10,
                120,
                what="the first 10 records' commit",
            )
            if outage == "stopped":
                broker.stop()
            else:
                stall(broker)
            # Finished with the broker out: a commit only close() can still try to make.
            t.settle(Outcomes(acks=[d.token for d in ds[10:]]))
            took = timed_close(t)
        finally:
            t.close()
            if outage == "stalled":
                resume(broker)
                # Frozen past its KRaft broker session, the broker is fenced by its own
                # controller when it wakes, and creating topics then timed out for the next
                # test (30 s); a restart hands that test a broker that serves at once.
                broker.stop()
    bound = CLOSE_SECONDS + SLACK
    failed = events(logs, "kafka_final_commit_failed")
    print(
        f"[figures] close with the broker {outage}: {took:.1f}s final_commit_failed={len(failed)} "
        f"close_timeouts={len(events(logs, 'kafka_close_timeout'))} bound={bound:.0f}s"
    )
    assert failed, f"the final commit with the broker {outage} was not reported as failed"
    assert events(logs, "kafka_closed"), "close() did not log its steps' times"
    assert took < bound, f"close() with the broker {outage} took {took:.1f} s, over {bound:.0f} s"
