"""The worker engine on an in-memory link: thread executors taking unlimited batches from the
shared deque, and finishing their successes together.

Fast and broker-free, so each case can look at every settle. The same behaviour on real brokers
is covered by tests/test_worker_redis.py (timeouts, drain) and tests/conformance/."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import pytest

from sluiceway import codec
from sluiceway.settings import WorkerSettings
from sluiceway.transports.base import (
    Batch,
    Delivery,
    Done,
    Exchanged,
    Outcomes,
    PendingExchange,
    SlotLease,
    Token,
    WorkerSide,
)
from sluiceway.worker import Worker
from tests.support.workers import wait_for


class MemoryLink:
    """Hands out ``{"i": i}`` with token ``i``, records every outcome; thread-safe enough for the
    worker, which makes one round trip at a time."""

    outage_errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self, messages: int, kwargs: Callable[[int], dict[str, Any]] = lambda i: {"i": i}) -> None:
        self.queue = list(range(messages))
        self.kwargs = kwargs
        self.lock = threading.Lock()
        # Tokens are the message numbers.
        self.acked: Counter[int] = Counter()
        self.retried: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.given_back: list[int] = []
        self.batches: list[int] = []

    def add(self, messages: int) -> None:
        with self.lock:
            start = max([*self.queue, *self.acked, *self.retried, *self.given_back, -1]) + 1
            self.queue += range(start, start + messages)

    def begin_exchange(self, outcomes: Outcomes, wanted: int) -> PendingExchange:
        with self.lock:
            self.acked.update(cast(Sequence[int], outcomes.acks))
            self.retried += [cast(int, r.token) for r in outcomes.retries]
            self.dead += [(cast(int, d.token), d.reason) for d in outcomes.deads]
            taken, self.queue = self.queue[:wanted], self.queue[wanted:]
            if taken:
                self.batches.append(len(taken))
        deliveries = [Delivery(codec.encode(self.kwargs(i)), i) for i in taken]
        return Done(Exchanged(Batch(deliveries)))

    def give_back(
        self,
        tokens: Sequence[Token],
        slots: SlotLease | None,
        unused_slots: int,
        *,
        redelivered: bool = False,
    ) -> int:
        with self.lock:
            self.given_back += cast(Sequence[int], tokens)
        return len(tokens)

    def acquire_slot(self) -> float:
        return 0.0

    def renew(self, tokens: Sequence[Token]) -> int:
        return len(tokens)

    def recover(self) -> int:
        return 0

    def adopt_orphans(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def settled(self) -> int:
        with self.lock:
            return sum(self.acked.values()) + len(self.retried) + len(self.dead)


class _Coordinator:
    def write_heartbeat(self, hb: object, ttl_seconds: float) -> None:
        pass

    def deregister(self) -> None:
        pass


@contextmanager
def running_worker(link: MemoryLink, fn: Callable[..., Any], **settings: Any) -> Iterator[Worker]:
    s = WorkerSettings(function="tests:fn", queue="q", log_level="WARNING", **settings)
    side = WorkerSide(link, _Coordinator(), link.outage_errors, lambda: 0, lambda: None)  # type: ignore[arg-type]
    worker = Worker(s, fn, side, install_signals=False)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.request_stop("test over")
        thread.join(30)
        assert not thread.is_alive(), "the worker did not stop"
        assert codes == [0]


def test_every_message_is_acked_once_from_the_shared_deque() -> None:
    link = MemoryLink(20_000)
    with running_worker(link, lambda i: None, concurrency=4):
        wait_for(lambda: link.settled() == 20_000, 30, what="every message settled")
    assert set(link.acked) == set(range(20_000))
    assert max(link.acked.values()) == 1
    assert not link.retried and not link.dead and not link.given_back
    # Batches bigger than the executors were fetched (or this test proves nothing new).
    assert max(link.batches) > 4 * 4


def test_a_long_task_holds_back_neither_later_messages_nor_what_its_thread_finished_before() -> None:
    release = threading.Event()
    started_long = threading.Event()
    long_thread: list[int] = []
    ran_on: dict[int, int] = {}

    def task(i: int) -> None:
        ran_on[i] = threading.get_ident()
        if i == 100:
            long_thread.append(threading.get_ident())
            started_long.set()
            release.wait(30)

    link = MemoryLink(200)
    with running_worker(link, task, concurrency=2, prefetch=198):
        assert started_long.wait(10)
        # While the long task runs, every other message runs on the other thread and is acked,
        # and so is what the long task's thread finished before it: the supervisor finished it.
        wait_for(lambda: sum(link.acked.values()) == 199, 15, what="199 acks while task 100 runs")
        assert 100 not in link.acked
        release.set()
        wait_for(lambda: sum(link.acked.values()) == 200, 15, what="the long task's ack")
    # Or this test proved nothing: the long task's thread had successes waiting behind it.
    assert [i for i in range(100) if ran_on[i] == long_thread[0]]
    assert link.batches[0] > 2 * 2
    assert max(link.acked.values()) == 1


def test_a_timed_out_task_fails_alone_and_the_worker_goes_on() -> None:
    def task(i: int) -> None:
        if i == 3:
            while True:  # Python-level, so the injected TaskTimeout can surface
                time.sleep(0.01)

    link = MemoryLink(100)
    with running_worker(
        link, task, concurrency=2, prefetch=98, timeout_seconds=0.5, max_attempts=1, drain_seconds=5
    ) as worker:
        wait_for(lambda: link.settled() == 100, 20, what="every message settled")
        assert link.dead == [(3, "timeout")]
        assert set(link.acked) == set(range(100)) - {3}
        link.add(500)  # the replacement executor and the other one run the next batches
        wait_for(lambda: link.settled() == 600, 20, what="the next batch settled")
        assert len(worker.retired) == 1
    assert max(link.acked.values()) == 1
    assert not link.retried


def test_draining_hands_back_only_the_last_fetched_and_loses_nothing() -> None:
    gate = threading.Event()
    entered = threading.Event()

    def task(i: int) -> None:
        entered.set()
        gate.wait(10)

    link = MemoryLink(400)
    with running_worker(link, task, concurrency=2, prefetch=398, drain_seconds=10) as worker:
        entered.wait(10)
        stopper = threading.Thread(target=worker.request_stop, args=("test",))
        stopper.start()
        stopper.join()
        wait_for(lambda: link.given_back, 10, what="a hand-back")
        gate.set()
    done = set(link.acked)
    back = set(link.given_back)
    assert done.isdisjoint(back)
    assert done | back | set(link.queue) == set(range(400))
    assert len(link.given_back) == len(back)  # none handed back twice
    assert 1 <= len(done) <= 2 + 2  # the running ones, and at most one more per executor
    # Started in the order fetched: no finished message sits behind an unstarted one, which on
    # Kafka (a commit is the finished prefix) the next owner would run again.
    assert max(done) < min(back)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_failures_among_batched_successes_keep_their_own_path(concurrency: int) -> None:
    def task(i: int) -> None:
        if i % 7 == 0:
            raise ValueError(f"no {i}")

    link = MemoryLink(700)
    with running_worker(link, task, concurrency=concurrency, max_attempts=1):
        wait_for(lambda: link.settled() == 700, 20, what="every message settled")
    assert sorted(t for t, _ in link.dead) == list(range(0, 700, 7))
    assert {r for _, r in link.dead} == {"error"}
    assert set(link.acked) == set(range(700)) - set(range(0, 700, 7))


def _required_only(i: int) -> None:
    return None


def _with_a_default(i: int, j: int = 0) -> None:
    return None


@pytest.mark.parametrize(
    ("fn", "shapes"),
    [
        # Every parameter required: the names must be exactly those.
        (_required_only, [({"i": 1}, True), ({"i": 1, "x": 2}, False), ({}, False), ({"x": 1}, False)]),
        (
            _with_a_default,
            [({"i": 1}, True), ({"i": 1, "j": 2}, True), ({"j": 2}, False), ({"i": 1, "x": 2}, False)],
        ),
    ],
)
def test_arguments_that_do_not_fit_the_function_are_dead_lettered_and_the_rest_run(
    fn: Callable[..., None], shapes: list[tuple[dict[str, Any], bool]]
) -> None:
    link = MemoryLink(400, lambda i: shapes[i % len(shapes)][0])
    with running_worker(link, fn, concurrency=2):
        wait_for(lambda: link.settled() == 400, 30, what="every message settled")
    fits = {i for i in range(400) if shapes[i % len(shapes)][1]}
    assert set(link.acked) == fits
    assert sorted(link.dead) == sorted((i, "bad_arguments") for i in range(400) if i not in fits)
