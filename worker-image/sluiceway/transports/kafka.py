"""The Kafka transport (confluent-kafka): at-least-once by offset, tasks in parallel within a
partition, drain on revoke, retries through a retry topic, dead letters with their reason.

One thread owns the consumer and polls every ~100 ms whatever the worker does, so the group
membership and rebalance callbacks never wait for a busy worker. It fills a bounded buffer of
fetched records; when the buffer is full (the worker is full, or the rate limit grants nothing so
the worker fetches nothing) it pauses every assigned partition, until the worker has taken half
of it, and keeps polling, which serves rebalances without taking records. ``fetch`` hands records
out of that buffer.

Offsets (kafka_offsets.PartitionTrack): a record counts as open from the moment it is buffered,
and a partition's commit never passes its lowest open record, so records finish in any order and
nothing unfinished is ever committed past. Commits are asynchronous after each settle, and
synchronous on revoke and close.

Rebalances are cooperative-sticky. On revoke the poll thread drops the revoked partitions'
buffered records, waits up to ``drain_seconds`` for their running tasks to settle (the worker's
other threads settle meanwhile), commits, and forgets them; what did not finish in time is redone
by the new owner and counted in ``redone_on_revoke``. Lost partitions (the session expired) are
forgotten without a commit. A settle whose assignment is gone counts as ``gone``.

``ordering: key`` (SLUICEWAY_ORDERING=key): a record is not handed out while an earlier record
with the same key is running or waiting, so one key's records run one at a time in offset order.
A retried record leaves that order: it runs again from the retry topic after its delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from itertools import groupby, repeat
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from sluiceway.log import get_logger
from sluiceway.transports import kafka_common as kc
from sluiceway.transports.base import Delivery, Outcomes, Settled, Token, Transport
from sluiceway.transports.kafka_offsets import PartitionTrack


class KafkaOutageError(RuntimeError):
    """The Kafka cluster did not acknowledge a produce or commit in time."""


outage_errors: tuple[type[BaseException], ...] = (KafkaException, KafkaOutageError)

TP = tuple[str, int]
POLL_TIMEOUT = 0.1  # the longest a rebalance callback or a pause waits for the poll thread
PAUSE_AFTER = 0.5  # a buffer full this long pauses the partitions (see _poll_loop)
PRODUCE_TIMEOUT = 30.0
BUFFER = 1000  # records fetched ahead of the worker, at most
CONSUME_MAX = 500  # records per consume() call, at most
# A stopping worker's whole close(): the poll thread's end, the final commits, leaving the group
# and the producer's flush. It must fit the pod's termination margin after the drain (a test
# checks the operator's margin against it); what it cuts short the next owner redoes.
CLOSE_SECONDS = 10.0
POLL_JOIN_SECONDS = 3.0  # of it, the most spent waiting for the poll thread (a callback) to end
LEAVE_SECONDS = 2.0  # of it, kept for leaving the group however long the commits took
COMMIT_RETRY_SECONDS = 5.0  # a revoke's or close's commit, tried again on retriable errors
DELAYED_MAX = 10_000  # retry records held until due; past this the retry topic is paused


# A tuple, not a dataclass: one is made per record on the hot path, where a frozen dataclass
# costs over twice as much to build and to hash.
class KafkaToken(NamedTuple):
    topic: str
    partition: int
    offset: int
    generation: int  # of this partition's assignment; a settle from an older one is gone


# The per-record path builds tokens with tuple.__new__ itself: a NamedTuple's own constructor is
# a Python function (about 2.5x the cost). Buffered and handed-out records are the Deliveries
# themselves, keyed by their token, which carries the partition, offset and generation.
_new_token = partial(tuple.__new__, KafkaToken)
_tp_of = itemgetter(0, 1)
_offset_of = itemgetter(2)
_token_of = attrgetter("token")


def _tp(d: Delivery) -> TP:
    t: KafkaToken = d.token  # type: ignore[assignment]
    return (t[0], t[1])


class KafkaTransport:
    def __init__(
        self,
        url: str,
        namespace: str,
        queue: str,
        worker_id: str,
        *,
        ordering: str = "",
        drain_seconds: float = 30.0,
        buffer: int = BUFFER,
        create_topics: bool = True,
    ) -> None:
        if ordering not in kc.ORDERINGS:
            raise ValueError(f"{kc.ENV_ORDERING}={ordering!r} must be empty, 'none' or 'key'")
        self.outage_errors = outage_errors
        self.topic = kc.topic(namespace, queue)
        self.retry_topic = kc.retry_topic(namespace, queue)
        self.dead_topic = kc.dead_topic(namespace, queue)
        self.by_key = ordering == "key"
        self.drain_seconds = drain_seconds
        self.buffer_limit = max(1, buffer)
        self.log = get_logger(queue=queue, worker=worker_id, broker="kafka")
        kc.route_to_structlog()
        if create_topics:
            admin = AdminClient(kc.admin_config(url))
            kc.ensure_topics(admin, {self.topic: -1, self.retry_topic: -1, self.dead_topic: -1})
        self.producer = Producer(kc.producer_config(url, worker_id))
        # One consumer per topic, each in its own group (kafka_common.retry_group says why): the
        # work topic's partitions spread over every worker whatever the retry topic holds.
        self.consumer = Consumer(
            {**kc.consumer_config(url, kc.group(namespace, queue), worker_id), "on_commit": self._on_commit}
        )
        self.retry_consumer = Consumer(
            {
                **kc.consumer_config(url, kc.retry_group(namespace, queue), worker_id),
                "on_commit": self._on_commit,
            }
        )

        self.cond = threading.Condition()  # guards everything below; settle notifies it
        self.tracks: dict[TP, PartitionTrack] = {}
        self.generation: dict[TP, int] = {}
        self.assigned: set[TP] = set()
        self.buffer: deque[Delivery] = deque()
        self.delayed: list[tuple[int, int, Delivery]] = []  # (due ms, seq, record) heap
        self.delayed_seq = 0
        # Handed to the worker, not settled, by token: a token of an older assignment of the
        # partition (another generation) is simply not there, so it settles as gone.
        self.out: dict[KafkaToken, Delivery] = {}
        self.keys_busy: dict[bytes, int] = {}  # ordering=key: running records per key
        self.to_commit: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.pause_unknown: set[TP] = set()  # assigned since the last pause/resume call
        self.closing = False
        # Figures for tests and benchmarks.
        self.redone_on_revoke = 0  # running records a revoke could not wait for
        self.revokes = 0
        self.lost = 0
        self.commit_failures = 0  # asynchronous commits the broker refused (each sent again)
        self.revoke_commit_failures = 0  # revokes whose commit failed: the next owner redoes those
        self.errors: deque[str] = deque(maxlen=50)

        for consumer, topic in ((self.consumer, self.topic), (self.retry_consumer, self.retry_topic)):
            consumer.subscribe(
                [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
        self.thread = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self.thread.start()

    # --- the worker's side -----------------------------------------------------------------------

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.buffer and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self.cond.wait(left)
            out: list[Delivery] = []
            if self.by_key:
                self._take_by_key(max_count, out)
            else:
                buffer = self.buffer
                if max_count >= len(buffer):
                    out = list(buffer)
                    buffer.clear()
                else:
                    popleft = buffer.popleft
                    out = [popleft() for _ in range(max_count)]
                self.out.update(zip(map(_token_of, out), out, strict=True))
            self.cond.notify_all()  # room in the buffer for the poll thread
            return out

    def available(self, timeout: float) -> int:
        """Records ready to hand out, waiting up to ``timeout`` for the first; the rate-limited
        link (transports/gated.py) takes no more slots than this."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.buffer and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return 0
                self.cond.wait(left)
            return len(self.buffer)

    def _hand_out(self, held: Delivery, out: list[Delivery]) -> None:
        self.out[cast(KafkaToken, held.token)] = held
        key = held.key
        if self.by_key and key is not None:
            self.keys_busy[key] = self.keys_busy.get(key, 0) + 1
        out.append(held)

    def _take_by_key(self, max_count: int, out: list[Delivery]) -> None:
        blocked = set(self.keys_busy)
        keep: deque[Delivery] = deque()
        while self.buffer:
            held = self.buffer.popleft()
            key = held.key
            if len(out) >= max_count or (key is not None and key in blocked):
                keep.append(held)
                if key is not None:
                    blocked.add(key)  # later records of this key wait behind this one
                continue
            self._hand_out(held, out)
            if key is not None:
                blocked.add(key)
        self.buffer = keep

    def settle(self, outcomes: Outcomes) -> Settled:
        # Retries and dead letters are produced, and acknowledged by the cluster, before their
        # source offsets may be committed: a crash in between redoes the record, never loses it.
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        try:
            for r in outcomes.retries:
                self.producer.produce(
                    self.retry_topic,
                    value=r.payload,
                    key=self._key_of(self._token(r.token)),
                    headers=[kc.due_header(r.delay)],
                    on_delivery=delivered,
                )
            for d in outcomes.deads:
                t = self._token(d.token)
                self.producer.produce(
                    self.dead_topic,
                    value=d.record,
                    key=self._key_of(t),
                    headers=[
                        (kc.HEADER_REASON, d.reason.encode()),
                        (kc.HEADER_SOURCE, f"{t.topic}/{t.partition}/{t.offset}".encode()),
                    ],
                    on_delivery=delivered,
                )
            if outcomes.retries or outcomes.deads:
                self._flush()
        except (KafkaException, KafkaOutageError, BufferError) as exc:
            return Settled(error=f"kafka produce failed: {exc}")
        if failures:
            return Settled(error=f"kafka produce failed: {failures[0]}")
        any_tokens = list(outcomes.acks)
        if outcomes.retries or outcomes.deads:
            any_tokens += [r.token for r in outcomes.retries]
            any_tokens += [d.token for d in outcomes.deads]
        if not set(map(type, any_tokens)) <= {KafkaToken}:
            for foreign in any_tokens:
                self._token(foreign)  # raises, naming the foreign token
        tokens = cast(list[KafkaToken], any_tokens)
        # Once per record, so in C: pop every token from the handed-out set, then finish the
        # found offsets partition by partition (a batch's tokens come in runs of one partition).
        with self.cond:
            popped = list(map(self.out.pop, tokens, repeat(None)))
            gone = popped.count(None)
            if gone:
                tokens = [t for t, d in zip(tokens, popped, strict=True) if d is not None]
            if self.by_key:
                for held in popped:
                    if held is not None:
                        self._release_key(held.key)
            tracks, touched = self.tracks, set()
            for tp, run in groupby(tokens, _tp_of):
                tracks[tp].finish_open(list(map(_offset_of, run)))
                touched.add(tp)
            # The commit point once per partition and settle, not once per record.
            for tp in touched:
                track = tracks[tp]
                point = track.committable()
                if point > track.committed:
                    self.to_commit[tp] = point
            self.cond.notify_all()
        return Settled(gone=gone)

    def _key_of(self, t: KafkaToken) -> bytes | None:
        with self.cond:
            d = self.out.get(t)
        return d.key if d is not None else None

    @staticmethod
    def _token(token: Token) -> KafkaToken:
        if not isinstance(token, KafkaToken):
            raise TypeError(f"not a Kafka settle token: {token!r}")
        return token

    def _settled(self, t: KafkaToken) -> Delivery | None:
        """Take ``t``'s delivery out of the handed-out set; None when its assignment is gone."""
        d = self.out.pop(t, None)
        if d is not None and self.by_key:
            self._release_key(d.key)
        return d

    def _release_key(self, key: bytes | None) -> None:
        if not self.by_key or key is None:
            return
        n = self.keys_busy.get(key, 0) - 1
        if n > 0:
            self.keys_busy[key] = n
        else:
            self.keys_busy.pop(key, None)

    def give_back(self, tokens: Sequence[Token], *, redelivered: bool = False) -> int:
        """Records go back to the front of the buffer (still uncommitted), for this worker's next
        fetch; at close they are simply not committed, and the next owner runs them.

        ``redelivered`` (they were running when the worker had to stop) changes nothing here:
        Kafka keeps no per-record delivery count, so ``Delivery.redeliveries`` is always 0 on
        Kafka and a record that keeps killing its worker is redone until ``maxAttempts`` of the
        function's own failures, never by a count of deaths."""
        del redelivered
        back: list[Delivery] = []
        with self.cond:
            for token in tokens:
                d = self._settled(self._token(token))
                if d is not None:
                    back.append(d)
            back.sort(key=_token_of)  # by partition, then offset
            self.buffer.extendleft(reversed(back))
            self.cond.notify_all()
        return len(back)

    def renew(self, tokens: Sequence[Token]) -> int:
        return len(tokens)  # the group membership keeps records; the poll thread keeps it alive

    def recover(self) -> int:
        return 0  # a dead consumer's partitions are reassigned by the group coordinator

    def close(self) -> None:
        """Stop within CLOSE_SECONDS, whatever the broker does: each step below is a join or a
        deadline inside that one budget, and the steps' times are logged (``kafka_closed``)."""
        with self.cond:
            if self.closing:
                return
            self.closing = True
            self.cond.notify_all()
        started = time.monotonic()
        deadline = started + CLOSE_SECONDS
        self.thread.join(POLL_JOIN_SECONDS)
        polled = time.monotonic()
        if self.thread.is_alive():
            # Still inside consume(), in a rebalance callback (its commit has no timeout):
            # closing the consumers under it could free the handle it runs on. Leave them to the
            # session timeout, which moves the partitions within SESSION_TIMEOUT_MS.
            self.log.warning("kafka_close_timeout", step="poll thread", waited_s=POLL_JOIN_SECONDS)
            self._log_closed(started, polled, polled, polled, left=self._flush_within(deadline))
            return
        with self.cond:
            self.buffer.clear()
            offsets = self._committable(self.tracks.keys())
        # One budget for both groups' commits: a stopping worker with the broker down waits
        # COMMIT_RETRY_SECONDS once, not once per consumer, and leaves LEAVE_SECONDS to leave.
        commit_deadline = min(polled + COMMIT_RETRY_SECONDS, deadline - LEAVE_SECONDS)
        for consumer, some in self._by_consumer(offsets):
            self._commit_now(consumer, some, "kafka_final_commit_failed", commit_deadline)
        committed = time.monotonic()
        # close() leaves the group now, so nobody waits out a session timeout. After a broker
        # restart fenced this member (its partitions lost and never given back) it was seen to
        # block for minutes, waiting on a group it is no longer in; a worker told to stop must
        # stop, so it runs in its own thread, for what is left of the budget. What it did not
        # commit is redone by the next owner.
        closer = threading.Thread(target=self._close_consumers, name="sluiceway-kafka-close", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        left_group = time.monotonic()
        if closer.is_alive():
            self.log.warning(
                "kafka_close_timeout", step="leave the group", waited_s=round(left_group - committed, 2)
            )
        self._log_closed(started, polled, committed, left_group, left=self._flush_within(deadline))

    def _flush_within(self, deadline: float) -> int:
        """Flush the producer for what is left of the budget; how many records it still held.
        Those are retries or dead letters whose source records were not committed (a settle
        commits only after its produce was acknowledged), so they are redone, not lost."""
        return int(self.producer.flush(max(0.0, deadline - time.monotonic())))

    def _log_closed(
        self, started: float, polled: float, committed: float, left_group: float, *, left: int
    ) -> None:
        self.log.info(
            "kafka_closed",
            poll_thread_s=round(polled - started, 3),
            commits_s=round(committed - polled, 3),
            leave_s=round(left_group - committed, 3),
            flush_s=round(time.monotonic() - left_group, 3),
            unflushed=left,
        )

    def _close_consumers(self) -> None:
        for consumer in (self.consumer, self.retry_consumer):
            with contextlib.suppress(KafkaException, RuntimeError):
                consumer.close()

    # --- the poll thread -------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        # consume(num_messages=N, timeout=T) returns only once it has N records or T passed, so a
        # blocking batch call would sit out the whole timeout whenever fewer than N are queued
        # while the worker runs dry. Instead the thread takes whatever is queued without waiting,
        # and only when that was nothing blocks for the first record to arrive.
        had_records = False
        # A full buffer is first waited out without consuming: librdkafka keeps prefetching
        # behind it (its own queue is bounded by queued.max.messages.kbytes), and a worker that
        # keeps up empties it within milliseconds. Only a buffer that stays full for PAUSE_AFTER
        # (the worker is full of slow tasks, or the rate limit grants nothing) pauses every
        # partition, so that consume() can go on serving rebalances without taking records,
        # until the worker has taken half of it. Pausing at once, as before, paused and resumed
        # every few hundred records at full speed, and each pause drops what librdkafka
        # prefetched, which the resume fetches (and decodes) again: CPU and a broker round trip.
        # A rebalance waits at most PAUSE_AFTER + POLL_TIMEOUT for its callback.
        holding = False
        full_since = 0.0
        low = self.buffer_limit // 2
        while True:
            consume_now = True
            with self.cond:
                if self.closing:
                    return
                self._release_due()
                commits = self._take_commits()
                n = len(self.buffer)
                if holding:
                    if n > low:
                        # Wait for the worker's fetches (they notify) instead of polling for
                        # nothing; consume() below still runs every POLL_TIMEOUT, for callbacks.
                        self.cond.wait(POLL_TIMEOUT)
                        n = len(self.buffer)
                    holding = n > low
                elif n >= self.buffer_limit:
                    now = time.monotonic()
                    full_since = full_since or now
                    if now - full_since >= PAUSE_AFTER:
                        holding = True
                    else:
                        self.cond.wait(min(POLL_TIMEOUT, PAUSE_AFTER - (now - full_since)))
                        n = len(self.buffer)
                        consume_now = n < self.buffer_limit
                if n < self.buffer_limit:
                    full_since = 0.0
                room = self.buffer_limit - n
            try:
                for consumer, some in self._by_consumer(commits):
                    consumer.commit(offsets=some, asynchronous=True)
                # The producer's log lines (and delivery reports) are served only by a poll; the
                # worker produces only retries and dead letters, so a broker outage would pile
                # its reconnect logs up unseen.
                self.producer.poll(0)
                self._set_paused(holding)
                if not consume_now:
                    continue
                if holding or had_records:
                    msgs = self.consumer.consume(num_messages=max(1, min(room, CONSUME_MAX)), timeout=0)
                else:
                    msgs = self.consumer.consume(num_messages=1, timeout=POLL_TIMEOUT)
                # Buffered before anything else can raise: a consumed record that is not tracked
                # would be committed past by the records after it.
                if msgs:
                    self._take(msgs, self.topic)
                # The retry consumer never blocks: the wait above paces the loop for both (a
                # retry is due after its back-off anyway), and its consume() serves its group.
                retries = self.retry_consumer.consume(
                    num_messages=max(1, min(room - len(msgs), CONSUME_MAX)), timeout=0
                )
                if retries:
                    self._take(retries, self.retry_topic)
                had_records = bool(msgs or retries)
            except KafkaException as exc:
                self.errors.append(str(exc))
                time.sleep(POLL_TIMEOUT)
                continue
            except Exception as exc:
                if self.closing:  # the consumer was closed under us at exit
                    return
                # This thread is the worker's only way to its records and its group: if it
                # ended, the worker would live on and never fetch again. A callback's bug or an
                # unexpected client error is logged and the loop goes on.
                self.errors.append(repr(exc))
                self.log.error("kafka_poll_error", error=repr(exc))
                time.sleep(POLL_TIMEOUT)
                continue

    def _take(self, msgs: list[Message], topic: str) -> None:
        """Buffer ``msgs``, all of ``topic`` (each consumer reads one topic): the topic is not
        read per record, which would build a string per record and compare it."""
        now_ms = int(time.time() * 1000)
        # The per-record path of every message: names bound locally, no call that can be spared,
        # and the partition's lookups (assignment, track, generation) made once per run of
        # records from one partition, which is how consume() returns them. A run's new offsets
        # are started in one call (PartitionTrack.start_new); only a record below the track's
        # next offset (fetched again) goes through holds() and start() on its own.
        assigned, tracks, generation = self.assigned, self.tracks, self.generation
        retry = topic == self.retry_topic
        partition_eof = KafkaError._PARTITION_EOF
        run_partition: int | None = -1
        track: PartitionTrack | None = None
        started: list[int] = []  # the run's new offsets, not yet started in the track
        next_new = 0
        gen = 0
        with self.cond:
            append = self.buffer.append  # under the lock: a revoke replaces the buffer
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() != partition_eof:
                        self.errors.append(str(err))
                    continue
                partition, offset = m.partition(), m.offset()
                if partition != run_partition:
                    if track is not None:
                        track.start_new(started)
                    started = []
                    run_partition = partition
                    track = None
                    if partition is not None and (topic, partition) in assigned:
                        tp = (topic, partition)
                        track = tracks.get(tp)
                        if track is None and offset is not None:
                            track = tracks[tp] = PartitionTrack(committed=offset)
                        gen = generation[tp]
                        next_new = track.next_offset if track is not None else 0
                if track is None or offset is None:
                    continue  # revoked while in flight to us
                if offset >= next_new:
                    started.append(offset)
                    next_new = offset + 1
                else:
                    track.start_new(started)
                    started = []
                    if track.holds(offset):
                        continue
                    track.start(offset)
                    next_new = track.next_offset
                d = Delivery(m.value() or b"", _new_token((topic, partition, offset, gen)), 0.0, 0, m.key())
                if not retry:
                    append(d)
                    continue
                due = kc.header(m.headers(), kc.HEADER_DUE_MS)
                due_ms = int(due) if due and due.isdigit() else 0
                if due_ms > now_ms:
                    self.delayed_seq += 1
                    heapq.heappush(self.delayed, (due_ms, self.delayed_seq, d))
                    continue
                append(d)
            if track is not None:
                track.start_new(started)
            self.cond.notify_all()

    def _release_due(self) -> None:
        now_ms = int(time.time() * 1000)
        while self.delayed and self.delayed[0][0] <= now_ms:
            _, _, held = heapq.heappop(self.delayed)
            tp = _tp(held)
            if tp in self.assigned and self.generation.get(tp) == self._token(held.token).generation:
                self.buffer.append(held)

    def _take_commits(self) -> list[TopicPartition]:
        offsets = []
        for tp, point in self.to_commit.items():
            track = self.tracks.get(tp)
            if track is not None and tp in self.assigned:
                offsets.append(TopicPartition(tp[0], tp[1], point))
                track.mark_committed(point)
        self.to_commit.clear()
        return offsets

    def _by_consumer(self, tps: list[TopicPartition]) -> list[tuple[Any, list[TopicPartition]]]:
        """``tps`` split by the consumer (the group) that owns their topic, empty parts left out."""
        work = [tp for tp in tps if tp.topic != self.retry_topic]
        retry = [tp for tp in tps if tp.topic == self.retry_topic]
        return [(c, some) for c, some in ((self.consumer, work), (self.retry_consumer, retry)) if some]

    def _commit_now(
        self,
        consumer: Any,
        offsets: list[TopicPartition],
        event: str,
        deadline: float | None = None,
        *,
        in_callback: bool = False,
    ) -> bool:
        """A synchronous commit (revoke, close), tried again until ``deadline`` (by default
        COMMIT_RETRY_SECONDS from now) while the broker answers with a retriable error (a
        restart, NOT_COORDINATOR just after one). Whether it committed; what it fails to commit,
        the next owner redoes.

        confluent-kafka's synchronous commit takes no timeout: with the broker down one call
        blocked ~10 s (until the client gave its session up) before the deadline was even looked
        at, and with the broker stalled (SIGSTOP, its connections open) one had not returned
        after 6 minutes. So at close each try waits only for what is left of the deadline
        (:func:`_commit_within`). Not ``in_callback`` (a revoke, inside consume()): there a
        commit from another thread gets no answer until the callback returns (measured: every
        revoke's commit timed out at 5 s and came after the new owner's start), so the
        callback's own thread commits, which the client serves."""
        if deadline is None:
            deadline = time.monotonic() + COMMIT_RETRY_SECONDS
        while True:
            left = deadline - time.monotonic()
            outcome = (
                _commit_here(consumer, offsets) if in_callback else _commit_within(consumer, offsets, left)
            )
            if outcome is None:
                return True
            if isinstance(outcome, KafkaException):
                error = outcome.args[0] if outcome.args and isinstance(outcome.args[0], KafkaError) else None
                retry = error is not None and error.retriable()
            else:
                retry = False  # no answer in time, or the client itself failed
            left = deadline - time.monotonic()
            if not retry or left <= 0:
                self.log.warning(event, error=str(outcome))
                return False
            time.sleep(min(POLL_TIMEOUT, left))

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """An asynchronous commit's outcome (on the poll thread, inside consume). A failed one
        (the broker restarting, NOT_COORDINATOR, a rebalance in progress) is sent again on the
        next poll unless a later commit of that partition superseded it: otherwise the group's
        offset would stay behind work that is done, and once nothing more settles on that
        partition nothing would ever move it."""
        failed = [p for p in partitions if err is not None or p.error is not None]
        if not failed:
            return
        with self.cond:
            self.commit_failures += 1
            self.errors.append(f"commit failed, retried: {err if err is not None else failed[0].error}")
            for p in failed:
                tp = (p.topic, p.partition)
                track = self.tracks.get(tp)
                if (
                    track is not None
                    and tp in self.assigned
                    and p.offset >= 0
                    and track.committed == p.offset
                ):
                    self.to_commit[tp] = max(self.to_commit.get(tp, p.offset), p.offset)

    def _committable(self, tps: Any) -> list[TopicPartition]:
        offsets = []
        for tp in list(tps):
            track = self.tracks.get(tp)
            if track is not None:
                # Buffered and delayed records are open in the track: the commit stops below them.
                offsets.append(TopicPartition(tp[0], tp[1], track.committable()))
        return offsets

    def _set_paused(self, pause: bool) -> None:
        with self.cond:
            retry_full = len(self.delayed) >= DELAYED_MAX
            want = {tp for tp in self.assigned if pause or (retry_full and tp[0] == self.retry_topic)}
            # A newly assigned partition's state in librdkafka is not known here (a pause may
            # outlive a revoke and a later assign of the same partition): say it explicitly.
            unsure = self.pause_unknown & self.assigned
            self.pause_unknown.clear()
            to_pause = (want - self.paused) | (want & unsure)
            to_resume = ((self.paused - want) & self.assigned) | (unsure - want)
        try:
            for consumer, some in self._by_consumer([TopicPartition(t, p) for t, p in to_pause]):
                consumer.pause(some)
            for consumer, some in self._by_consumer([TopicPartition(t, p) for t, p in to_resume]):
                consumer.resume(some)
        except KafkaException as exc:
            # Never skip the consume() after this: it serves the rebalance that makes the
            # partitions valid again. The next loop says their state again.
            with self.cond:
                self.pause_unknown |= to_pause | to_resume
            self.errors.append(f"pause/resume: {exc}")
            return
        with self.cond:
            self.paused = (self.paused | to_pause) - to_resume

    # Rebalance callbacks run on the poll thread, inside consume().

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        with self.cond:
            # Whatever is still held of an earlier assignment of these partitions (a revoke or a
            # loss always forgets it first; this makes sure) must settle as gone, not finish
            # offsets in the new assignment's track: records are keyed by token alone.
            again = {(p.topic, p.partition) for p in partitions}
            self._drop(again)
            self._release_out(again)
            for p in partitions:
                tp = (p.topic, p.partition)
                self.generation[tp] = self.generation.get(tp, 0) + 1
                self.assigned.add(tp)
                self.tracks.pop(tp, None)
                self.paused.discard(tp)
                self.pause_unknown.add(tp)
            held = _describe(self.assigned)
        # Who owns what, when: the timeline of a slow drain starts here (rebalances are rare).
        self.log.info(
            "kafka_assigned", partitions=_describe((p.topic, p.partition) for p in partitions), holds=held
        )

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self.log.info("kafka_revoked", partitions=_describe(revoked))
        deadline = time.monotonic() + self.drain_seconds
        with self.cond:
            self.revokes += 1
            self._drop(revoked)
            # Let the revoked partitions' running tasks finish (other threads settle them).
            while self._running_on(revoked) and not self.closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, POLL_TIMEOUT))
            unfinished = self._running_on(revoked)
            self.redone_on_revoke += unfinished
            offsets = self._committable(revoked)
        if offsets and not self._commit_now(
            consumer, offsets, "kafka_revoke_commit_failed", in_callback=True
        ):
            self.revoke_commit_failures += 1
        if unfinished:
            self.log.info("kafka_revoked_unfinished", redone_by_next_owner=unfinished)
        with self.cond:
            self._forget(revoked)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in partitions}
        self.log.warning("kafka_lost", partitions=_describe(lost))
        with self.cond:
            self.lost += 1
            self._drop(lost)
            self._forget(lost)  # another member owns them now: committing would move its offsets

    def _running_on(self, tps: set[TP]) -> int:
        """Records of ``tps`` handed to the worker and not settled (a scan: rebalances are rare)."""
        return len([t for t in self.out if (t[0], t[1]) in tps])

    def _drop(self, tps: set[TP]) -> None:
        self.buffer = deque(d for d in self.buffer if _tp(d) not in tps)
        self.delayed = [e for e in self.delayed if _tp(e[2]) not in tps]
        heapq.heapify(self.delayed)

    def _forget(self, tps: set[TP]) -> None:
        for tp in tps:
            self.assigned.discard(tp)
            self.tracks.pop(tp, None)
            self.to_commit.pop(tp, None)
            self.paused.discard(tp)
        self._release_out(tps)
        self.cond.notify_all()

    def _release_out(self, tps: set[TP]) -> None:
        """Forget the handed-out records of ``tps``: their settles count as gone."""
        for t in [t for t in self.out if (t[0], t[1]) in tps]:
            self._release_key(self.out.pop(t).key)

    def _flush(self) -> None:
        left = self.producer.flush(PRODUCE_TIMEOUT)
        if left:
            raise KafkaOutageError(f"{left} records not acknowledged by Kafka within {PRODUCE_TIMEOUT:.0f} s")


