"""The broker interface the worker runs on. Small on purpose: exchange, renew, give back.

A broker hands out *deliveries*: a payload plus an opaque token that settles it. Fetching already
honours the fleet-wide rate limit: each delivery carries the earliest moment its task may start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)  # not frozen: one is built per message, and frozen init costs 3x
class Delivery:
    payload: bytes
    token: bytes  # settles this delivery; opaque to the worker
    start_after: float = 0.0  # seconds after the fetch returned; the rate-limit slot
    redeliveries: int = 0  # times a lease on this payload expired without being settled


@dataclass(frozen=True, slots=True)
class SlotLease:
    """What a worker needs to hand unused rate-limit slots back."""

    tat: str  # the limiter state right after this lease, compared exactly on hand-back
    interval_us: float


@dataclass(frozen=True, slots=True)
class Batch:
    deliveries: list[Delivery] = field(default_factory=list)
    # When the rate limit granted nothing: seconds until a slot can be had.
    retry_after: float = 0.0
    slots: SlotLease | None = None


@dataclass(frozen=True, slots=True)
class Exchanged:
    """What one round trip did."""

    batch: Batch  # the newly leased messages (empty when none were wanted)
    # Not empty: some settling failed, and every outcome of this round trip must be sent again
    # (settling twice is harmless: a lease is removed once).
    settle_error: str = ""
    # Acks whose lease was already gone: the message was requeued (its worker looked dead) and
    # may run again, which at-least-once allows.
    gone: int = 0


class PendingExchange(Protocol):
    def result(self) -> Exchanged:
        """Read the round trip's outcome. Raises the broker's error if it could not fetch."""
        ...


class Broker(Protocol):
    def begin_exchange(
        self,
        acks: Sequence[bytes],
        retries: Sequence[tuple[bytes, bytes, float]],
        deads: Sequence[tuple[bytes, bytes]],
        wanted: int,
    ) -> PendingExchange:
        """Send one round trip: settle finished deliveries (all three kinds), then lease up to
        ``wanted`` more. The worker runs tasks while it is in transit and reads it later."""
        ...

    def give_back(self, tokens: Sequence[bytes], slots: SlotLease | None, unused_slots: int) -> int:
        """Return unstarted or unfinished deliveries to the queue at once (graceful shutdown)."""
        ...

    def acquire_slot(self) -> float:
        """One fresh rate-limit slot: seconds until it starts, or minus the wait when none."""
        ...

    def renew(self, tokens: Sequence[bytes]) -> int: ...

    def recover(self) -> int:
        """Return expired leases of any worker to the queue; returns how many."""
        ...

    def adopt_orphans(self) -> int:
        """At start: return leases a previous process with our worker id left behind."""
        ...

    def write_heartbeat(self, heartbeat: str, ttl_seconds: float) -> None: ...

    def deregister(self) -> None:
        """Remove this worker's heartbeat on a clean exit."""
        ...

    def close(self) -> None: ...
