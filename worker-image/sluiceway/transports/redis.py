"""The Redis transport: a LIST per queue, per-worker lease ZSETs, every move done by a Lua script.

Its own optimisations, behind the same seam as every broker:

- the fetch script takes rate-limit slots and messages in one atomic step (``lua/fetch.lua``), so
  this transport is a :class:`~sluiceway.transports.base.WorkerLink` itself and needs no
  :class:`~sluiceway.transports.gated.Gated`;
- one round trip settles and fetches, and it is sent ahead (:class:`RedisExchange`): the worker
  keeps running tasks while Redis works.

A lease (the settle token) is the member ``<seq>[.<redeliveries>]:<payload>`` of the worker's
in-flight ZSET (the count only when it is not 0, so the payload is everything after the first
``:``, as in earlier versions: during a rolling upgrade either version reaps the other's leases): the sequence makes each delivery unique, so identical payloads are separate
messages, and the redelivery count travels with the message, not with its payload.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, Final, cast

import redis as redis_lib
from redis.commands.core import Script

from sluiceway import connection
from sluiceway.contract import Keys
from sluiceway.ratelimit.clock import ServerClock
from sluiceway.scripts import Scripts
from sluiceway.transports.base import (
    AsyncSink,
    Batch,
    Delivery,
    Exchanged,
    Outcomes,
    Sink,
    SlotLease,
    Token,
    WorkerLink,
)

# How many due retries one fetch promotes; bounds the script's run time (Redis is single-threaded).
PROMOTE_LIMIT = 1000
REAP_LIMIT = 1000
ACK_CHUNK = 1000
_PUBLISH_CHUNK = 1000  # messages per LPUSH: large enough to amortize, small enough not to stall Redis

outage_errors: tuple[type[BaseException], ...] = (redis_lib.RedisError,)

# Replies that mean the command did not run where it was sent, so running it again through the
# client (which loads scripts on demand and, on a cluster, follows MOVED and ASK, refreshing its
# slot map on MOVED) runs it exactly once.
_RUN_AGAIN: Final[tuple[type[redis_lib.ResponseError], ...]] = (
    redis_lib.exceptions.NoScriptError,
    redis_lib.exceptions.AskError,  # and MovedError, its subclass
    redis_lib.exceptions.TryAgainError,
)


class RedisTransport:
    outage_errors = outage_errors

    def __init__(
        self,
        client: redis_lib.Redis,
        keys: Keys,
        worker_id: str,
        *,
        lease_seconds: float,
        qps: float = 0.0,
        burst: int = 0,
        horizon_seconds: float = 0.1,
    ) -> None:
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        self.lease_ms = int(lease_seconds * 1000)
        self.qps = qps
        self.burst = burst
        self.horizon_us = int(horizon_seconds * 1_000_000)
        self.clock = ServerClock()  # the limiter's clock on ours, for dating slots
        self.scripts = Scripts.register(client)
        self._inflight = keys.inflight(worker_id)
        self.cluster = connection.is_cluster(client)
        self._stale_slots = False  # a cluster connection broke: ask for the slot map again

    def pool(self) -> Any:
        """The connection pool the exchange uses: the client's own, or on a Redis Cluster that of
        the node owning the queue's slot (every key of a queue shares its hash tag, so all of an
        exchange's commands go to that one node)."""
        if not self.cluster:
            return self.client.connection_pool
        cluster: Any = self.client
        if self._stale_slots:
            self._stale_slots = False
            # A failover or a restart may have moved the slot; if the map cannot be read now,
            # getting a connection below fails and the worker backs off as for any outage.
            with contextlib.suppress(redis_lib.RedisError, OSError):
                cluster.nodes_manager.initialize()
        node = cluster.get_node_from_key(self.keys.ready)
        return cluster.get_redis_connection(node).connection_pool

    def begin_exchange(self, outcomes: Outcomes, wanted: int) -> RedisExchange:
        k = self.keys
        acks = cast(Sequence[bytes], outcomes.acks)
        calls: list[tuple[Script, list[Any]]] = []
        # Lua's unpack() takes about 8,000 values at most; the ack script unpacks its arguments.
        for i in range(0, len(acks), ACK_CHUNK):
            calls.append((self.scripts.ack, [2, self._inflight, k.stats, *acks[i : i + ACK_CHUNK]]))
        ack_calls = len(calls)
        for r in outcomes.retries:
            calls.append(
                (
                    self.scripts.retry,
                    [3, self._inflight, k.delayed, k.stats, r.token, r.payload, int(r.delay * 1000)],
                )
            )
        for d in outcomes.deads:
            calls.append((self.scripts.dead, [3, self._inflight, k.dead, k.stats, d.token, d.record]))
        if wanted > 0:
            # Settling comes first, so the fetch already sees the room it freed.
            calls.append(
                (
                    self.scripts.fetch,
                    [
                        7,
                        k.ready,
                        k.delayed,
                        self._inflight,
                        k.leased_workers,
                        k.ratelimit,
                        k.sequence,
                        k.redelivered,
                        self.worker_id,
                        wanted,
                        self.lease_ms,
                        self.qps,
                        self.burst,
                        self.horizon_us,
                        PROMOTE_LIMIT,
                    ],
                )
            )
        return RedisExchange(self, calls, ack_calls=ack_calls, wanted=wanted)

    def give_back(
        self,
        tokens: Sequence[Token],
        slots: SlotLease | None,
        unused_slots: int,
        *,
        redelivered: bool = False,
    ) -> int:
        """Return leases to the queue at once. ``redelivered``: they were running (the grace
        period ended first), which counts as a redelivery."""
        if not tokens and not (slots and unused_slots):
            return 0
        k = self.keys
        return int(
            self.scripts.requeue(
                keys=[self._inflight, k.ready, k.ratelimit, k.stats, k.redelivered],
                args=[
                    slots.tat if slots else "",
                    slots.interval_us if slots else 0,
                    unused_slots,
                    1 if redelivered else 0,
                    *cast(Sequence[bytes], tokens),
                ],
            )
        )

    def acquire_slot(self) -> float:
        """Take one fresh rate-limit slot; returns seconds until it starts, or minus the wait
        with none granted. For a message whose slot went stale while its worker stalled."""
        sent = time.monotonic()
        count, first_offset_us, _, retry_after_us, _, server_us = self.scripts.acquire(
            keys=[self.keys.ratelimit], args=[self.qps, self.burst, self.horizon_us, 1]
        )
        shift = self._slot_shift(sent, time.monotonic(), float(server_us) / 1e6)
        if int(count) == 0:
            return -max(float(retry_after_us) / 1e6, 0.001)
        # Granted, so never below 0 (that would read as "none granted"): a slot that passed
        # while its reply waited starts at once.
        return max(0.0, max(float(first_offset_us) / 1e6, 0.0) + shift)

    def _slot_shift(self, sent: float, received: float, server: float) -> float:
        """What to add to a slot's offset from the server's ``server`` (its clock when the script
        ran) to count it from now instead: at most 0, by however long the reply waited to be
        read beyond the best round trip seen (ratelimit.clock)."""
        self.clock.observe(sent, received, server)
        now = time.monotonic()
        return self.clock.local(server, now) - now

    def renew(self, tokens: Sequence[Token]) -> int:
        if not tokens:
            return 0
        return int(
            self.scripts.renew(keys=[self._inflight], args=[self.lease_ms, *cast(Sequence[bytes], tokens)])
        )

    def recover(self) -> int:
        return reap(self.client, self.keys, self.scripts)

    def adopt_orphans(self) -> int:
        return reap(self.client, self.keys, self.scripts, worker_id=self.worker_id, force=True)

    def close(self) -> None:
        pass  # the client is the coordination client; its owner closes it


