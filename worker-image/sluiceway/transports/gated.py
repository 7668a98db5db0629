"""A plain :class:`~sluiceway.transports.base.Transport` made into a worker link: rate-limit
slots are taken from the fleet limiter first, and only as many messages are fetched as slots were
granted, so no message ever waits unacked in a worker for a slot it does not have.

Unused slots (the broker had fewer messages than slots) go straight back to the limiter when no
later lease exists; when one does, they are lost, which under-uses the limit but never exceeds it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sluiceway.ratelimit.redis import RedisLimiter
from sluiceway.transports.base import (
    Batch,
    Done,
    Exchanged,
    Outcomes,
    PendingExchange,
    SlotLease,
    Token,
    Transport,
    WorkerLink,
)

# How long a fetch waits for a first message. Short: the thread that fetches is one that has
# nothing to run, yet finished work it settled may wait on the next round trip's reply.
FETCH_WAIT = 0.02


class Gated:
    def __init__(
        self,
        transport: Transport,
        limiter: RedisLimiter | None,
        *,
        limiter_errors: tuple[type[BaseException], ...],
    ) -> None:
        self.transport = transport
        self.limiter = limiter if limiter is not None and limiter.limited else None
        self.outage_errors = tuple(dict.fromkeys((*transport.outage_errors, *limiter_errors)))

    def begin_exchange(self, outcomes: Outcomes, wanted: int) -> PendingExchange:
        try:
            settled = self.transport.settle(outcomes) if len(outcomes) else None
            batch = self._fetch(wanted) if wanted > 0 else Batch()
        except self.outage_errors as exc:
            return Done(exc)
        return Done(
            Exchanged(
                batch=batch,
                settle_error=settled.error if settled else "",
                gone=settled.gone if settled else 0,
            )
        )

    def _fetch(self, wanted: int) -> Batch:
        if self.limiter is None:
            return Batch(deliveries=self.transport.fetch(wanted, FETCH_WAIT))
        # A transport that can tell how many messages there are (Kafka's buffer, RabbitMQ's
        # ready count) is asked first, so slots are taken only for messages there are: a worker
        # whose partitions are elsewhere (or not assigned yet) would otherwise take slots the
        # fleet then loses, and an idle queue would cost every poll slots taken and handed back.
        available = getattr(self.transport, "available", None)
        if available is not None:
            wanted = min(wanted, available(FETCH_WAIT))
            if wanted <= 0:
                return Batch()
        slots = self.limiter.acquire(wanted)
        if slots.count == 0:
            return Batch(retry_after=slots.retry_after_us / 1e6)
        try:
            deliveries = self.transport.fetch(slots.count, FETCH_WAIT)
        except BaseException:
            self.limiter.release(slots.lease, slots.count)
            raise
        if len(deliveries) < slots.count:
            self.limiter.release(slots.lease, slots.count - len(deliveries))
        # Slot offsets count from the grant (dated on the limiter's clock, not when its reply
        # was read); the worker counts from when this returns, so the time since the grant (a
        # basic_get round trip per message on RabbitMQ) comes off, or every slot would start
        # that much late and overlap the next lease's.
        late = time.monotonic() - slots.granted
        for i, d in enumerate(deliveries):
            d.start_after = slots.start_after(i) - late
        # A partial hand-back changed the limiter's state, so this lease can no longer return
        # more. Its tasks still wait for their slots: the worker starts a task whose lease is None
        # at once (that means "not rate-limited"), which bunched a partial batch's starts and
        # broke the 1-s bound. They keep a lease that can hand nothing back (empty state).
        lease = slots.lease if len(deliveries) == slots.count else _spent(slots.lease)
        return Batch(deliveries=deliveries, slots=lease)

    def give_back(
        self,
        tokens: Sequence[Token],
        slots: SlotLease | None,
        unused_slots: int,
        *,
        redelivered: bool = False,
    ) -> int:
        n = self.transport.give_back(tokens, redelivered=redelivered) if tokens else 0
        if self.limiter is not None and slots is not None and unused_slots:
            self.limiter.release(slots, unused_slots)
        return n

    def acquire_slot(self) -> float:
        if self.limiter is None:
            return 0.0
        slots = self.limiter.acquire(1)
        if slots.count == 0:
            return -max(slots.retry_after_us / 1e6, 0.001)
        # Granted, so never below 0 (that would read as "none granted"): a slot that passed
        # while its reply waited starts at once.
        return max(0.0, slots.start_after(0) - (time.monotonic() - slots.granted))

    def renew(self, tokens: Sequence[Token]) -> int:
        return self.transport.renew(tokens)

    def recover(self) -> int:
        return self.transport.recover()

    def adopt_orphans(self) -> int:
        return 0  # a broker that redelivers by itself has no leases left behind

    def close(self) -> None:
        self.transport.close()


def _spent(lease: SlotLease | None) -> SlotLease | None:
    """A lease whose slots are taken but which can hand none back (release.lua refuses '')."""
    return None if lease is None else SlotLease(tat="", interval_us=lease.interval_us)


def _conforms(g: Gated) -> WorkerLink:
    return g  # mypy checks Gated against the seam's protocol
