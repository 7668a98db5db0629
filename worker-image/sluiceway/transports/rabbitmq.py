"""The RabbitMQ transport (pika): durable queues, manual acks after success, retries that wait in
the broker, a dead-letter queue with reasons, reconnects, and a publisher with confirms.

Whoever holds ``io_lock`` drives the connection (pika's ``BlockingConnection`` is not
thread-safe): the worker thread that fetches turns pika's loop itself, so the deliveries it takes
are parsed in that thread and its acks are written there, with no hand-over to an I/O thread
(on one core under the GIL, each hand-over cost more than the message). A keeper thread turns
the loop only when no other thread has for :data:`KEEP_IDLE` (every task long, or the worker
idle): a connection whose loop stops turning misses heartbeats and is dropped by the broker, and
a consumer cancelled by the broker, a dropped connection, unflushed acks and stale buffered
deliveries must be seen during a long task too. The keeper also reconnects, with back-off.

How many messages a worker holds:

- **Without a rate limit** it consumes (``basic_consume``) with a prefetch that follows the
  worker's free capacity: each ``fetch(n)`` says the worker has room for ``n`` beyond what it
  holds, and the window changes by the rule of
  :func:`~sluiceway.transports.rabbitmq_topology.new_prefetch` (a large growth at once, small
  changes and shrinking at most once a second). A growth opens one more consumer for the
  difference (a quorum queue can return, counted, what a cancelled consumer had checked out);
  a shrink re-subscribes one consumer with a new ``basic_qos``. A delivery that waits in the local buffer
  longer than :data:`BUFFER_MAX_AGE` goes back to the queue, so ``consumer_timeout`` (30 min,
  node-wide on 3.10) never fires on a message that never started.
- **With a rate limit** the worker takes its slots from the fleet limiter first
  (:class:`~sluiceway.transports.gated.Gated`, for at most the messages ready), then
  ``fetch(n)`` opens a consumer whose prefetch is exactly ``n`` (or the ready count, read with a
  passive declare unless the last fetch filled its grant), waits for them (or the fetch's
  timeout) and cancels it before it returns; an idle queue opens none. The broker cannot send
  a consumer more than its prefetch, so every delivery has a granted slot, and none is held
  for a slot that has not been granted: a slow queue under a low QPS cannot run into
  ``consumer_timeout``. This replaced one ``basic_get`` per message, which on
  a quorum queue is a Raft command each (about 300 gets/s for a whole fleet on the benchmark
  machine); a consume and a cancel cost two per batch, so a fetch of at most
  :data:`GET_AT_MOST` still uses ``basic_get``.

Consumers are cancelled with our own ``basic.cancel``: pika's rejects (requeues) the deliveries
that arrive between the cancel and its reply, and a quorum queue counts each such return in
``x-delivery-count``, as if the message had killed a worker. Ours keeps them; they are ours to
ack. Unstarted deliveries handed back (``give_back`` without ``redelivered``, expired buffer,
close) are republished with their count so far in :data:`~sluiceway.transports.rabbitmq_topology.HEADER_REDELIVERIES`
and the original is acked once the copy is confirmed, so a hand-back is never counted as a
poison redelivery; a delivery that was running (``redelivered``) goes back with a nack, which
counts.

Consuming and acking go through a channel of pika's asynchronous layer underneath the blocking
connection: a delivery reaches our callback straight from the frame parser, without the
blocking adapter's per-message event objects and dispatch queue, and an ack is written without
spinning the I/O loop until it is flushed. Below that, the bytes the connection receives are read
for whole deliveries first (:mod:`~sluiceway.transports.rabbitmq_frames`), which halved the
worker's CPU per message; every other frame is still pika's.

Tokens are ``(generation, delivery_tag)``. A delivery tag belongs to its channel: after a
reconnect (a new generation) old tags are forgotten, settling them counts as ``gone``, and the
broker redelivers those messages, which at-least-once allows.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pika
import pika.data
import pika.exceptions
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.channel import Channel

from sluiceway.backoff import retry_delay
from sluiceway.transports import rabbitmq_frames as frames
from sluiceway.transports import rabbitmq_topology as topo
from sluiceway.transports.base import DeadLetter, Delivery, Outcomes, Retry, Settled, Token

log = logging.getLogger("sluiceway.rabbitmq")

BUFFER_MAX_AGE: Final = 60.0  # seconds a delivery may wait, unstarted, in the local buffer
COMMAND_TIMEOUT: Final = 30.0  # a command the I/O thread never answered counts as an outage
RATE_INTERVAL: Final = 0.1  # seconds per estimate of the delivery rate (for the prefetch)
# Under a rate limit, up to this many granted slots are filled with basic_get (one Raft command
# per message on a quorum queue) rather than a consumer (a consume and a cancel: two, plus a qos).
GET_AT_MOST: Final = 2
# The keeper turns the connection's loop once no other thread has for this long; a thread that
# waits for the broker turns it in slices of WAIT_SLICE (async deliveries do not end a turn).
KEEP_IDLE: Final = 0.02
WAIT_SLICE: Final = 0.002


class RabbitMQUnavailableError(ConnectionError):
    """RabbitMQ is unreachable for now (the connection or a channel dropped)."""


outage_errors: tuple[type[BaseException], ...] = (RabbitMQUnavailableError, pika.exceptions.AMQPError)


def connection_name(role: str, queue: str | None = None) -> str:
    """What RabbitMQ's management UI and ``rabbitmqctl list_connections user_provided_name`` show
    for a connection: its role, its queue, and the pod (a pod's hostname is its name) and process
    holding it, so an operator can tell which worker holds which connection, and close one."""
    where = f"{socket.gethostname()}/{os.getpid()}"
    return " ".join(part for part in ("sluiceway", role, queue, where) if part)


def connection_parameters(url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    # A name the URL already gives (its client_properties) wins.
    properties = dict(params.client_properties or {})
    properties.setdefault("connection_name", name)
    params.client_properties = properties
    # The I/O thread turns the loop every few ms, so a short heartbeat costs nothing and finds a
    # dead broker (or a half-open TCP connection) in seconds rather than minutes.
    if params.heartbeat is None:
        params.heartbeat = 15
    params.connection_attempts = 1
    params.blocked_connection_timeout = params.blocked_connection_timeout or 30.0
    return params


@dataclass(slots=True)
class _Buffered:
    tag: int
    body: bytes
    redeliveries: int
    at: float  # monotonic time it arrived


def declare(
    channel_factory: Callable[[], BlockingChannel], name: str, arguments: dict[str, Any]
) -> BlockingChannel:
    """Declare a durable queue idempotently; returns a usable channel (a refused declare closes
    the channel it was sent on, so a fresh one comes back then).

    A queue that exists with other arguments is used as it is (queue arguments are immutable;
    change them with a policy): the declare falls back to a passive one and logs why."""
    channel = channel_factory()
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
        return channel
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: inequivalent arg
            raise
        log.warning("queue %s exists with other arguments; using it as it is: %s", name, exc.reply_text)
    channel = channel_factory()
    channel.queue_declare(name, passive=True)
    return channel


class RabbitMQTransport:
    """A :class:`~sluiceway.transports.base.Transport` on one RabbitMQ queue."""

    outage_errors = outage_errors

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        queue_type: str = topo.DEFAULT_QUEUE_TYPE,
        consume: bool = True,
        initial_prefetch: int = 16,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.queue = queue
        self.queue_type = topo.check_queue_type(queue_type)
        # False under a rate limit: each fetch takes exactly the granted count (see the module doc).
        self.consume = consume
        # Under a rate limit: the last fetch filled its whole grant from a queue that held more,
        # so the next fetch skips the ready count (see _fetch_exactly and topo.backlog_after).
        self.backlog = False
        # The ready count available() read for the fetch the link makes next (it asks right
        # before each one), so that fetch does not read it again.
        self.known_ready: int | None = None
        self.prefetch = max(1, min(initial_prefetch, topo.MAX_PREFETCH))
        self.qos = 0  # the prefetch last sent with basic_qos on this channel; I/O thread only
        self.generation = 0
        self.conn: BlockingConnection | None = None
        self.channel: BlockingChannel | None = None  # declares
        self.ch: Channel | None = None  # an asynchronous channel: consuming and acking
        self.pub: BlockingChannel | None = None  # publishing with confirms (retries, dead letters)
        # The consumers of the window, oldest first: a growing window adds one (see _resize).
        self.consumer_tags: list[str] = []
        self.consumer_lost = False  # the broker cancelled one of them; the next fetch re-subscribes
        self.channel_closed: BaseException | None = None  # why the broker closed self.ch
        self.cancelled = threading.Event()  # set by the broker's CancelOks of the last cancel
        self.cond = threading.Condition()
        self.buffer: deque[_Buffered] = deque()
        self.handed: dict[int, _Buffered] = {}  # handed to the worker, unsettled
        self.taken: dict[int, _Buffered] = {}  # scratch for settle, under cond
        # Outstanding delivery tags on the channel, and the same in delivery order (acked ones
        # are dropped lazily from its left), for one multiple-ack; I/O thread only.
        self.unacked: set[int] = set()
        self.order: deque[int] = deque()
        # Whoever holds io_lock drives the connection: the thread that fetches or settles, or the
        # keeper when none has for KEEP_IDLE. broken: a holder saw the connection fail.
        self.io_lock = threading.Lock()
        self.broken = False
        self.last_driven = 0.0
        self.closing = threading.Event()
        self.connected = threading.Event()
        self.last_error = ""
        self.reconnects = 0
        self.given_back = 0  # unstarted deliveries republished with their count (see give_back)
        self.last_reqos = 0.0
        self.rate = 0.0  # deliveries handed to the worker per second, for the prefetch
        self.rate_at = 0.0  # monotonic start of the current rate window; 0 before the first fetch
        self.handed_total = 0
        self.delay_declared: dict[int, float] = {}  # delay ms -> monotonic time of the last declare
        self.thread = threading.Thread(target=self._io_main, name="sluiceway-rabbitmq-io", daemon=True)
        self.thread.start()
        # The first connection is waited for, so a failed start names its cause; the worker's start
        # (sluiceway/run.py) retries it as an outage.
        if not self.connected.wait(connect_timeout):
            self.closing.set()
            raise RabbitMQUnavailableError(
                f"could not connect to RabbitMQ within {connect_timeout} s: {self.last_error}"
            )

    # --- the worker's side (any thread, one call at a time) --------------------------------------

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        if max_count <= 0:
            return []
        if not self.consume:
            if max_count <= GET_AT_MOST:
                ready, self.known_ready = self.known_ready, None
                got: list[Delivery] = self._call(lambda: self._get(max_count))
                self.backlog = topo.backlog_after(max_count, len(got), ready)
                return got
            return self._fetch_exactly(min(max_count, topo.MAX_PREFETCH), timeout)
        self._maybe_reqos(max_count)
        self._check_connected()
        # The fetching thread reads the connection itself (see the module doc): the deliveries
        # it takes are parsed here, with no other thread to wake. Another holder of the lock
        # (a hand-back publishing, the keeper's poll) is waited for at most the fetch's timeout.
        if not self.io_lock.acquire(timeout=timeout):
            return []
        try:
            deadline = time.monotonic() + timeout
            self._drive()  # flushes the acks written since, and reads what has arrived
            while not self.buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._drive(min(left, WAIT_SLICE))
            if self.buffer[0].at < time.monotonic() - BUFFER_MAX_AGE:
                self._run(self._expire_buffer)
            with self.cond:
                out = self._hand(max_count)
        finally:
            self.io_lock.release()
        self.handed_total += len(out)
        return out

    def available(self, timeout: float) -> int:
        """The messages ready in the queue now (a passive declare; ``timeout`` is not waited),
        so that under a rate limit the link takes slots only for messages there are
        (transports/gated.py): an idle queue then costs a poll no slots taken and handed back.
        The fetch that follows uses this count instead of reading its own. On a backlog (the
        last fetch filled its grant from a queue that held more) it is not asked: two round
        trips per fetch cost a single worker at 1,000 QPS a tenth of its rate."""
        self.known_ready = None
        if self.consume or self.backlog:
            return topo.MAX_PREFETCH  # no bound from here (an unlimited worker is never asked)
        ready: int = self._call(self._ready_count, flush=False)
        self.known_ready = ready
        return ready

    def _hand(self, max_count: int) -> list[Delivery]:
        """Move up to ``max_count`` buffered deliveries to ``handed``; under ``cond``."""
        gen = self.generation
        out: list[Delivery] = []
        buffer, handed = self.buffer, self.handed
        while buffer and len(out) < max_count:
            b = buffer.popleft()
            handed[b.tag] = b
            # Positional: keyword arguments cost a dataclass's __init__ more, once per message.
            out.append(Delivery(b.body, (gen, b.tag), 0.0, b.redeliveries))
        return out

    def _fetch_exactly(self, count: int, timeout: float) -> list[Delivery]:
        """Under a rate limit: a consumer with prefetch ``count`` (the granted slots, at most
        the messages ready), open until ``count`` deliveries came or ``timeout`` passed,
        cancelled before this returns. Every delivery that came before the broker confirmed the
        cancel is returned: at most ``count``, since the broker sends a consumer no more than
        its prefetch.

        Unless the last fetch filled its whole grant from a queue that held more (``backlog``),
        the ready count comes first (the one :meth:`available` just read for the link, or a
        passive declare: a query, not a command of a quorum queue's log), so an idle queue
        opens no consumer, and one with fewer messages than slots opens one it can fill. A
        consumer cancelled unfilled is where a quorum queue can return a delivery it had checked
        out, counted (docs/brokers/rabbitmq.md); before this, every poll of an idle queue was
        such a cancel. On a backlog the count is skipped: the consumer fills anyway, and the
        round trip showed in a single worker's rate at 1,000 QPS."""
        self._check_connected()
        if not self.io_lock.acquire(timeout=COMMAND_TIMEOUT):
            raise RabbitMQUnavailableError(f"RabbitMQ did not answer within {COMMAND_TIMEOUT} s")
        try:
            granted = count
            ready, self.known_ready = self.known_ready, None
            if self.backlog:
                ready = None
            else:
                if ready is None:
                    ready = self._run(self._ready_count, flush=False)
                count = min(count, ready)
                if count <= 0:
                    return []
                if count <= GET_AT_MOST:
                    got: list[Delivery] = self._run(lambda: self._get(count))
                    self.backlog = topo.backlog_after(granted, len(got), ready)
                    return got
            self._run(lambda: self._subscribe(count))
            deadline = time.monotonic() + timeout
            while len(self.buffer) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._drive(min(left, WAIT_SLICE))
            self._run(self._cancel)
            if not self._run(lambda: self._wait_cancelled(COMMAND_TIMEOUT)):
                raise RabbitMQUnavailableError(
                    f"RabbitMQ did not confirm a cancel within {COMMAND_TIMEOUT} s"
                )
            with self.cond:
                out = self._hand(count)
            self.backlog = topo.backlog_after(granted, len(out), ready)
            return out
        finally:
            self.io_lock.release()

    def settle(self, outcomes: Outcomes) -> Settled:
        """Acks go out without waiting for the I/O thread (a lost ack only means a redelivery,
        which at-least-once allows); retries and dead letters wait for their publish confirms,
        since the original is acked only once its successor is safe in the broker."""
        if not len(outcomes):
            return Settled()
        gone = 0
        acks: list[int] = []
        retries: list[tuple[int, Retry]] = []
        deads: list[tuple[int, DeadLetter, bytes]] = []
        with self.cond:
            gen = self.generation
            for token in outcomes.acks:
                tag = self._take(token, gen)
                if tag is None:
                    gone += 1
                else:
                    acks.append(tag)
            for r in outcomes.retries:
                tag = self._take(r.token, gen)
                if tag is None:
                    gone += 1
                else:
                    retries.append((tag, r))
            for d in outcomes.deads:
                tag = self._take(d.token, gen)
                if tag is None:
                    gone += 1
                else:
                    deads.append((tag, d, self.taken.pop(tag).body))
            self.taken.clear()
        if retries or deads:
            self._call(lambda: self._settle_publishing(gen, acks, retries, deads))
        elif acks:
            try:
                # Written, not flushed: the next fetch (or the keeper, soon) sends it.
                self._call(lambda: self._ack(gen, acks), flush=False)
            except RabbitMQUnavailableError:
                gone += len(acks)  # the channel is gone: the broker redelivers them
        return Settled(gone=gone)

    def _take(self, token: Token, gen: int) -> int | None:
        """The delivery tag of a token of this connection, now taken out of ``handed``; None
        for a token of an older connection (its message was redelivered) or one settled before."""
        if not isinstance(token, tuple) or len(token) != 2 or token[0] != gen:
            return None
        tag = token[1]
        if not isinstance(tag, int):
            return None
        b = self.handed.pop(tag, None)
        if b is None:
            return None
        self.taken[tag] = b
        return tag

    def give_back(self, tokens: Sequence[Token], *, redelivered: bool = False) -> int:
        """Unstarted deliveries (``redelivered`` False) are republished with their count so far
        and then acked, so the hand-back does not count as a redelivery (a nack would: a quorum
        queue counts every return); deliveries that were running go back with a nack, which
        counts. See docs/brokers/rabbitmq.md."""
        if not tokens:
            return 0
        try:
            n: int = self._call(lambda: self._return(tokens, counted=redelivered))
        except RabbitMQUnavailableError:
            return 0  # the connection is gone, and with it every unacked delivery: all went back
        return n

    def renew(self, tokens: Sequence[Token]) -> int:
        return 0  # the broker keeps a delivery until its channel closes; nothing to renew

    def recover(self) -> int:
        return 0  # the broker requeues a dead consumer's deliveries by itself

    def close(self) -> None:
        if self.closing.is_set():
            return
        if self.connected.is_set():
            # Stop the consumer first, so nothing new arrives; then unstarted buffered
            # deliveries go back now, not when the connection closes.
            with contextlib.suppress(RabbitMQUnavailableError):
                self._call(self._cancel)
                self._call(lambda: self._wait_cancelled(5.0))
            with self.cond:
                pending = [(self.generation, b.tag) for b in self.buffer]
            if pending:
                with contextlib.suppress(RabbitMQUnavailableError):
                    self._call(lambda: self._return(pending, counted=False))
        self.closing.set()
        self.thread.join(15)

    # --- driving the connection (whoever holds io_lock) -------------------------------------------

    def _check_connected(self) -> None:
        if self.conn is None or not self.connected.is_set():
            raise RabbitMQUnavailableError(f"RabbitMQ connection lost: {self.last_error}")

    def _call(self, fn: Callable[[], Any], *, flush: bool = True) -> Any:
        """Run ``fn`` on the connection in this thread, under ``io_lock``."""
        self._check_connected()
        if not self.io_lock.acquire(timeout=COMMAND_TIMEOUT):
            raise RabbitMQUnavailableError(f"RabbitMQ did not answer within {COMMAND_TIMEOUT} s")
        try:
            return self._run(fn, flush=flush)
        finally:
            self.io_lock.release()

    def _run(self, fn: Callable[[], Any], *, flush: bool = True) -> Any:
        """Under ``io_lock``: ``fn``, then one turn of the loop that sends what it wrote. A
        failure of the connection marks it broken (the keeper reconnects) and is raised as
        :class:`RabbitMQUnavailableError`."""
        self._check_connected()
        try:
            result = fn()
            if flush:
                self._turn(0.0)
        except (RabbitMQUnavailableError, pika.exceptions.AMQPError) as exc:
            # A refusal about these deliveries (their connection is gone) is not a failure of
            # this one; an AMQP error or a closed channel or connection is.
            if isinstance(exc, pika.exceptions.AMQPError) or not self._healthy():
                self._broke(exc)
            raise RabbitMQUnavailableError(f"RabbitMQ: {exc!r}") from exc
        return result

    def _healthy(self) -> bool:
        conn, ch = self.conn, self.ch
        return (
            self.channel_closed is None
            and conn is not None
            and conn.is_open
            and ch is not None
            and ch.is_open
        )

    def _drive(self, time_limit: float = 0.0) -> None:
        """Under ``io_lock``: read and write for up to ``time_limit`` (0: what is there now)."""
        self._check_connected()
        try:
            self._turn(time_limit)
        except (RabbitMQUnavailableError, pika.exceptions.AMQPError) as exc:
            self._broke(exc)
            raise RabbitMQUnavailableError(f"RabbitMQ: {exc!r}") from exc

    def _turn(self, time_limit: float) -> None:
        assert self.conn is not None
        self.conn.process_data_events(time_limit=time_limit)
        self.last_driven = time.monotonic()
        if self.channel_closed is not None:
            raise RabbitMQUnavailableError(f"the consuming channel closed: {self.channel_closed}")

    def _broke(self, exc: BaseException) -> None:
        if not self.broken:
            self.last_error = f"{type(exc).__name__}: {exc}"
        self.broken = True
        self.connected.clear()  # the keeper reconnects; until then calls fail fast

    def _wait_cancelled(self, limit: float) -> bool:
        """Under ``io_lock``: turn the loop until the broker confirmed the last cancel."""
        end = time.monotonic() + limit
        while not self.cancelled.is_set():
            if time.monotonic() > end:
                return False
            self._turn(WAIT_SLICE)
        return True

    # --- the keeper thread ------------------------------------------------------------------------

    def _io_main(self) -> None:
        failures = 0
        while not self.closing.is_set():
            try:
                with self.io_lock:
                    self._connect()
                failures = 0
                self._keep()
            except Exception as exc:
                if not self.broken:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                if not self.closing.is_set():
                    log.warning("RabbitMQ connection dropped; reconnecting: %s", self.last_error)
            finally:
                with self.io_lock:
                    self._disconnect()
            if self.closing.is_set():
                break
            failures += 1
            self.closing.wait(retry_delay(failures, base=0.2, cap=5.0, draw=random.random()))

    def _keep(self) -> None:
        """Turn the loop whenever no other thread has for :data:`KEEP_IDLE` (every task long,
        or the worker idle): heartbeats, a consumer cancelled by the broker, a dropped
        connection, acks left unflushed and stale buffered deliveries are all handled then."""
        while not self.closing.wait(KEEP_IDLE):
            if self.broken:
                raise RabbitMQUnavailableError(self.last_error)
            if time.monotonic() - self.last_driven < KEEP_IDLE:
                continue
            if not self.io_lock.acquire(blocking=False):
                continue
            try:
                if self.broken:
                    continue
                self._turn(0.0)
                self._expire_buffer()
            finally:
                self.io_lock.release()

    def _connect(self) -> None:
        conn = BlockingConnection(connection_parameters(self.url, connection_name("worker", self.queue)))
        try:
            channel = declare(conn.channel, self.queue, topo.work_arguments(self.queue, self.queue_type))
            first = channel
            channel = declare(
                lambda: first if first.is_open else conn.channel(),
                topo.dead_queue(self.queue),
                topo.dead_arguments(self.queue_type),
            )
            pub = conn.channel()
            pub.confirm_delivery()
            ch = self._open_async_channel(conn)
            with self.cond:
                self.generation += 1
                self.buffer.clear()
                self.handed.clear()
            self.unacked.clear()
            self.order.clear()
            self.delay_declared.clear()
            self.qos = 0
            self.conn, self.channel, self.ch, self.pub = conn, channel, ch, pub
            if self.consume:
                self._subscribe(self.prefetch)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        if self.generation > 1:
            self.reconnects += 1
            log.warning("RabbitMQ reconnected (generation %d)", self.generation)
        self.broken = False
        self.connected.set()

    def _open_async_channel(self, conn: BlockingConnection) -> Channel:
        """A channel of pika's asynchronous layer, not wrapped by a blocking one (whose
        bookkeeping asserts on every ConsumeOk it did not ask for)."""
        opened: list[Channel] = []
        conn._impl.channel(on_open_callback=opened.append)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not opened:
            if time.monotonic() > deadline:
                raise RabbitMQUnavailableError("RabbitMQ did not open a channel in time")
            conn.process_data_events(time_limit=0.05)
        ch = opened[0]
        gen = self.generation + 1

        def on_close(_ch: Channel, reason: BaseException) -> None:
            if gen == self.generation:
                self.channel_closed = reason

        def on_broker_cancel(frame: Any) -> None:
            # The broker ended a consumer (its queue was deleted, say): pika forgets it, and
            # the window it held is gone. The next fetch re-subscribes the whole window.
            tag = frame.method.consumer_tag
            if gen == self.generation and tag in self.consumer_tags:
                self.consumer_tags.remove(tag)
                self.consumer_lost = True
                log.warning("RabbitMQ cancelled consumer %s of queue %s; re-subscribing", tag, self.queue)

        ch.add_on_close_callback(on_close)
        ch.add_on_cancel_callback(on_broker_cancel)
        self.channel_closed = None
        self._read_deliveries_first(conn._impl, ch)
        return ch

    def _read_deliveries_first(self, impl: Any, ch: Channel) -> None:
        """Read the bytes pika receives on ``impl`` for whole deliveries to ``ch`` first
        (:mod:`~sluiceway.transports.rabbitmq_frames`) and hand every other frame to pika.

        pika's own reading decodes each delivery into three frame objects, a method and a
        properties object and routes them through its callback manager and content assembler:
        most of a consuming worker's CPU per message. A delivery read here reaches
        :meth:`_arrived` exactly as pika's dispatch would bring it (the same consumer check),
        and the connection's received-byte count, which its heartbeat checker reads, counts it.
        A delivery pika already started assembling stays pika's, as does any frame this does
        not read, one at a time, after which this reads on."""
        number = ch.channel_number
        parse = frames.parse_delivery
        arrived = self._arrived
        decode_table = pika.data.decode_table

        def on_data(data_in: bytes) -> None:
            buf = impl._frame_buffer + data_in if impl._frame_buffer else data_in
            pos = read = 0
            at = time.monotonic()  # one reading for what one socket read brought
            while pos < len(buf):
                got: frames.Deliver | int = frames.NOT_A_DELIVERY
                if ch._content_assembler._method_frame is None and impl._channels.get(number) is ch:
                    got = parse(buf, pos, number)
                if isinstance(got, tuple):
                    consumer, tag, redelivered, table, body, end = got
                    if consumer in ch._consumers and consumer not in ch._cancelled:
                        read += end - pos
                        pos = end
                        headers = None if table is None else decode_table(table, 0)[0]
                        arrived(tag, redelivered, headers, body, at)
                        continue
                elif got == frames.INCOMPLETE:
                    break
                # One frame the way pika's own loop reads it; the buffer is pika's meanwhile.
                impl._frame_buffer = buf[pos:]
                consumed, value = impl._read_frame()
                if not value:
                    impl.bytes_received += read
                    return  # a partial frame: pika's buffer keeps it for the next bytes
                impl._trim_frame_buffer(consumed)
                impl._process_frame(value)
                buf, pos = impl._frame_buffer, 0
            impl._frame_buffer = buf[pos:] if pos else buf
            impl.bytes_received += read

        impl._on_data_available = on_data

    def _disconnect(self) -> None:
        self.connected.clear()
        conn, ch = self.conn, self.ch
        self.conn, self.channel, self.ch, self.pub = None, None, None, None
        self.consumer_tags = []
        self.consumer_lost = False
        # What was read of the old connection's queue says nothing after a reconnect.
        self.backlog, self.known_ready = False, None
        with self.cond:
            # Every unacked delivery goes back with its channel; forget them all.
            self.buffer.clear()
            self.handed.clear()
            self.cond.notify_all()
        self.cancelled.set()
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                # BlockingConnection.close closes only the channels it wrapped (it fails on
                # ours), so ours is closed first and waited for.
                if ch is not None and ch.is_open:
                    ch.close()
                    deadline = time.monotonic() + 5.0
                    while not ch.is_closed and time.monotonic() < deadline:
                        conn.process_data_events(time_limit=0.05)
            with contextlib.suppress(Exception):
                conn.close()

    def _subscribe(self, prefetch: int) -> None:
        """(Re)start consuming with ``prefetch``; nothing here waits for the broker. The
        cancel, qos and consume are pipelined (pika sends each once the one before is
        answered), and deliveries of the old consumers keep coming to the same callback."""
        assert self.ch is not None
        self._cancel()
        self.consumer_lost = False
        self._add_consumer(prefetch)
        self.prefetch = prefetch

    def _resize(self, want: int) -> None:
        """Make the window ``want``: a growth by one more consumer for the difference, which
        cancels none of the ones there (see
        :func:`~sluiceway.transports.rabbitmq_topology.added_consumer_prefetch`); a shrink, or a
        growth past the consumers allowed, by re-subscribing."""
        added = topo.added_consumer_prefetch(self.prefetch, want, len(self.consumer_tags))
        if added is None:
            self._subscribe(want)
            return
        self._add_consumer(added)
        self.prefetch += added

    def _add_consumer(self, prefetch: int) -> None:
        assert self.ch is not None
        # basic.qos without global applies to the consumers opened after it on the channel,
        # each with its own count; the ones already open keep theirs.
        if prefetch != self.qos:
            self.ch.basic_qos(prefetch_count=prefetch)
            self.qos = prefetch
        self.consumer_tags.append(self.ch.basic_consume(self.queue, self._on_message, auto_ack=False))
        self.last_reqos = time.monotonic()

    def _cancel(self) -> None:
        """Cancel every consumer, keeping what they still deliver before the broker's CancelOk
        (pika's basic_cancel would reject those with requeue: a counted redelivery each on a
        quorum queue). Sets ``cancelled`` on the last CancelOk, or at once if there is no
        consumer."""
        tags, self.consumer_tags = self.consumer_tags, []
        if not tags or self.ch is None:
            self.cancelled.set()
            return
        self.cancelled.clear()
        ch = self.ch
        waiting = set(tags)

        def on_cancel_ok(frame: Any) -> None:
            tag = frame.method.consumer_tag
            ch._cleanup_consumer_ref(tag)
            waiting.discard(tag)
            if not waiting:
                self.cancelled.set()

        for tag in tags:
            ch._rpc(
                pika.spec.Basic.Cancel(consumer_tag=tag),
                on_cancel_ok,
                [(pika.spec.Basic.CancelOk, {"consumer_tag": tag})],
            )

    def _on_message(self, _ch: Channel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        self._arrived(method.delivery_tag, method.redelivered, props.headers, body, time.monotonic())

    def _arrived(
        self, tag: int, redelivered: bool, headers: dict[str, Any] | None, body: bytes, at: float
    ) -> None:
        """A delivery of our consumer, from pika's dispatch or from :meth:`_read_deliveries_first`;
        ``at``: the monotonic time it arrived."""
        b = _Buffered(tag, body, topo.redeliveries(headers, redelivered) if headers or redelivered else 0, at)
        self.unacked.add(tag)
        self.order.append(tag)
        # deque appends are atomic, and only io_lock's holder changes the buffer other than by
        # popping, so cond (for settle's bookkeeping) is not taken here.
        self.buffer.append(b)

    def _expire_buffer(self) -> None:
        if not self.buffer or self.buffer[0].at >= time.monotonic() - BUFFER_MAX_AGE:
            return
        limit = time.monotonic() - BUFFER_MAX_AGE
        gen = self.generation
        with self.cond:
            stale = [(gen, b.tag) for b in self.buffer if b.at < limit]
        if stale:
            n = self._return(stale, counted=False)
            log.warning("returned %d deliveries that waited %s s unstarted", n, BUFFER_MAX_AGE)

    def _maybe_reqos(self, room: int) -> None:
        """Follow the worker's capacity (see :func:`~sluiceway.transports.rabbitmq_topology.prefetch_target`)."""
        now = time.monotonic()
        if not self.rate_at:
            self.rate_at = now  # the first window starts with the first fetch, not the connect
        elif now - self.rate_at >= RATE_INTERVAL:
            measured = self.handed_total / (now - self.rate_at)
            # The first figure is taken whole: a worker starting on a backlog needs its window
            # within a fraction of a second, not after several estimates.
            self.rate = measured if not self.rate else 0.5 * self.rate + 0.5 * measured
            self.handed_total = 0
            self.rate_at = now
        want = topo.new_prefetch(
            self.prefetch, topo.prefetch_target(len(self.handed), room, self.rate), now - self.last_reqos
        )
        if self.consumer_lost:
            self.consumer_lost = False
            window = self.prefetch if want is None else want
            with contextlib.suppress(RabbitMQUnavailableError):
                self._call(lambda: self._subscribe(window))
            return
        if want is not None:
            self.last_reqos = now
            # An outage is reported by the fetch that follows.
            with contextlib.suppress(RabbitMQUnavailableError):
                self._call(lambda: self._resize(want))

    # --- run in the I/O thread --------------------------------------------------------------------

    def _ready_count(self) -> int:
        assert self.channel is not None
        return int(self.channel.queue_declare(self.queue, passive=True).method.message_count)

    def _get(self, count: int) -> list[Delivery]:
        assert self.channel is not None and self.ch is not None
        out: list[_Buffered] = []
        for _ in range(count):
            # On the consuming channel, whose tags the acks use.
            method, props, body = _basic_get(self.conn, self.ch, self.queue)
            if method is None or props is None:
                break
            tag = method.delivery_tag
            self.unacked.add(tag)
            self.order.append(tag)
            out.append(_Buffered(tag, body, topo.redeliveries(props.headers, bool(method.redelivered)), 0.0))
        gen = self.generation
        with self.cond:
            for b in out:
                self.handed[b.tag] = b
        return [Delivery(payload=b.body, token=(gen, b.tag), redeliveries=b.redeliveries) for b in out]

    def _settle_publishing(
        self,
        gen: int,
        acks: list[int],
        retries: list[tuple[int, Retry]],
        deads: list[tuple[int, DeadLetter, bytes]],
    ) -> None:
        if gen != self.generation:
            raise RabbitMQUnavailableError("the connection these deliveries came on is gone")
        for tag, r in retries:
            self._publish_retry(r)
            acks.append(tag)
        for tag, d, original in deads:
            self._publish_dead(d, original)
            acks.append(tag)
        self._ack(gen, acks)

    def _ack(self, gen: int, tags: list[int]) -> None:
        """Ack ``tags`` (already taken out of ``handed``) on the channel they came on.

        Every tag in an ack frame must still be outstanding, or the broker closes the channel
        ("unknown delivery tag"); ``unacked``, kept by this thread alone, says which are. One
        multiple-ack covers every tag below the oldest outstanding one not being acked."""
        if gen != self.generation or not tags or self.ch is None:
            return  # a new channel: these tags mean nothing on it, and the broker redelivers
        unacked = self.unacked
        acking = sorted(t for t in tags if t in unacked)
        if not acking:
            return
        unacked.difference_update(acking)
        order = self.order
        while order and order[0] not in unacked:
            order.popleft()
        rest = order[0] if order else None  # the oldest still outstanding
        below = len(acking) if rest is None else bisect.bisect_left(acking, rest)
        if below:
            self.ch.basic_ack(acking[below - 1], multiple=True)
        for tag in acking[below:]:
            self.ch.basic_ack(tag)

    def _return(self, tokens: Sequence[Token], *, counted: bool) -> int:
        """Send deliveries of this connection (handed or still buffered) back to the queue.

        ``counted``: with a nack, which the broker counts as a redelivery. Otherwise each is
        republished, confirmed, with its count so far in a header, and then acked: the copy
        starts with the same count, so handing back an unstarted message costs it nothing."""
        assert self.ch is not None
        gen = self.generation
        back: list[_Buffered] = []
        with self.cond:
            wanted = {t[1] for t in tokens if isinstance(t, tuple) and len(t) == 2 and t[0] == gen}
            for tag in wanted:
                b = self.handed.pop(tag, None)
                if b is not None and tag in self.unacked:
                    back.append(b)
            if len(self.buffer) and wanted:
                keep: deque[_Buffered] = deque()
                for b in self.buffer:
                    (back.append(b) if b.tag in wanted and b.tag in self.unacked else keep.append(b))
                self.buffer = keep
        if not back:
            return 0
        if counted:
            for b in back:
                self.ch.basic_nack(b.tag, requeue=True)
            self.unacked.difference_update(b.tag for b in back)
            return len(back)
        for b in back:
            self._publish(self.queue, b.body, topo.returned_headers(b.redeliveries))
        self._ack(gen, [b.tag for b in back])
        self.given_back += len(back)
        return len(back)

    def _publish_retry(self, r: Retry) -> None:
        delay_ms = topo.delay_bucket_ms(r.delay)
        target = self.queue if delay_ms == 0 else self._delay_queue(delay_ms)
        self._publish(target, r.payload, None)

    def _publish_dead(self, d: DeadLetter, original: bytes) -> None:
        try:
            record = json.loads(d.record)
        except ValueError:
            record = {"reason": d.reason}
        if not isinstance(record, dict):
            record = {"reason": d.reason}
        self._publish(topo.dead_queue(self.queue), original, topo.dead_headers(d.reason, record))

    def _delay_queue(self, delay_ms: int) -> str:
        name = topo.delay_queue(self.queue, delay_ms)
        last = self.delay_declared.get(delay_ms)
        if last is None or time.monotonic() - last > topo.redeclare_after(delay_ms):
            assert self.conn is not None and self.pub is not None
            pub = self.pub

            def reopen() -> BlockingChannel:
                assert self.conn is not None
                ch = self.conn.channel()
                ch.confirm_delivery()
                return ch

            self.pub = declare(
                lambda: pub if pub.is_open else reopen(), name, topo.delay_arguments(self.queue, delay_ms)
            )
            if not self.pub.is_open:
                self.pub = reopen()
            self.delay_declared[delay_ms] = time.monotonic()
        return name

    def _publish(self, queue: str, body: bytes, headers: dict[str, Any] | None) -> None:
        assert self.pub is not None
        # Confirms + mandatory: returns only once the broker has routed and stored it.
        self.pub.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(delivery_mode=2, content_type="application/json", headers=headers),
            mandatory=True,
        )


def _basic_get(
    conn: BlockingConnection | None, ch: Channel, queue: str
) -> tuple[Any, pika.BasicProperties | None, bytes]:
    """One basic.get on the asynchronous channel ``ch``, waited for on ``conn``."""
    assert conn is not None
    got: list[tuple[Any, pika.BasicProperties | None, bytes]] = []

    def on_get(_ch: Channel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        got.append((method, props, body))

    def on_empty(_frame: Any) -> None:
        got.append((None, None, b""))

    ch.add_callback(on_empty, [pika.spec.Basic.GetEmpty], one_shot=True)
    ch.basic_get(queue, on_get, auto_ack=False)
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not got:
        if time.monotonic() > deadline or not ch.is_open:
            raise RabbitMQUnavailableError("RabbitMQ did not answer a basic.get in time")
        conn.process_data_events(time_limit=0.05)
    return got[0]


# --- the registry's entry points ------------------------------------------------------------------


def transport(settings: Any, worker_id: str) -> RabbitMQTransport:
    limited = settings.qps > 0
    initial = settings.concurrency + (settings.prefetch if settings.prefetch >= 0 else settings.concurrency)
    return RabbitMQTransport(
        settings.broker_url,
        settings.queue,
        queue_type=settings.rabbitmq_queue_type,
        consume=not limited,
        initial_prefetch=initial,
    )


PUBLISH_WINDOW: Final = 1000  # messages published before waiting for their confirms
CONFIRM_TIMEOUT: Final = 60.0


class PublishRefusedError(RuntimeError):
    """The broker refused a message (a nack) or could not route it (mandatory return): it is
    NOT stored. The message names the queue."""


class RabbitMQSink:
    """Publishes with confirms and ``mandatory``: ``send`` returns once the broker stored every
    message, and raises :class:`PublishRefusedError` if one was refused or could not be routed.

    A batch is pipelined: up to :data:`PUBLISH_WINDOW` messages go out before their confirms are
    awaited (pika's blocking channel would wait for each one: a round trip, and a quorum queue's
    fsync, per message). Thread-safe (one lock)."""

    def __init__(self, url: str, *, queue_type: str = topo.DEFAULT_QUEUE_TYPE) -> None:
        self.url = url
        self.queue_type = topo.check_queue_type(queue_type)
        self.lock = threading.Lock()
        self.conn: BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.declared: dict[str, float] = {}
        self.sent = 0  # publish sequence numbers on the current channel
        self.confirmed = 0
        self.refused: list[str] = []

    def _open(self) -> BlockingChannel:
        if self.conn is None or not self.conn.is_open:
            self.conn = BlockingConnection(connection_parameters(self.url, connection_name("publisher")))
            self.channel = None
            self.declared.clear()
        if self.channel is None or not self.channel.is_open:
            self.channel = self._new_channel()
        return self.channel

    def _new_channel(self) -> BlockingChannel:
        assert self.conn is not None
        ch = self.conn.channel()
        selected = threading.Event()
        # The asynchronous channel underneath, so confirms can be awaited for a whole window.
        ch._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _f: selected.set())
        ch._impl.add_on_return_callback(self._on_return)
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while not selected.is_set():
            if time.monotonic() > deadline:
                raise RabbitMQUnavailableError("RabbitMQ did not enable publisher confirms")
            self.conn.process_data_events(time_limit=0.05)
        self.sent = self.confirmed = 0
        return ch

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        upto = int(method.delivery_tag)
        count = (upto - self.confirmed) if method.multiple else 1
        if isinstance(method, pika.spec.Basic.Nack):
            self.refused.append(f"the broker refused {count} message(s) (nack)")
        self.confirmed = max(self.confirmed, upto) if method.multiple else self.confirmed + 1

    def _on_return(self, _ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        self.refused.append(f"no queue {method.routing_key!r} to route to ({method.reply_text})")

    def _ensure(self, name: str, arguments: dict[str, Any], ttl: float) -> None:
        last = self.declared.get(name)
        if last is not None and time.monotonic() - last < ttl:
            return
        ch = self._open()
        declared = declare(lambda: ch if ch.is_open else self._new_channel(), name, arguments)
        self.channel = declared
        self.declared[name] = time.monotonic()

    def send(self, namespace: str, queue: str, payloads: Sequence[bytes], *, delay: float = 0.0) -> None:
        with self.lock:
            for attempt in (1, 2):
                try:
                    self._send(queue, payloads, delay)
                    return
                except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError):
                    # A connection idle for long may have been dropped: open a new one once.
                    # Messages of the failed try may be stored twice, which at-least-once allows.
                    self.conn = None
                    if attempt == 2:
                        raise

    def _send(self, queue: str, payloads: Sequence[bytes], delay: float) -> None:
        self._ensure(queue, topo.work_arguments(queue, self.queue_type), float("inf"))
        self._ensure(topo.dead_queue(queue), topo.dead_arguments(self.queue_type), float("inf"))
        target = queue
        delay_ms = topo.delay_bucket_ms(delay)
        if delay_ms:
            target = topo.delay_queue(queue, delay_ms)
            self._ensure(target, topo.delay_arguments(queue, delay_ms), topo.redeclare_after(delay_ms))
        ch = self._open()
        assert self.conn is not None
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        self.refused.clear()
        for i in range(0, len(payloads), PUBLISH_WINDOW):
            for body in payloads[i : i + PUBLISH_WINDOW]:
                ch._impl.basic_publish("", target, body, props, mandatory=True)
                self.sent += 1
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while self.confirmed < self.sent:
                if not ch.is_open:
                    raise pika.exceptions.ChannelWrongStateError(
                        "the channel closed before its confirms came"
                    )
                if time.monotonic() > deadline:
                    raise RabbitMQUnavailableError(
                        f"RabbitMQ did not confirm the messages for {target!r} in time"
                    )
                self.conn.process_data_events(time_limit=0.05)
            if self.refused:
                raise PublishRefusedError(
                    f"publishing to RabbitMQ queue {target!r}: " + "; ".join(self.refused)
                )

    def close(self) -> None:
        with self.lock:
            if self.conn is not None and self.conn.is_open:
                with contextlib.suppress(Exception):
                    self.conn.close()
            self.conn = None


def sink(url: str) -> RabbitMQSink:
    import os

    from sluiceway.contract import ENV_RABBITMQ_QUEUE_TYPE

    return RabbitMQSink(url, queue_type=os.environ.get(ENV_RABBITMQ_QUEUE_TYPE) or topo.DEFAULT_QUEUE_TYPE)