def _commit_here(consumer: Any, offsets: list[TopicPartition]) -> Exception | None:
    """One synchronous commit in this thread: None once committed, or the exception it raised."""
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except Exception as exc:  # the caller's to judge: retriable, or logged as failed
        return exc
    return None


def _commit_within(consumer: Any, offsets: list[TopicPartition], timeout: float) -> Exception | None:
    """One synchronous commit, waited for at most ``timeout`` seconds: None once committed, the
    exception it raised, or a TimeoutError if it had not returned by then.

    For close(): the commit runs in a thread of its own because confluent-kafka cannot bound it,
    and an asynchronous commit's outcome would come only through a poll, which nobody makes once
    the poll thread has ended. (Not for a revoke: inside the rebalance callback such a commit
    gets no answer until the callback returns; see _commit_now.) A commit still waiting at the
    timeout is left to finish in that daemon thread: if it lands late it still covers only
    records this worker finished, so it can make work be redone, never skipped."""
    outcome: list[Exception | None] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_commit_here(consumer, offsets)),
        name="sluiceway-kafka-commit",
        daemon=True,
    )
    thread.start()
    thread.join(max(0.0, timeout))
    if not outcome:
        return TimeoutError(f"no answer to a synchronous commit within {max(0.0, timeout):.1f} s")
    return outcome[0]


