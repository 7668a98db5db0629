"""The Redis broker: a LIST per queue, per-worker lease ZSETs, all moves done by Lua scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis as redis_lib

from sluiceway.brokers import Batch, Delivery, SlotLease
from sluiceway.contract import Keys
from sluiceway.scripts import Scripts

# How many due retries one fetch promotes; bounds the script's run time (Redis is single-threaded).
PROMOTE_LIMIT = 1000
REAP_LIMIT = 1000


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

    def exchange(
        self,
        acks: Sequence[bytes],
        retries: Sequence[tuple[bytes, bytes, float]],
        deads: Sequence[tuple[bytes, bytes]],
        wanted: int,
    ) -> tuple[int, Batch]:
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        if acks:
            self.scripts.ack(keys=[self._inflight, k.stats, k.redeliveries], args=list(acks), client=pipe)
        for token, payload, delay in retries:
            self.scripts.retry(
                keys=[self._inflight, k.delayed, k.stats, k.redeliveries],
                args=[token, payload, int(delay * 1000)],
                client=pipe,
            )
        for token, entry in deads:
            self.scripts.dead(
                keys=[self._inflight, k.dead, k.stats, k.redeliveries], args=[token, entry], client=pipe
            )
        if wanted > 0:
            self.scripts.fetch(
                keys=[
                    k.ready,
                    k.delayed,
                    self._inflight,
                    k.leased_workers,
                    k.ratelimit,
                    k.sequence,
                    k.redeliveries,
                ],
                args=[
                    self.worker_id,
                    wanted,
                    self.lease_ms,
                    self.qps,
                    self.burst,
                    self.horizon_us,
                    PROMOTE_LIMIT,
                ],
                client=pipe,
            )
        # Settling comes first in the pipeline, so the fetch already sees the freed room.
        results = pipe.execute()
        acked = int(results[0]) if acks else 0
        return acked, self._batch(results[-1]) if wanted > 0 else Batch()

    def _batch(self, reply: list[Any]) -> Batch:
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
        slots = SlotLease(tat.decode(), interval_us) if self.qps > 0 and tat else None
        return Batch(deliveries=deliveries, slots=slots)

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

    def deregister(self) -> None:
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(k.heartbeat(self.worker_id))
        pipe.zrem(k.workers, self.worker_id)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


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
