"""The worker: fetch under the fleet-wide rate limit, run the function, settle, heartbeat, drain.

Threads, each with one job:
- executors take messages in slot order, wait for each one's slot, and run the user's function
  (threads, or one asyncio loop fed by a pump thread for ``async def``). The executor that finds
  no message waiting makes the worker's round trip to the broker: it settles everything finished
  since the last one and leases the next batch with its rate-limit slots, in one pipeline. No
  thread exists only to move messages, so a fast task pays for no hand-off between threads.
  Without a rate limit, thread executors take messages from a shared deque (one atomic
  ``popleft`` each, in the order fetched, which Kafka's commits need) and finish successes
  together: no blocking hand-off and no shared lock per message;
- the supervisor renews leases, writes heartbeats, returns expired leases of dead workers,
  enforces task timeouts, and settles finished work when no executor came by to do it (also
  what an executor finished before it entered a long task).
The main thread waits for a signal and then drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import math
import queue
import random
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import repeat
from typing import Any

from sluiceway import __version__, codec, deadletter, procpool, procwire, result_record
from sluiceway.backoff import retry_delay
from sluiceway.contract import Heartbeat
from sluiceway.errors import Reject, RetryLater
from sluiceway.loading import load_function
from sluiceway.log import get_logger
from sluiceway.metrics import WorkerMetrics
from sluiceway.ratemeter import RateMeter
from sluiceway.settings import WorkerSettings
from sluiceway.transports.base import (
    DeadLetter,
    Delivery,
    Outcomes,
    PendingExchange,
    Retry,
    SlotLease,
    Token,
    WorkerSide,
)


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # unexpected error; see the log
    USAGE = 2  # bad settings or flags
    IMPORT = 3  # the function could not be imported
    STUCK = 4  # too many tasks ignored their timeout; only a restart frees their threads


__all__ = ["ExitCode", "Reject", "RetryLater", "Worker", "load_function"]


class TaskTimeout(Exception):  # noqa: N818
    """Injected into a task thread that ran past its timeout."""


class Outcome(IntEnum):
    OK = 0
    RETRY = 1
    DEAD = 2


@dataclass(slots=True)
class Task:
    delivery: Delivery
    due: float  # monotonic time of its rate-limit slot
    slots: SlotLease | None = None  # the rate-limit lease its slot came from
    message: codec.Message | None = None
    started: float = 0.0
    finished: bool = False  # set once, under the worker's lock, by whoever settles it first
    value: Any = None  # what the function returned: a call's result
    error: BaseException | None = None  # what it raised


@dataclass(slots=True)
class Settlement:
    task: Task
    outcome: Outcome
    payload: bytes = b""  # RETRY: the next attempt; DEAD: the dead-letter entry
    delay: float = 0.0
    reason: str = ""
    reply: tuple[str, bytes] | None = None  # (reply key, result record) of a call


_STOP = object()
_WAKE = object()  # room was freed while a refill was waiting for it
# How long finished work may wait for an executor's round trip before the supervisor settles it.
SETTLE_LATENCY = 0.05
SEND_AHEAD_MIN_PREFETCH = 16
SETTLE_BATCH = 1000  # outcomes per round trip at most, so one round trip stays short
REFILL_POLL = 0.005  # seconds to wait for a refill another thread is making
RATE_INTERVAL = 0.1  # seconds between estimates of the processing rate, for the prefetch
SETTLE_AFTER_GRACE = 5.0  # seconds past the drain's grace that failed settlements are retried
RECENT = 4096  # task durations the heartbeat's latency quantiles are taken from, at most
# Marks a task whose slot came from a single-slot request after its leased slot went stale.
_RESLOTTED = SlotLease(tat="", interval_us=0.0)


@dataclass(slots=True)
class _Lane:
    """A thread executor's state shared with the supervisor, which may finish the executor's
    successes while it is inside a long task. The executor appends to ``done`` without a lock;
    whoever finishes them takes them out under ``lock``, so each success is finished once."""

    # Held by the executor while it clears its `running` entry or finishes successes, and by the
    # supervisor while it decides to interrupt that task: so a timeout is never injected into the
    # next task, nor between taking successes from `done` and finishing them.
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: deque[tuple[Task, float]] = field(default_factory=deque)  # successes, with durations
    flushed_at: float = 0.0


@dataclass(slots=True)
class _InTransit:
    pending: PendingExchange
    done: list[Settlement]  # the outcomes it settles
    oks: list[Task]  # and the successes it acks
    wanted: int
    sent_at: float


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        function: Callable[..., Any],
        side: WorkerSide,
        *,
        install_signals: bool = True,
        results: result_record.ResultSink | None = None,
    ) -> None:
        self.s = settings
        self.fn = function
        self.is_async = inspect.iscoroutinefunction(function)
        if settings.concurrency_mode == "asyncio" and not self.is_async:
            raise ValueError("concurrency mode asyncio needs an async def function")
        if settings.concurrency_mode == "process" and self.is_async:
            raise ValueError("concurrency mode process runs plain def functions; async def runs on asyncio")
        # Process mode: one child per task at once; this process keeps all broker I/O.
        self.pool = (
            procpool.ChildPool(settings.function, settings.concurrency)
            if settings.concurrency_mode == "process"
            else None
        )
        self.signature = _signature_or_none(function)
        self.arg_names, self.required_args = _argument_sets(self.signature)
        # A function whose every parameter is required takes exactly those names: one
        # comparison per message instead of two subset tests.
        self.exact_args = self.arg_names if self.arg_names == self.required_args else None
        self.worker_id = settings.effective_worker_id
        # The worker knows no broker: it moves messages through the link, tells the fleet about
        # itself through the coordinator, and treats the side's outage errors as "try again".
        self.link = side.link
        self.coordinator = side.coordinator
        self.outages = side.outage_errors
        self.log = get_logger(
            taskqueue=settings.taskqueue or settings.queue, queue=settings.queue, worker=self.worker_id
        )
        self.metrics = WorkerMetrics(settings.taskqueue or settings.queue, settings.queue)
        self.metrics.round_trips = side.round_trips
        self.install_signals = install_signals
        # Writes calls' results; the process entry point builds it (the engine knows no Redis).
        self.results = results

        self.capacity = settings.concurrency + self._prefetch(0.0)
        self.lock = threading.Lock()
        self.held: dict[Token, Task] = {}  # every lease we hold and have not settled
        # Thread ident (or the task's id on asyncio) -> running task. A thread executor sets its
        # own entry without a lock and clears it under its lane's lock (see _Lane); readers copy.
        self.running: dict[int, Task] = {}
        self.lanes: dict[int, _Lane] = {}  # thread executor's ident -> its lane
        # Unlimited batches for thread executors (see _run_pending); asyncio and process mode
        # take theirs from `ready` (a child's round trip dwarfs the hand-off).
        self.pending: deque[Task] = deque()
        self.use_pending = not self.is_async and self.pool is None
        self.ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Finished and not yet settled; appended by any thread, taken only under exchange_lock.
        self.unsettled: deque[Settlement] = deque()
        # Successes of thread executors with no result to write, the path of nearly every message:
        # the Task stands for its own settlement (an ack), so none is built per message (that was
        # a sixth of the engine's CPU for a no-op task). Changed only under `lock`.
        self.unsettled_ok: list[Task] = []
        self.exchange_lock = threading.Lock()  # one round trip to the broker at a time
        self.awaiting_room = False  # a refill found no room; the next finish wakes it
        self.next_fetch = 0.0  # monotonic: the queue was empty or the rate limit said wait
        self.next_exchange = 0.0  # monotonic: back-off after a failed round trip
        self.idle_wait = 0.001
        self.exchange_failures = 0
        self.rate = 0.0  # messages/s, for the automatic prefetch
        self.rate_at = time.monotonic()
        self.rate_count = 0
        self.last_slots: SlotLease | None = None
        self.in_transit: _InTransit | None = None  # a round trip sent and not yet read
        self.last_sent = 0.0  # monotonic time the last round trip was sent
        self.send_ahead_below = 0  # ready-queue length under which the next round trip is sent

        self.stopping = threading.Event()  # stop fetching
        self.stopped = threading.Event()  # everything settled or handed back
        self.fatal: tuple[ExitCode, str] | None = None
        self.state = "running"
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.processed = 0
        self.failed = 0
        self.dead_lettered = 0
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT)  # (finished, duration)
        self.ran = 0  # tasks that ran and finished, either way: the heartbeat's rate counts them
        self.rate_meter = RateMeter(self.started_mono)
        # Durations of successes not yet in `metrics` and `recent`, appended under `lock`; folded
        # in per round trip, since doing it per message was a fifth of the CPU of a no-op task in a
        # profile.
        self.uncounted: list[float] = []
        self.executors: list[threading.Thread] = []
        self.retired: set[int] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        # Free places on the event loop; the pump takes one before it hands over a task, so
        # prefetched messages wait in `ready`, where a drain hands them back at once.
        self.async_room = threading.Semaphore(settings.concurrency)
        self.threads: list[threading.Thread] = []

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self) -> ExitCode:
        if self.install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.log.info(
            "worker starting",
            function=self.s.function,
            qps=self.s.qps or "unlimited",
            concurrency=self.s.concurrency,
            mode="asyncio" if self.is_async else "process" if self.pool else "thread",
            lease_seconds=self.s.lease_seconds,
        )
        self._call_with_backoff("adopt orphaned leases", self._adopt_orphans)
        if self.stopping.is_set():  # stopped while the broker was down: nothing is held yet
            return ExitCode.OK
        if self.pool is not None:
            try:
                self.pool.start()
            except procpool.ChildStartError as exc:
                self.log.error("cannot start the child processes", error=str(exc))
                return ExitCode.IMPORT
            self.log.info("child processes started", pids=self.pool.pids())
        self._start_threads()
        try:
            while not self.stopping.wait(0.2):
                pass
        finally:
            code = self._drain()
        return code

    def request_stop(self, reason: str = "requested") -> None:
        if not self.stopping.is_set():
            self.log.info("stopping: no more fetches", reason=reason)
            self.state = "draining"
            self.stopping.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.request_stop(signal.Signals(signum).name)

    def _adopt_orphans(self) -> None:
        n = self.link.adopt_orphans()
        if n:
            self.log.warning("returned leases left by a previous process with this worker id", count=n)

    def _start_threads(self) -> None:
        def spawn(name: str, target: Callable[[], None]) -> threading.Thread:
            t = threading.Thread(target=self._guard(name, target), name=f"sluiceway-{name}", daemon=True)
            t.start()
            self.threads.append(t)
            return t

        if self.is_async:
            spawn("asyncio", self._async_main)
        else:
            for _ in range(self.s.concurrency):
                self._spawn_executor()
        spawn("supervisor", self._supervise_loop)

    def _guard(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self.log.exception("internal thread crashed", thread=name)
                self.fatal = (ExitCode.FAILURE, f"thread {name} crashed: {exc!r}")
                self.request_stop(f"{name} crashed")

        return run

    def _drain(self) -> ExitCode:
        """Hand back what has not started, let running tasks finish within the grace period."""
        self.request_stop("drain")
        deadline = time.monotonic() + self.s.effective_drain_seconds
        # A round trip under way may still lease messages; let it land before collecting. Later
        # ones see `stopping` and lease nothing.
        if self.exchange_lock.acquire(timeout=15):
            try:
                if self.in_transit is not None:
                    self._receive()
            finally:
                self.exchange_lock.release()
        # Unstarted messages go back at once, so other workers can take them now.
        unstarted: list[Task] = []
        while True:
            try:
                item = self.ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Task):
                unstarted.append(item)
        with contextlib.suppress(IndexError):
            while True:
                unstarted.append(self.pending.popleft())
        self._give_back(unstarted, "not started before shutdown", return_slots=True)
        # Wait for running tasks and for their settlements to reach Redis.
        while time.monotonic() < deadline:
            self._settle_now(block=False)
            with self.lock:
                if not self.held:
                    break
            time.sleep(0.02)
        with self.lock:
            leftovers = [t for t in self.held.values() if not t.finished]
            for t in leftovers:
                t.finished = True
        if self.pool is not None:
            # Stopped before they go back: another worker must not start a message while a
            # child here still runs it. Every other child is idle by now.
            self.pool.close()
        if leftovers:
            # Counted as a redelivery: a message that keeps its worker from stopping in time
            # is dead-lettered in the end instead of stopping every worker in turn.
            self._give_back(
                leftovers,
                "still running at the end of the grace period",
                return_slots=False,
                redelivered=True,
            )
        # Outcomes that failed to reach the broker are retried until SETTLE_AFTER_GRACE past the grace
        # period. Blocking takes the lock, so a round trip another thread is making has landed
        # (or put its outcomes back) before this decides that nothing is left.
        while time.monotonic() < deadline + SETTLE_AFTER_GRACE:
            self._settle_now(block=True)
            if not self._has_unsettled() and self.in_transit is None:
                break
            time.sleep(min(0.5, max(0.01, self.next_exchange - time.monotonic())))
        for _ in range(len(self.executors) + (1 if self.is_async else 0)):
            self.ready.put(_STOP)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.stopped.set()
        try:
            self.coordinator.deregister()
        except self.outages as exc:
            self.log.warning("could not remove heartbeat on exit", error=str(exc))
        if self.results is not None:
            self.results.close()
        if self.fatal:
            self.log.error(
                "worker stopped on a fatal error", error=self.fatal[1], exit_code=int(self.fatal[0])
            )
            return self.fatal[0]
        self.log.info("worker stopped", processed=self.processed, failed=self.failed)
        return ExitCode.OK

    def _give_back(
        self, tasks: Sequence[Task], why: str, *, return_slots: bool, redelivered: bool = False
    ) -> None:
        slots = self.last_slots if return_slots else None
        # Only the newest lease's slots can go back, and only its unstarted tail: tasks start in
        # slot order, so its unstarted tasks are exactly the last slots of that lease, unless a
        # task of it that is not handed back here holds a later slot (it may still start).
        unused = sum(1 for t in tasks if t.slots is slots and t.started == 0.0) if slots else 0
        if unused:
            mine = {id(t) for t in tasks}
            last = max(t.due for t in tasks if t.slots is slots)
            with self.lock:
                if any(t.slots is slots and id(t) not in mine and t.due > last for t in self.held.values()):
                    unused = 0
        if not tasks and not unused:
            return
        tokens = [t.delivery.token for t in tasks]
        n = self._call_with_backoff(
            "hand back messages",
            lambda: self.link.give_back(tokens, slots, unused, redelivered=redelivered),
            deadline=time.monotonic() + max(5.0, self.s.lease_seconds),
        )
        with self.lock:
            for t in tasks:
                self.held.pop(t.delivery.token, None)
        if tasks:
            self.log.info("handed messages back to the queue", count=n or 0, reason=why)

    # --- fetching and dispatching ----------------------------------------------------------------

    def _prefetch(self, rate: float) -> int:
        """Messages to hold beyond the running ones.

        With a rate limit, none: a prefetched message would sit on a granted slot. Otherwise the
        configured number, or by default about 100 ms of work at the measured rate: enough to
        amortize round trips for fast tasks, yet a slow task is never hoarded away from other
        workers (and a draining worker hands prefetched messages back at once anyway).
        """
        if self.s.qps > 0:
            return 0
        if self.s.prefetch >= 0:
            return self.s.prefetch
        return min(self.s.fetch_batch, int(rate * 0.1))

    def _next_task(self) -> Any:
        """The next leased message (or ``_STOP``); ``None`` when a wait ended with none.

        Whoever finds nothing waiting makes the round trip that refills the queue, so a message
        goes from the broker's reply to the thread that runs it with no thread in between. When
        the queue runs low, the next round trip is sent ahead and read once the queue is empty,
        so the worker runs tasks while Redis works instead of waiting for it.
        """
        try:
            item = self.ready.get_nowait()
        except queue.Empty:
            wait = self._refill()
            try:
                return self.ready.get(timeout=wait) if wait > 0 else self.ready.get_nowait()
            except queue.Empty:
                return None
        if self.in_transit is None and self.ready.qsize() < self.send_ahead_below:
            self._send_ahead()
        return item

    def _refill(self) -> float:
        """Settle and lease in one round trip; returns how long to wait for a message next."""
        # Never queue on the lock: a thread woken with the lock must still wait for the GIL, so a
        # queue of waiters keeps the lock taken long after the round trip is done. Whoever holds
        # it puts messages in `ready`, which wakes this thread sooner than the short poll.
        if not self.exchange_lock.acquire(blocking=False):
            return REFILL_POLL
        try:
            if self.in_transit is not None and self._receive():
                return 0.0
            if self.pending or not self.ready.empty():
                return 0.0
            now = time.monotonic()
            if now < self.next_exchange:
                return min(self.next_exchange - now, 0.25)
            if self._exchange(fetch=now >= self.next_fetch):
                return 0.0
        finally:
            self.exchange_lock.release()
        if self.stopping.is_set():
            return 0.05
        return min(max(self.next_fetch, self.next_exchange) - time.monotonic(), 0.25)

    def _send_ahead(self) -> None:
        # Skips when the lock is taken: this thread holds a task, and the holder may be waiting
        # for a Redis that hangs. The next task taken tries again.
        if not self.exchange_lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if self.in_transit is None and now >= self.next_fetch and now >= self.next_exchange:
                self._send(fetch=True)
        finally:
            self.exchange_lock.release()

    def _settle_now(self, *, block: bool, quiet_for: float = 0.0) -> None:
        """Read a round trip left in transit and settle finished work, unless one was sent in
        the last ``quiet_for`` seconds (then the executors are doing it). ``block`` waits for a
        round trip another thread is making, whose outcomes may yet come back unsettled."""
        if not block and not self._has_unsettled() and self.in_transit is None:
            return
        if time.monotonic() - self.last_sent < quiet_for:
            return
        if not (
            self.exchange_lock.acquire(timeout=15) if block else self.exchange_lock.acquire(blocking=False)
        ):
            return
        try:
            if self.in_transit is not None:
                self._receive()
            if self._has_unsettled() and time.monotonic() >= self.next_exchange:
                self._exchange(fetch=False)
        finally:
            self.exchange_lock.release()

    def _has_unsettled(self) -> bool:
        return bool(self.unsettled or self.unsettled_ok)

    def _exchange(self, *, fetch: bool) -> int:
        """One round trip, sent and read; returns how many messages it leased."""
        return self._receive() if self._send(fetch=fetch) else 0

    def _send(self, *, fetch: bool) -> bool:
        """Send a round trip that settles what finished and leases more if there is room.

        The caller holds ``exchange_lock`` and nothing is in transit. False when there was
        nothing to send, or sending failed (the outcomes stay for the next try).
        """
        # Before the acks go out: a message the broker sees acked is already counted.
        self._account()
        done = [self.unsettled.popleft() for _ in range(min(len(self.unsettled), SETTLE_BATCH))]
        with self.lock:
            oks = self.unsettled_ok
            room = SETTLE_BATCH - len(done)
            if len(oks) > room:
                oks, self.unsettled_ok = oks[:room], oks[room:]
            else:
                self.unsettled_ok = []
        wanted = 0
        if fetch and not self.stopping.is_set():
            self._measure_rate(time.monotonic())
            with self.lock:
                # Finished messages still count in `held` until this round trip settles them.
                free = self.capacity - len(self.held) + len(done) + len(oks)
                self.awaiting_room = free <= 0
            wanted = min(free, self.s.fetch_batch)
        if not done and not oks and wanted <= 0:
            return False
        replies = [p.reply for p in done if p.reply is not None]
        if replies and not self._write_results(done, replies, oks):
            return False
        ok = Outcome.OK
        acks = [t.delivery.token for t in oks]
        acks += [p.task.delivery.token for p in done if p.outcome is ok]
        if len(acks) == len(done) + len(oks):  # the usual round trip: one pass over its outcomes
            outcomes = Outcomes(acks=acks)
        else:
            outcomes = Outcomes(
                acks=acks,
                retries=[
                    Retry(p.task.delivery.token, p.payload, p.delay)
                    for p in done
                    if p.outcome is Outcome.RETRY
                ],
                deads=[
                    DeadLetter(p.task.delivery.token, p.payload, p.reason)
                    for p in done
                    if p.outcome is Outcome.DEAD
                ],
            )
        sent_at = time.monotonic()
        try:
            pending = self.link.begin_exchange(outcomes, wanted)
        except self.outages as exc:
            self._exchange_failed(done, oks, exc)
            return False
        self.in_transit = _InTransit(pending, done, oks, wanted, sent_at)
        self.last_sent = sent_at
        return True

    def _write_results(
        self, done: list[Settlement], replies: list[tuple[str, bytes]], oks: list[Task]
    ) -> bool:
        """Write calls' results before their acks, so an acked call always has its result (a
        crash in between runs the task again, whose result is then dropped by the LTRIM)."""
        if self.results is None:
            self.log.error(
                "a call asked for a result and this worker has no result writer", count=len(replies)
            )
            return True
        try:
            self.results.write(replies)
        except self.outages as exc:
            self._exchange_failed(done, oks, exc)
            return False
        except Exception as exc:  # e.g. a reply key someone made a string: never block the acks
            self.log.error("could not write results; the callers will time out", error=str(exc))
        return True

    def _receive(self) -> int:
        """Read the round trip in transit; returns how many messages it leased."""
        transit, self.in_transit = self.in_transit, None
        assert transit is not None
        try:
            result = transit.pending.result()
        except self.outages as exc:
            self._exchange_failed(transit.done, transit.oks, exc)
            return 0
        batch = result.batch
        if result.settle_error:
            self._exchange_failed(transit.done, transit.oks, result.settle_error)
        else:
            if self.exchange_failures:
                self.log.info("the broker is reachable again", failed_round_trips=self.exchange_failures)
            self.exchange_failures = 0
        if result.gone:
            self.log.warning(
                "leases were gone at ack; those messages were requeued and may run again",
                count=result.gone,
            )
        if transit.wanted > 0:
            if batch.deliveries:
                self.idle_wait, self.next_fetch = 0.001, 0.0
            elif batch.retry_after > 0:  # rate-limited: ask again when the next slot is near
                self.idle_wait = 0.001
                self.next_fetch = transit.sent_at + min(batch.retry_after, 0.5)
            else:  # empty queue: poll with back-off
                self.next_fetch = transit.sent_at + self.idle_wait
                self.idle_wait = min(self.idle_wait * 2, 0.1)
        now = time.monotonic()
        deliveries = batch.deliveries
        tasks = list(map(Task, deliveries, [now + d.start_after for d in deliveries], repeat(batch.slots)))
        with self.lock:
            held = self.held
            for p in transit.done:
                held.pop(p.task.delivery.token, None)
            for t in transit.oks:
                held.pop(t.delivery.token, None)
            for t in tasks:
                held[t.delivery.token] = t
            if batch.slots is not None:
                self.last_slots = batch.slots
        # Batches arrive in slot order (each lease starts where the last one ended), so a FIFO
        # queue hands executors their messages in slot order too. Without slots to wait for, they
        # go to the shared deque, and only as many wake-ups as there are executors to wake.
        if self.use_pending and batch.slots is None:
            self.pending.extend(tasks)
            for _ in range(min(len(tasks), self.s.concurrency)):
                self.ready.put(_WAKE)
            return len(tasks)
        for t in tasks:
            self.ready.put(t)
        return len(tasks)

    def _exchange_failed(self, done: list[Settlement], oks: list[Task], exc: BaseException | str) -> None:
        # Keep the outcomes and try again: dropping an ack would only cause a duplicate, but
        # dropping a dead-letter entry would lose its reason. (If the broker did act before the
        # connection broke, settling again is harmless, and leases it granted expire back.)
        self.unsettled.extendleft(reversed(done))
        if oks:
            with self.lock:
                self.unsettled_ok[:0] = oks
        self.exchange_failures += 1
        delay = outage_backoff(self.exchange_failures, draw=random.random())
        self.next_exchange = time.monotonic() + delay
        self.log.warning(
            "round trip to the broker failed; retrying",
            error=str(exc),
            unsettled=len(done) + len(oks),
            retry_in=round(delay, 2),
        )

    def _measure_rate(self, now: float) -> None:
        if now - self.rate_at >= RATE_INTERVAL:
            count = self.processed + self.failed
            measured = (count - self.rate_count) / (now - self.rate_at)
            # The first figure is taken whole: a worker starts with no prefetch, and must not
            # spend its first second fetching one message per round trip.
            self.rate = measured if self.rate_count == 0 else 0.5 * self.rate + 0.5 * measured
            self.rate_at, self.rate_count = now, count
            prefetch = self._prefetch(self.rate)
            self.capacity = self.s.concurrency + prefetch
            # Send the next round trip ahead once half the prefetch is left: for fast tasks that
            # is still far more work than one round trip takes. Slow tasks prefetch too little
            # for it to matter, and a reply nobody reads soon would only age its leases.
            self.send_ahead_below = prefetch // 2 if prefetch >= SEND_AHEAD_MIN_PREFETCH else 0

    def _wait_for_slot(self, task: Task) -> bool:
        """Sleep until the task's rate-limit slot; False if a drain began meanwhile.

        A task may start at most ``qps_slot_tolerance`` after its slot. If the process stalled
        (CPU starvation, a GC pause) past that, starting now would bunch it with later slots of
        other workers and a 1-second window could exceed the limit; instead the stale slot is
        dropped (the fleet undershoots by one) and the task takes a fresh one.
        """
        while True:
            wait = task.due - time.monotonic()
            if wait > 0 and self.stopping.wait(wait):
                return False
            if self.stopping.is_set():
                return False
            if task.slots is None or time.monotonic() - task.due <= self.s.qps_slot_tolerance:
                return True
            self.metrics.reslotted += 1
            task.slots = None  # its new slot belongs to no lease that could be handed back
            while True:
                try:
                    offset = self.link.acquire_slot()
                except self.outages as exc:
                    self.log.warning("slot request failed; retrying", error=str(exc))
                    offset = -0.5
                if offset >= 0:
                    task.due = time.monotonic() + offset
                    task.slots = _RESLOTTED
                    break
                if self.stopping.wait(-offset):
                    return False

    # --- running tasks ---------------------------------------------------------------------------

    def _spawn_executor(self) -> None:
        t = threading.Thread(
            target=self._guard("executor", self._executor_loop), name="sluiceway-executor", daemon=True
        )
        self.executors.append(t)
        t.start()

    def _executor_loop(self) -> None:
        me = threading.get_ident()
        child = self.pool.claim() if self.pool is not None else None
        lane = self.lanes[me] = _Lane()
        while me not in self.retired:
            try:
                if self.pending:
                    self._run_pending(lane, me)
                    continue
                item = self._next_task()
                if item is None or item is _WAKE:
                    continue
                if item is _STOP:
                    return
                task: Task = item
                # Without a rate limit there is no slot to wait for (the common fast path).
                if self.stopping.is_set() or (task.slots is not None and not self._wait_for_slot(task)):
                    # Drain hands unstarted messages back; this one was already in our hands, its
                    # slot too when it is the newest lease's last (under a rate limit a waiting
                    # message is always here, never in `ready`).
                    self._give_back([task], "not started before shutdown", return_slots=True)
                    continue
                self._run_sync(task, me, child)
            except TaskTimeout:
                # The supervisor already settled the timed-out task and started our replacement;
                # the injected exception surfaced outside the function, so just leave (after
                # finishing what succeeded before it).
                if me in self.retired:
                    self._finish_lane(lane, time.monotonic())
                    return
                raise

    def _run_pending(self, lane: _Lane, me: int) -> None:
        """Run tasks from the shared deque until it is empty, each taken with one ``popleft``.

        Executors take tasks one at a time and in the order fetched, as from `ready`, so a long
        task holds back nothing and a drain leaves only the last-fetched unstarted (on Kafka, no
        finished record sits behind an unstarted one, which the next owner would redo). A
        success is finished with others (``_finish_lane``) once SETTLE_LATENCY has passed or the
        deque is empty; the supervisor finishes them when this thread is in a long task."""
        pending, done, running, fn = self.pending, lane.done, self.running, self.fn
        stopping, retired = self.stopping, self.retired
        lane.flushed_at = time.monotonic()
        while me not in retired:
            try:
                task = pending.popleft()
            except IndexError:
                break
            if stopping.is_set():
                self._give_back([task], "not started before shutdown", return_slots=False)
                break
            if self.in_transit is None and len(pending) < self.send_ahead_below:
                # This lane's successes first: they free the room the round trip fills, and
                # unflushed they left it a few dozen messages to ask for instead of a batch. Not
                # while another thread makes a round trip (this one would skip its own), or
                # every message would flush alone until that one is read.
                if done and not self.exchange_lock.locked():
                    self._finish_lane(lane, time.monotonic())
                self._send_ahead()
            if not self._admit(task):
                continue
            msg = task.message
            assert msg is not None
            task.started = started = time.monotonic()
            running[me] = task
            try:
                task.value = fn(**msg.kwargs)
                error: BaseException | None = None
            except BaseException as exc:
                error = exc
            with lane.lock:
                running.pop(me, None)
            if error is not None:
                self._settle_outcome(task, error)
                continue
            now = time.monotonic()
            if msg.meta.reply is not None:  # a call: its result is built with the settlement
                self._finish(Settlement(task, Outcome.OK), now - started, "", now)
                continue
            done.append((task, now - started))
            if now - lane.flushed_at >= SETTLE_LATENCY:
                self._finish_lane(lane, now)
        self._finish_lane(lane, time.monotonic())

    def _finish_lane(self, lane: _Lane, now: float) -> None:
        """Finish the successes waiting in ``lane.done`` together: one lock for all of them.

        Under the lane's lock, which the supervisor needs to inject a timeout: an exception
        raised in this thread between taking the successes and finishing them would lose them
        (never acked, renewed for ever, and on Kafka a partition's commit stuck behind them)."""
        with lane.lock:
            lane.flushed_at = now
            items: list[tuple[Task, float]] = []
            with contextlib.suppress(IndexError):
                popleft = lane.done.popleft
                while True:
                    items.append(popleft())
            if not items:
                return
            with self.lock:
                fresh = [(t, d) for t, d in items if not t.finished]
                for t, _ in fresh:
                    t.finished = True
                self.processed += len(fresh)
                self.uncounted += [d for _, d in fresh]
                self.unsettled_ok += [t for t, _ in fresh]
                if self.awaiting_room and fresh:
                    self.awaiting_room = False
                    self.ready.put(_WAKE)

    def _admit(self, task: Task) -> bool:
        """Whether ``task`` may run; when not, it is settled here (dead-lettered with its reason)."""
        try:
            verdict = self._prepare(task)
        except TaskTimeout:
            raise  # injected for an earlier task: not this message's fault
        except Exception as exc:
            self._internal_error(task, "decoding the message", exc)
            return False
        if verdict is not None:
            self._finish(verdict)
            return False
        return True

    def _prepare(self, task: Task) -> Settlement | None:
        """Decode and vet a message; a Settlement means it must not run."""
        d = task.delivery
        try:
            task.message = codec.decode(d.payload)
        except codec.DecodeError as exc:
            return self._dead(task, exc.reason, exc.detail)
        msg = task.message
        if self.s.max_message_age_seconds and msg.meta.published_at is not None:
            age = time.time() - msg.meta.published_at
            if age > self.s.max_message_age_seconds:
                return self._dead(
                    task, "expired", f"message is {age:.1f} s old, limit {self.s.max_message_age_seconds} s"
                )
        if d.redeliveries and msg.meta.attempt + d.redeliveries >= self.s.max_attempts:
            return self._dead(
                task,
                "redelivered",
                f"its lease expired {d.redeliveries} times without the task finishing (the worker died or hung)",
            )
        if self.signature is not None:
            names = msg.kwargs.keys()
            # Set checks cover plain keyword functions in well under a microsecond; binding
            # is the exact rule and also phrases the error, so it runs when those fail.
            exact = self.exact_args
            if exact is not None:
                fits = names == exact
            else:
                fits = self.arg_names is not None and names <= self.arg_names and self.required_args <= names
            if not fits:
                try:
                    self.signature.bind(**msg.kwargs)
                except TypeError as exc:
                    return self._dead(task, "bad_arguments", str(exc))
        return None

    def _run_sync(self, task: Task, thread_id: int, child: procpool.Child | None = None) -> None:
        if not self._admit(task):
            return
        assert task.message is not None
        task.started = time.monotonic()
        if task.slots is not None:
            self.metrics.start_lag.observe(task.started - task.due)
        self.running[thread_id] = task  # cleared under the lane's lock (see _Lane)
        if child is not None:
            self._run_in_child(task, thread_id, child)
            return
        try:
            task.value = self.fn(**task.message.kwargs)
            error: BaseException | None = None
        except BaseException as exc:
            error = exc
        finally:
            with self.lanes[thread_id].lock:
                self.running.pop(thread_id, None)
        if error is None:
            # What _settle_outcome does for a success, without its two calls: this is the path
            # of nearly every message.
            try:
                now = time.monotonic()
                self._finish(Settlement(task, Outcome.OK), now - task.started, "", now)
            except Exception as exc:
                self._internal_error(task, "settling the outcome", exc)
            return
        self._settle_outcome(task, error)

    def _run_in_child(self, task: Task, thread_id: int, child: procpool.Child) -> None:
        """Run a task in this executor's child; a child that times out or dies is replaced.

        The timeout is enforced here, not by the supervisor: killing the child really stops a
        CPU-bound function, and this thread is free again at once."""
        if not child.alive():  # died while idle: replace it first, so the message is not blamed
            self._replace_child(child)
        try:
            try:
                raw = child.run(task.delivery.payload, self.s.timeout_seconds)
            finally:
                with self.lanes[thread_id].lock:
                    self.running.pop(thread_id, None)
        except procpool.ChildTimedOut:
            self.log.warning(
                "task timed out; its child process was killed",
                message_id=task.message.meta.id if task.message else None,
            )
            self._settle_outcome(
                task, TaskTimeout(f"task ran longer than its timeout of {self.s.timeout_seconds} s")
            )
            self._replace_child(child)
            return
        except procpool.ChildGone as exc:
            self._child_lost(task, str(exc))
            self._replace_child(child)
            return
        try:
            task.value, error = procwire.parse_reply(raw)
        except ValueError as exc:
            self._internal_error(task, "reading the child process's reply", exc)
            return
        self._settle_outcome(task, error)

    def _child_lost(self, task: Task, why: str) -> None:
        """The child died under a task: its message goes back now, counted as a redelivery, so
        a message that keeps killing children is dead-lettered (``redelivered``) in the end."""
        with self.lock:
            if task.finished:
                return  # the drain handed it back already, then ended the children
            task.finished = True
        self.log.warning(
            "child process died running a task; its message returns to the queue",
            message_id=task.message.meta.id if task.message else None,
            error=why,
        )
        self._give_back([task], "its child process died", return_slots=False, redelivered=True)

    def _replace_child(self, child: procpool.Child) -> None:
        if self.stopping.is_set():
            child.kill()  # a draining pod starts no task, so it needs no new child
            return
        try:
            child.restart()
        except procpool.ChildStartError as exc:
            if self.stopping.is_set():
                return  # the drain closed it while it started
            self.fatal = (ExitCode.IMPORT, f"cannot replace a child process: {exc}")
            self.request_stop("a child process could not be replaced")

    def _settle_outcome(self, task: Task, error: BaseException | None) -> None:
        task.error = error
        try:
            self._complete(task, error)
        except Exception as exc:
            self._internal_error(task, "settling the outcome", exc)

    def _async_main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        pump = threading.Thread(
            target=self._guard("async-pump", self._async_pump), name="sluiceway-async-pump", daemon=True
        )
        pump.start()
        loop.run_forever()

    def _async_pump(self) -> None:
        assert self.loop is not None
        while not self.stopped.is_set():
            if not self.async_room.acquire(timeout=0.25):
                continue
            item = self._next_task()
            if item is _STOP:
                return
            if item is None or item is _WAKE:
                self.async_room.release()
                continue
            task: Task = item
            if self.stopping.is_set() or (task.slots is not None and not self._wait_for_slot(task)):
                self.async_room.release()
                self._give_back([task], "not started before shutdown", return_slots=True)
                continue
            self.loop.call_soon_threadsafe(self._start_async, task)

    def _start_async(self, task: Task) -> None:
        self.loop.create_task(self._run_async(task))  # type: ignore[union-attr]

    async def _run_async(self, task: Task) -> None:
        try:
            if not self._admit(task):
                return
            assert task.message is not None
            task.started = time.monotonic()
            if task.slots is not None:
                self.metrics.start_lag.observe(task.started - task.due)
            key = id(task)
            with self.lock:
                self.running[key] = task
            try:
                task.value = await asyncio.wait_for(self.fn(**task.message.kwargs), self.s.timeout_seconds)
                error: BaseException | None = None
            except TimeoutError:
                error = TaskTimeout(f"task ran longer than its timeout of {self.s.timeout_seconds} s")
            except BaseException as exc:
                error = exc
            finally:
                with self.lock:
                    self.running.pop(key, None)
            self._settle_outcome(task, error)
        except BaseException as exc:
            # Anything else would be swallowed by asyncio and leave the message in flight, its
            # lease renewed for ever.
            if not task.finished:
                self._internal_error(task, "running the task", exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.async_room.release()

    def _complete(self, task: Task, error: BaseException | None) -> None:
        now = time.monotonic()
        duration = now - task.started
        if error is None:
            self._finish(Settlement(task, Outcome.OK), duration, "", now)
            return
        msg = task.message
        assert msg is not None
        if isinstance(error, Reject):
            self._finish(
                self._dead(
                    task, "rejected", _error_text(error, bare=True) or "the function rejected the message"
                ),
                duration,
            )
            return
        reason = "timeout" if isinstance(error, TaskTimeout) else "error"
        text = deadletter.safe_text(_error_text(error))
        if msg.meta.attempt + 1 >= self.s.max_attempts:
            self._finish(
                self._dead(
                    task,
                    reason,
                    text,
                    tb=_short_traceback(error),
                    final=f"after {msg.meta.attempt + 1} attempts",
                ),
                duration,
            )
            return
        nxt = codec.next_attempt(msg, text)
        # A RetryLater delay that is not a number of seconds (inf, nan, text) gets the usual backoff.
        if (
            isinstance(error, RetryLater)
            and isinstance(error.delay, int | float)
            and math.isfinite(error.delay)
        ):
            delay = max(error.delay, 0.0)
        else:
            delay = retry_delay(
                nxt.meta.attempt,
                base=self.s.backoff_seconds,
                cap=self.s.max_backoff_seconds,
                draw=random.random(),
            )
        payload = codec.encode(nxt.kwargs, nxt.meta)
        self._finish(Settlement(task, Outcome.RETRY, payload, delay, reason), duration, error=text)

    def _dead(self, task: Task, reason: str, detail: str, *, tb: str = "", final: str = "") -> Settlement:
        context: dict[str, Any] = {
            "queue": self.s.queue,
            "namespace": self.s.namespace,
            "worker": self.worker_id,
            "failed_at": time.time(),
            "redeliveries": task.delivery.redeliveries,
        }
        if task.message is not None:
            context["message_id"] = task.message.meta.id
            context["attempts"] = task.message.meta.attempt + (1 if task.started else 0)
            context["errors"] = list(task.message.meta.errors)
        if tb:
            context["traceback"] = tb
        record = deadletter.record(
            reason=reason,
            detail=detail + (f" ({final})" if final else ""),
            payload=task.delivery.payload,
            **context,
        )
        return Settlement(task, Outcome.DEAD, record, reason=reason)

    def _internal_error(self, task: Task, where: str, exc: BaseException) -> None:
        """Settle a message whose handling failed inside the worker (a bug, not the task's).

        Never raises: one message must not take an executor down, nor stay in flight unsettled.
        It is dead-lettered with reason ``internal_error``, with the payload byte for byte.
        """
        text = deadletter.safe_text(_error_text(exc))
        with contextlib.suppress(Exception):
            self.log.error(
                "internal error while handling a message; dead-lettering it", where=where, error=text
            )
        try:
            detail = f"{where}: {text}"
            entry = deadletter.record(
                reason="internal_error",
                detail=detail,
                payload=task.delivery.payload,
                queue=self.s.queue,
                namespace=self.s.namespace,
                worker=self.worker_id,
                failed_at=time.time(),
                redeliveries=task.delivery.redeliveries,
                traceback=deadletter.safe_text(_short_traceback(exc)),
            )
        except Exception:  # the record is built from safe parts only; this is a last resort
            entry = deadletter.record(reason="internal_error", detail=where, payload=task.delivery.payload)
        self._finish(Settlement(task, Outcome.DEAD, entry, reason="internal_error"))

    def _finish(
        self, settlement: Settlement, duration: float = 0.0, error: str = "", now: float = 0.0
    ) -> None:
        """``now``: the monotonic time it finished, when the caller has read the clock already."""
        task = settlement.task
        if not now:
            now = time.monotonic()
        msg = task.message
        reply = msg.meta.reply if msg is not None else None
        ok = settlement.outcome is Outcome.OK
        if reply is not None and settlement.outcome is not Outcome.RETRY:
            # Built here, in the task's thread, so the round trip only sends it.
            settlement.reply = (
                reply,
                result_record.for_outcome(
                    reply,
                    ok=ok,
                    value=task.value,
                    reason=settlement.reason,
                    error=task.error,
                    dead_entry=settlement.payload,
                ),
            )
        with self.lock:
            if task.finished:
                return  # the supervisor already settled it (timeout), or drain handed it back
            task.finished = True
            if ok:
                self.processed += 1
                self.uncounted.append(duration)
            else:
                self.failed += 1
                if task.started:
                    self.ran += 1
                if settlement.outcome is Outcome.DEAD:
                    self.dead_lettered += 1
            self.unsettled.append(settlement)
            if self.awaiting_room:
                self.awaiting_room = False
                self.ready.put(_WAKE)
        if not ok:
            if task.started:
                self.recent.append((now, duration))
            outcome = "retried" if settlement.outcome is Outcome.RETRY else "dead_lettered"
            self.metrics.observe(duration if task.started else None, outcome, settlement.reason)
            msg_id = task.message.meta.id if task.message else None
            self.log.warning(
                "task failed" if settlement.outcome is Outcome.RETRY else "message dead-lettered",
                message_id=msg_id,
                reason=settlement.reason,
                error=error or None,
                retry_in=round(settlement.delay, 3) if settlement.outcome is Outcome.RETRY else None,
            )

    # --- supervision -----------------------------------------------------------------------------

    def _supervise_loop(self) -> None:
        next_beat = 0.0
        while not self.stopped.is_set():
            self._finish_behind_long_tasks()
            self._enforce_timeouts()
            self._settle_now(block=False, quiet_for=SETTLE_LATENCY)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.s.heartbeat_seconds
                try:
                    self._beat()
                except self.outages as exc:
                    self.log.warning("heartbeat failed; will retry", error=str(exc))
            if self.fatal and not self.stopping.is_set():
                self.request_stop(self.fatal[1])
            self.stopped.wait(SETTLE_LATENCY)

    def _beat(self) -> None:
        with self.lock:
            tokens = list(self.held)
        for i in range(0, len(tokens), 1000):
            self.link.renew(tokens[i : i + 1000])
        hb = self.heartbeat()
        self.coordinator.write_heartbeat(hb, ttl_seconds=self.s.heartbeat_seconds * 3)
        if not self.stopping.is_set():
            n = self.link.recover()
            if n:
                self.log.warning("returned expired leases of unresponsive workers to the queue", count=n)
        self.metrics.set_state(busy=hb["busy"], in_flight=hb["in_flight"])

    def _account(self) -> None:
        """Fold the successes finished since the last call into the metrics and `recent`.

        Called only by the round trip (under ``exchange_lock``), so one thread at a time updates
        the histogram. Every success waits for a round trip to be acked, so none waits long; they
        are stamped with the time of the fold, which the heartbeat's 10-second window cannot tell
        from the time each finished."""
        if not self.uncounted:
            return
        with self.lock:
            durations, self.uncounted = self.uncounted, []
            self.ran += len(durations)
        self.metrics.observe_ok(durations)
        self.recent.extend(zip(repeat(time.monotonic()), durations[-RECENT:]))

    def heartbeat(self) -> Heartbeat:
        now = time.monotonic()
        window = [(t, d) for t, d in list(self.recent) if now - t <= 10.0]
        durations = sorted(d for _, d in window)
        with self.lock:
            busy = len(self.running)
            in_flight = len(self.held)
            rate = self.rate_meter.rate(now, self.ran)
        return Heartbeat(
            worker=self.worker_id,
            pod=self.s.pod_name,
            state=self.state,
            started=self.started_at,
            time=time.time(),
            interval=self.s.heartbeat_seconds,
            concurrency=self.s.concurrency,
            busy=busy,
            in_flight=in_flight,
            processed=self.processed,
            failed=self.failed,
            dead_lettered=self.dead_lettered,
            rate=rate,
            latency_p50=_quantile(durations, 0.50),
            latency_p95=_quantile(durations, 0.95),
            latency_p99=_quantile(durations, 0.99),
            version=__version__,
        )

    def _finish_behind_long_tasks(self) -> None:
        """Finish what a thread executor finished before it entered a task that is still running
        after SETTLE_LATENCY: those successes must not wait for that task."""
        now = time.monotonic()
        for ident, t in self.running.copy().items():  # a copy: executors set entries lock-free
            lane = self.lanes.get(ident)
            if lane is not None and lane.done and now - t.started > SETTLE_LATENCY:
                self._finish_lane(lane, now)

    def _enforce_timeouts(self) -> None:
        if self.is_async or self.pool is not None:
            return  # asyncio.wait_for cancels the coroutine itself; a child is killed by its thread
        now = time.monotonic()
        running = self.running.copy()  # one C call: executors set their entries without a lock
        late = [(ident, t) for ident, t in running.items() if now - t.started > self.s.timeout_seconds]
        for ident, task in late:
            lane = self.lanes.get(ident)
            with lane.lock if lane is not None else self.lock:
                if self.running.get(ident) is not task:
                    continue  # it finished while we looked
                self.running.pop(ident)
                # A thread cannot be killed; ask it to raise, and replace it so capacity is kept.
                # Retire it first, so the thread knows to leave wherever the exception surfaces.
                self.retired.add(ident)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(TaskTimeout)
                )
            if lane is not None:  # what it finished before, which its thread may not reach
                self._finish_lane(lane, now)
            self.log.warning("task timed out", message_id=task.message.meta.id if task.message else None)
            self._settle_outcome(
                task, TaskTimeout(f"task ran longer than its timeout of {self.s.timeout_seconds} s")
            )
            self._spawn_executor()
            stuck = sum(1 for t in self.executors if t.ident in self.retired and t.is_alive())
            if stuck > self.s.concurrency:
                self.fatal = (
                    ExitCode.STUCK,
                    f"{stuck} task threads ignore their timeout; restarting the process is the only way to free them",
                )

    # --- helpers ---------------------------------------------------------------------------------

    def _call_with_backoff(self, what: str, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        failures = 0
        while True:
            try:
                result = fn()
            except self.outages as exc:
                if deadline is None and self.stopping.is_set():
                    self.log.warning(f"{what} failed; stopping without it", error=str(exc))
                    return None
                failures += 1
                delay = outage_backoff(failures, draw=1.0)
                if deadline is not None and time.monotonic() + delay > deadline:
                    self.log.error(
                        f"{what} failed; giving up, the leases will expire instead", error=str(exc)
                    )
                    return None
                self.log.warning(f"{what} failed; retrying", error=str(exc), retry_in=delay)
                time.sleep(delay)
            else:
                if failures:
                    self.log.info(f"the broker is reachable again: {what} done", failed_attempts=failures)
                return result


def outage_backoff(failures: int, *, draw: float) -> float:
    """Seconds before trying the broker (or coordination) again after ``failures`` failures in a
    row: 0.1 s, doubling up to 1 s; ``draw`` in [0, 1) spreads it over the upper half (1.0: no
    spread). The one back-off for every outage the worker meets.

    The cap is what a worker may lose after the broker comes back, so it stays short; one
    connection attempt per second per worker costs the broker nothing."""
    return retry_delay(failures, base=0.2, cap=1.0, draw=draw)


def _signature_or_none(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    # A **kwargs function accepts anything; binding would only cost time.
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return sig


def _argument_sets(sig: inspect.Signature | None) -> tuple[frozenset[str] | None, frozenset[str]]:
    """Names a call may pass by keyword, and the ones it must; ``None`` when sets cannot decide."""
    if sig is None:
        return None, frozenset()
    params = sig.parameters.values()
    if any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in params):
        return None, frozenset()
    return (
        frozenset(p.name for p in params),
        frozenset(p.name for p in params if p.default is p.empty),
    )


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _short_traceback(exc: BaseException) -> str:
    child_tb = getattr(exc, procwire.CHILD_TRACEBACK, None)
    if isinstance(child_tb, str):
        return child_tb  # the child's, not this thread's
    try:
        return "".join(traceback.format_exception(exc)[-8:])[-4000:]
    except Exception:  # a __str__ that raises: keep what can be said
        return _error_text(exc)


def _error_text(exc: BaseException, *, bare: bool = False) -> str:
    """``Type: message``; never raises, even for an exception whose ``__str__`` does."""
    try:
        text = str(exc)
    except Exception:
        text = "<the exception could not be shown>"
    return text if bare else f"{type(exc).__name__}: {text}"
