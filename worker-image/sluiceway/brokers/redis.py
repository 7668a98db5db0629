"""The Redis broker: a LIST per queue, per-worker lease ZSETs, all moves done by Lua scripts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis as redis_lib
from redis.commands.core import Script

from sluiceway.brokers import Batch, Delivery, Exchanged, SlotLease
from sluiceway.contract import Keys
from sluiceway.scripts import Scripts

# How many due retries one fetch promotes; bounds the script's run time (Redis is single-threaded).
PROMOTE_LIMIT = 1000
REAP_LIMIT = 1000
ACK_CHUNK = 1000


class RedisBroker:
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
        self.scripts = Scripts.register(client)
        self._inflight = keys.inflight(worker_id)

    def begin_exchange(
        self,
        acks: Sequence[bytes],
        retries: Sequence[tuple[bytes, bytes, float]],
        deads: Sequence[tuple[bytes, bytes]],
        wanted: int,
    ) -> RedisExchange:
        k = self.keys
        calls: list[tuple[Script, list[Any]]] = []
        # Lua's unpack() takes about 8,000 values at most; the ack script unpacks its arguments.
        for i in range(0, len(acks), ACK_CHUNK):
            calls.append(
                (self.scripts.ack, [3, self._inflight, k.stats, k.redeliveries, *acks[i : i + ACK_CHUNK]])
            )
        ack_calls = len(calls)
        for token, payload, delay in retries:
            calls.append(
                (
                    self.scripts.retry,
                    [
                        4,
                        self._inflight,
                        k.delayed,
                        k.stats,
                        k.redeliveries,
                        token,
                        payload,
                        int(delay * 1000),
                    ],
                )
            )
        for token, entry in deads:
            calls.append(
                (self.scripts.dead, [4, self._inflight, k.dead, k.stats, k.redeliveries, token, entry])
            )
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
                        k.redeliveries,
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

    def give_back(self, tokens: Sequence[bytes], slots: SlotLease | None, unused_slots: int) -> int:
        if not tokens and not (slots and unused_slots):
            return 0
        k = self.keys
        return int(
            self.scripts.requeue(
                keys=[self._inflight, k.ready, k.ratelimit, k.stats],
                args=[slots.tat if slots else "", slots.interval_us if slots else 0, unused_slots, *tokens],
            )
        )

    def acquire_slot(self) -> float:
        """Take one fresh rate-limit slot; returns seconds until it starts, or -1 with none granted
        (then ``-retry_after``). Used for a message whose slot went stale while its worker stalled."""
        count, first_offset_us, _, retry_after_us, _ = self.scripts.acquire(
            keys=[self.keys.ratelimit], args=[self.qps, self.burst, self.horizon_us, 1]
        )
        if int(count) == 0:
            return -max(float(retry_after_us) / 1e6, 0.001)
        return max(float(first_offset_us) / 1e6, 0.0)

    def renew(self, tokens: Sequence[bytes]) -> int:
        if not tokens:
            return 0
        return int(self.scripts.renew(keys=[self._inflight], args=[self.lease_ms, *tokens]))

    def recover(self) -> int:
        return reap(self.client, self.keys, self.scripts)

    def adopt_orphans(self) -> int:
        return reap(self.client, self.keys, self.scripts, worker_id=self.worker_id, force=True)

    def write_heartbeat(self, heartbeat: str, ttl_seconds: float) -> None:
        k = self.keys
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(k.heartbeat(self.worker_id), heartbeat, px=int(ttl_seconds * 1000))
        pipe.zadd(k.workers, {self.worker_id: now_ms})
        # Forget workers silent for a long time, so the set does not grow with every pod ever run.
        pipe.zremrangebyscore(k.workers, "-inf", now_ms - 3_600_000)
        pipe.execute()

    def deregister(self) -> None:
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(k.heartbeat(self.worker_id))
        pipe.zrem(k.workers, self.worker_id)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class RedisExchange:
    """A settle-and-fetch pipeline that is sent and not yet read.

    The worker keeps running tasks while Redis executes it, instead of waiting for the reply.
    Built by hand rather than with redis-py's ``Pipeline``, which asks ``SCRIPT EXISTS`` before
    every pipeline that runs a script (a second round trip); here a script Redis no longer knows
    (after a restart) is loaded and rerun only when its reply says so.
    """

    def __init__(
        self, broker: RedisBroker, calls: list[tuple[Script, list[Any]]], *, ack_calls: int, wanted: int
    ) -> None:
        self.broker = broker
        self.calls = calls
        self.ack_calls = ack_calls
        self.wanted = wanted
        pool = broker.client.connection_pool
        conn: Any = pool.get_connection()  # redis-py's connection methods are untyped
        self.conn: Any = conn
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
        self._release(broken=False)
        for i, err in list(errors.items()):
            if isinstance(err, redis_lib.exceptions.NoScriptError):
                # Redis lost its scripts (a restart). A command that said NOSCRIPT did not run,
                # so running it now, through the client that loads scripts on demand, runs it
                # exactly once.
                script, args = self.calls[i]
                try:
                    replies[i] = script(keys=args[1 : 1 + args[0]], args=args[1 + args[0] :])
                    del errors[i]
                except redis_lib.ResponseError as again:
                    errors[i] = again
        fetch_index = len(self.calls) - 1 if self.wanted > 0 else -1
        if fetch_index in errors:
            raise errors[fetch_index]
        batch = _batch(replies[fetch_index], self.broker.qps) if fetch_index >= 0 else Batch()
        # An ack call's arguments are the key count, three keys, then one token per ack.
        gone = sum(
            len(self.calls[i][1]) - 4 - int(replies[i]) for i in range(self.ack_calls) if i not in errors
        )
        return Exchanged(batch=batch, settle_error=str(next(iter(errors.values()), "")), gone=gone)

    def _release(self, *, broken: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if broken:
            conn.disconnect()
        self.broker.client.connection_pool.release(conn)


def reap(
    client: redis_lib.Redis,
    keys: Keys,
    scripts: Scripts | None = None,
    *,
    worker_id: str = "",
    force: bool = False,
    count_redelivery: bool = True,
) -> int:
    """Return expired leases (or, with ``force``, all leases of ``worker_id``) to the queue."""
    s = scripts or Scripts.register(client)
    total = 0
    while True:
        n = int(
            s.reap(
                keys=[keys.ready, keys.leased_workers, keys.redeliveries, keys.stats],
                args=[
                    keys.prefix,
                    REAP_LIMIT,
                    worker_id,
                    "1" if force else "0",
                    "1" if count_redelivery else "0",
                ],
            )
        )
        total += n
        if n < REAP_LIMIT:
            return total


def _batch(reply: list[Any], qps: float) -> Batch:
    """The fetch script's reply as a batch of deliveries."""
    first_offset_us = float(reply[0])
    interval_us = float(reply[1])
    retry_after_us = float(reply[2])
    tat = reply[3]
    counts = reply[4]
    members: list[bytes] = reply[5:]
    if not members:
        return Batch(retry_after=retry_after_us / 1e6)
    deliveries = []
    for i, member in enumerate(members):
        offset = first_offset_us + i * interval_us
        deliveries.append(
            Delivery(
                payload=member[member.index(b":") + 1 :],
                token=member,
                start_after=offset / 1e6 if offset > 0 else 0.0,
                redeliveries=int(counts[i]) if counts else 0,
            )
        )
    slots = SlotLease(tat.decode(), interval_us) if qps > 0 and tat else None
    return Batch(deliveries=deliveries, slots=slots)