def _describe(tps: Any) -> str:
    """``topic[0,3] topic.retry[1]``: partitions for a log line, grouped by topic."""
    by_topic: dict[str, list[int]] = {}
    for t, p in tps:
        by_topic.setdefault(t, []).append(p)
    return " ".join(f"{t}[{','.join(map(str, sorted(ps)))}]" for t, ps in sorted(by_topic.items()))


# --- construction from settings, and publishing --------------------------------------------------


def transport(settings: Any, worker_id: str) -> KafkaTransport:
    return KafkaTransport(
        settings.broker_url,
        settings.namespace,
        settings.queue,
        worker_id,
        ordering=os.environ.get(kc.ENV_ORDERING, ""),
        drain_seconds=settings.effective_drain_seconds,
    )


class KafkaSink:
    """Publishes with acks=all and idempotence; ``send`` returns once Kafka acknowledged every
    record, or raises :class:`KafkaOutageError` naming how many it did not. ``keys`` are the
    records' keys: Kafka's default partitioner puts one key's records on one partition, in order,
    which ``ordering: key`` relies on.

    A record without a key goes to the next partition in turn (per topic, across sends), so a
    burst spreads evenly and every partition's consumer gets its share. librdkafka's own choice
    for keyless records is sticky (one partition for a few ms at a time) and put whole bursts on
    one partition here: 999 of 1000 records on partition 0 of 6 once, when they were produced
    before the producer had the topic's metadata; a group drains no faster than its fullest
    partition, at one worker's speed."""

    takes_keys = True  # sluiceway.publish passes key= only to sinks that say this

    def __init__(self, url: str) -> None:
        self.url = url
        self.producer = Producer(kc.producer_config(url, "sluiceway-publish"))
        self.ready: set[tuple[str, str]] = set()
        self.partitions: dict[str, int] = {}  # topic -> partition count, read once per sink
        self.turn: dict[str, int] = {}  # topic -> the partition the next keyless record goes to
        self.lock = threading.Lock()  # the producer is thread-safe; the failure list is per send

    def _ensure(self, namespace: str, queue: str) -> None:
        if (namespace, queue) in self.ready:
            return
        # Until this sink has reached the cluster once, no broker answering fails the call in
        # seconds (a wrong URL, a port nothing listens on) instead of the metadata timeout;
        # after that, a broker down is a restart to wait for (kafka_common.cluster_metadata).
        reach = None if self.ready else kc.Reachability()
        admin = AdminClient(kc.admin_config(self.url, reach))
        kc.ensure_topics(
            admin,
            {
                kc.topic(namespace, queue): -1,
                kc.retry_topic(namespace, queue): -1,
                kc.dead_topic(namespace, queue): -1,
            },
            reachability=reach,
        )
        for name in (kc.topic(namespace, queue), kc.retry_topic(namespace, queue)):
            md = self.producer.list_topics(name, timeout=PRODUCE_TIMEOUT).topics.get(name)
            if md is not None and md.error is None and md.partitions:
                self.partitions[name] = len(md.partitions)
                self.turn[name] = random.randrange(len(md.partitions))  # publishers don't all start at 0
        self.ready.add((namespace, queue))

    def send(
        self,
        namespace: str,
        queue: str,
        payloads: Sequence[bytes],
        *,
        delay: float = 0.0,
        keys: Sequence[bytes | str | None] | None = None,
    ) -> None:
        if keys is not None and len(keys) != len(payloads):
            raise ValueError(f"keys: {len(keys)} keys for {len(payloads)} messages")
        self._ensure(namespace, queue)
        # A delayed publish is a retry record that is due later: the workers hold it until then.
        target = kc.retry_topic(namespace, queue) if delay > 0 else kc.topic(namespace, queue)
        headers: list[tuple[str, str | bytes | None]] | None = [kc.due_header(delay)] if delay > 0 else None
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        count = self.partitions.get(target, 0)
        keyless = len(payloads) if keys is None else sum(1 for k in keys if k is None)
        with self.lock:  # this send's turns, taken at once: sends from several threads interleave
            turn = self.turn.get(target, 0)
            if count:
                self.turn[target] = (turn + keyless) % count
        for i, payload in enumerate(payloads):
            key = keys[i] if keys is not None else None
            partition = -1  # librdkafka's partitioner: by the key's hash
            if key is None and count:
                partition, turn = turn, (turn + 1) % count
            while True:
                try:
                    self.producer.produce(
                        target,
                        value=payload,
                        key=key,
                        partition=partition,
                        headers=headers,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    self.producer.poll(0.1)
        left = self.producer.flush(PRODUCE_TIMEOUT)
        if left or failures:
            raise KafkaOutageError(
                f"Kafka did not acknowledge {left + len(failures)} of {len(payloads)} records "
                f"on {target}: {failures[0] if failures else 'timed out'}"
            )

    def close(self) -> None:
        self.producer.flush(PRODUCE_TIMEOUT)


def sink(url: str) -> KafkaSink:
    return KafkaSink(url)


class KafkaAsyncSink:
    """:class:`KafkaSink` from asyncio: a send (which blocks until Kafka acknowledged) runs in a
    thread, one at a time, keys included."""

    takes_keys = True

    def __init__(self, url: str) -> None:
        self.inner = KafkaSink(url)
        self.lock = asyncio.Lock()

    async def send(
        self,
        namespace: str,
        queue: str,
        payloads: Sequence[bytes],
        *,
        delay: float = 0.0,
        keys: Sequence[bytes | str | None] | None = None,
    ) -> None:
        async with self.lock:
            await asyncio.to_thread(self.inner.send, namespace, queue, payloads, delay=delay, keys=keys)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.inner.close)


def async_sink(url: str) -> KafkaAsyncSink:
    return KafkaAsyncSink(url)


def _is_a_transport(t: KafkaTransport) -> Transport:
    return t  # mypy checks here that KafkaTransport keeps the seam's Transport protocol