class RedisExchange:
    """A settle-and-fetch pipeline that is sent and not yet read.

    The worker keeps running tasks while Redis executes it, instead of waiting for the reply.
    Built by hand rather than with redis-py's ``Pipeline``, which asks ``SCRIPT EXISTS`` before
    every pipeline that runs a script (a second round trip); here a script Redis no longer knows
    (after a restart) is loaded and rerun only when its reply says so. On a Redis Cluster the
    commands go to the node that owns the queue's slot; a command answered ``MOVED`` or ``ASK``
    (the slot moved) is run again through the cluster client, in order, which follows the
    redirect and refreshes the slot map for the next exchange.
    """

    def __init__(
        self, transport: RedisTransport, calls: list[tuple[Script, list[Any]]], *, ack_calls: int, wanted: int
    ) -> None:
        self.transport = transport
        self.calls = calls
        self.ack_calls = ack_calls
        self.wanted = wanted
        self.pool: Any = transport.pool()
        conn: Any = self.pool.get_connection()  # redis-py's connection methods are untyped
        self.conn: Any = conn
        self.sent = time.monotonic()  # dates the fetch's slots (see ratelimit.clock)
        try:
            conn.send_packed_command(
                conn.pack_commands([("EVALSHA", script.sha, *args) for script, args in calls])
            )
        except BaseException:
            self._release(broken=True)
            raise

    def result(self) -> Exchanged:
        """Read the replies. Raises if the connection failed or the fetch did; a failed settle
        only marks the result, so the messages the fetch leased are never dropped."""
        if self.conn is None:
            raise RuntimeError("this exchange was already read")
        replies: list[Any] = []
        errors: dict[int, redis_lib.ResponseError] = {}
        try:
            for i in range(len(self.calls)):
                try:
                    replies.append(self.conn.read_response())
                except redis_lib.ResponseError as exc:
                    # Keep reading, so the connection stays in step with its replies.
                    replies.append(None)
                    errors[i] = exc
        except BaseException:
            self._release(broken=True)
            raise
        sent, received = self.sent, time.monotonic()
        self._release(broken=False)
        fetch_index = len(self.calls) - 1 if self.wanted > 0 else -1
        for i, err in list(errors.items()):
            if isinstance(err, _RUN_AGAIN):
                # Redis lost its scripts (a restart), or on a cluster the slot moved. Either way
                # the command did not run; in index order, settles still come before the fetch.
                script, args = self.calls[i]
                try:
                    again_sent = time.monotonic()
                    replies[i] = script(keys=args[1 : 1 + args[0]], args=args[1 + args[0] :])
                    if i == fetch_index:  # the fetch's clock was read in this round trip
                        sent, received = again_sent, time.monotonic()
                    del errors[i]
                except redis_lib.ResponseError as again:
                    errors[i] = again
        if fetch_index in errors:
            raise errors[fetch_index]
        batch = Batch()
        if fetch_index >= 0:
            reply = replies[fetch_index]
            shift = 0.0
            if self.transport.qps > 0:
                shift = self.transport._slot_shift(sent, received, float(reply[4]) / 1e6)
            batch = _batch(reply, self.transport.qps, shift)
        # An ack call's arguments are the key count, two keys, then one token per ack.
        gone = sum(
            len(self.calls[i][1]) - 3 - int(replies[i]) for i in range(self.ack_calls) if i not in errors
        )
        return Exchanged(batch=batch, settle_error=str(next(iter(errors.values()), "")), gone=gone)

    def _release(self, *, broken: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if broken:
            conn.disconnect()
            self.transport._stale_slots = self.transport.cluster
        self.pool.release(conn)


def reap(
    client: redis_lib.Redis,
    keys: Keys,
    scripts: Scripts | None = None,
    *,
    worker_id: str = "",
    force: bool = False,
    count_redelivery: bool = True,
) -> int:
    """Return expired leases (or, with ``force``, all leases of ``worker_id``) to the queue.

    The script is told every key it touches, so the lease holders are read first: a worker that
    takes its first lease in between is looked at on the next round, when its leases can expire.
    """
    s = scripts or Scripts.register(client)
    total = 0
    while True:
        workers = [worker_id] if worker_id else sorted(_text(w) for w in client.smembers(keys.leased_workers))
        if not workers:
            return total
        n = int(
            s.reap(
                keys=[
                    keys.redelivered,
                    keys.leased_workers,
                    keys.stats,
                    *(keys.inflight(w) for w in workers),
                ],
                args=[REAP_LIMIT, "1" if force else "0", "1" if count_redelivery else "0", *workers],
            )
        )
        total += n
        if n < REAP_LIMIT:
            return total


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def delivery(member: bytes, start_after: float = 0.0) -> Delivery:
    """The delivery a lease member (``<seq>[.<redeliveries>]:<payload>``) stands for."""
    # Two finds and one slice, and no int() for the usual count of 0. _batch inlines the same
    # parsing for a batch without a rate limit; keep the two alike.
    a = member.index(b":")
    dot = member.find(b".", 0, a)
    count = int(member[dot + 1 : a]) if dot >= 0 else 0
    return Delivery(payload=member[a + 1 :], token=member, start_after=start_after, redeliveries=count)


def _batch(reply: list[Any], qps: float, shift: float = 0.0) -> Batch:
    """The fetch script's reply as a batch of deliveries; ``shift`` (see _slot_shift) is added to
    every slot's start, so a slot whose time passed while its reply waited can come out below 0."""
    first_offset_us = float(reply[0])
    interval_us = float(reply[1])
    retry_after_us = float(reply[2])
    tat = reply[3]
    members: list[bytes] = reply[6:]
    if not members:
        return Batch(retry_after=retry_after_us / 1e6)
    if first_offset_us <= 0 and interval_us == 0:  # no rate limit: every message may start now
        # delivery() inlined: this loop runs once per message, and a call per member costs more
        # than the parsing itself. A member without a "." before its ":" was never redelivered.
        deliveries: list[Delivery] = []
        add = deliveries.append
        for m in members:
            a = m.index(b":")
            dot = m.find(b".", 0, a)
            add(Delivery(m[a + 1 :], m, 0.0, int(m[dot + 1 : a]) if dot >= 0 else 0))
    else:
        deliveries = []
        for i, member in enumerate(members):
            offset = first_offset_us + i * interval_us
            deliveries.append(delivery(member, (offset / 1e6 if offset > 0 else 0.0) + shift))
    slots = SlotLease(tat.decode(), interval_us) if qps > 0 and tat else None
    return Batch(deliveries=deliveries, slots=slots)


# --- Registry entry points -----------------------------------------------------------------------


def link(settings: Any, worker_id: str, client: redis_lib.Redis) -> RedisTransport:
    """The worker's link: the queue lives on the coordination Redis itself."""
    return RedisTransport(
        client,
        Keys(settings.namespace, settings.queue),
        worker_id,
        lease_seconds=settings.lease_seconds,
        qps=settings.qps,
        burst=settings.qps_burst,
        horizon_seconds=settings.qps_horizon,
    )


class RedisSink:
    """Publishes with LPUSH (ZADD on the server's clock for a delay). Thread-safe."""

    def __init__(self, url: str) -> None:
        self.client: redis_lib.Redis = connection.client(url)

    def send(self, namespace: str, queue: str, payloads: Sequence[bytes], *, delay: float = 0.0) -> None:
        keys = Keys(namespace, queue)
        if delay > 0:
            due = _server_ms(self.client.time()) + int(delay * 1000)
            self.client.zadd(keys.delayed, dict.fromkeys(payloads, due))
            return
        if len(payloads) == 1:
            self.client.lpush(keys.ready, payloads[0])
            return
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(payloads), _PUBLISH_CHUNK):
            pipe.lpush(keys.ready, *payloads[i : i + _PUBLISH_CHUNK])
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class AsyncRedisSink:
    def __init__(self, url: str) -> None:
        self.client = connection.async_client(url)

    async def send(
        self, namespace: str, queue: str, payloads: Sequence[bytes], *, delay: float = 0.0
    ) -> None:
        keys = Keys(namespace, queue)
        if delay > 0:
            due = _server_ms(await self.client.time()) + int(delay * 1000)
            await self.client.zadd(keys.delayed, dict.fromkeys(payloads, due))
            return
        if len(payloads) == 1:
            await self.client.lpush(keys.ready, payloads[0])
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for i in range(0, len(payloads), _PUBLISH_CHUNK):
                pipe.lpush(keys.ready, *payloads[i : i + _PUBLISH_CHUNK])
            await pipe.execute()

    async def aclose(self) -> None:
        await self.client.aclose()


def sink(url: str) -> RedisSink:
    return RedisSink(url)


def async_sink(url: str) -> AsyncRedisSink:
    return AsyncRedisSink(url)


def _server_ms(t: tuple[int, int]) -> int:
    # Delays are measured on the Redis clock, like the retry schedule, so publisher skew is moot.
    return int(t[0]) * 1000 + int(t[1]) // 1000


def _conforms(t: RedisTransport, s: RedisSink, a: AsyncRedisSink) -> tuple[WorkerLink, Sink, AsyncSink]:
    return t, s, a  # mypy checks these classes against the seam's protocols
