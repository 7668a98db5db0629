"""The broker seam: what a transport must do, and nothing a broker-blind worker need not see.

Two shapes, one for each side of the seam:

- :class:`Transport` is what a broker implements (RabbitMQ, Kafka). It only MOVES messages:
  ``fetch`` up to N deliveries within a short wait, ``settle`` a batch of outcomes (ack; retry after
  a delay with the next attempt's payload; dead-letter with a reason record), ``give_back``
  unstarted deliveries at once, ``renew`` what it still holds (a no-op where the broker keeps
  deliveries alive itself), ``recover`` leases of dead workers (0 where the broker redelivers by
  itself), ``close``. ``outage_errors`` lists the exception types that mean "the broker is
  unreachable for now": the worker retries those with back-off and never dies of them; any other
  exception is a bug and is reported as one.

- :class:`WorkerLink` is what the worker runs on: one round trip that settles and fetches
  (``begin_exchange``, sent now and read later, so a worker can keep running tasks while it is in
  transit), with every delivery already holding its fleet rate-limit slot. A plain transport
  becomes a link through :class:`sluiceway.transports.gated.Gated`, which takes slots from the
  fleet limiter (:mod:`sluiceway.ratelimit`) BEFORE fetching, so a rate-limited message never
  waits unacked in a worker's memory. The Redis transport is a link itself: its fetch script
  fuses slots and messages in one step.

Rules every transport keeps (the conformance suite in ``tests/conformance/`` checks them):

- ``Delivery.payload`` is the bytes exactly as published, never re-encoded.
- ``Delivery.token`` is opaque and hashable; only the transport reads it. Settling a token twice,
  or one whose delivery was already redelivered elsewhere, is harmless (it counts as ``gone``).
- Settling may complete out of order (Kafka commits only the contiguous finished prefix of each
  partition; RabbitMQ acks by delivery tag; Redis by lease).
- ``redeliveries`` counts how often THIS message (not an equal payload) went back to the queue
  without being settled: a worker died, hung, or handed it back at exit while it ran. The worker
  dead-letters a message whose attempts plus redeliveries reach ``max_attempts``.
- A dead-letter ``record`` is the JSON of :func:`sluiceway.deadletter.record`: the reason, and the
  payload byte for byte (text, or base64 when it is not valid UTF-8).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sluiceway.coordination.base import Coordinator

Token = Hashable  # opaque settle handle: Redis lease member, RabbitMQ delivery tag, Kafka offset


@dataclass(slots=True)  # not frozen: one is built per message, and frozen init costs 3x
class Delivery:
    payload: bytes  # exactly as published
    token: Token  # settles this delivery; opaque to the worker
    # Seconds after the fetch returned until its rate-limit slot starts (set by the link).
    start_after: float = 0.0
    # Times this message went back to the queue unsettled (worker death, hang, hand-back mid-run).
    redeliveries: int = 0
    key: bytes | None = None  # the broker's message key where it has one (Kafka)


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the message again after ``delay`` seconds, as ``payload`` (the next attempt)."""

    token: Token
    payload: bytes
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move the message to the dead-letter queue; ``record`` is the JSON dead-letter record."""

    token: Token
    record: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Finished deliveries to settle in one call, in any order."""

    acks: Sequence[Token] = ()
    retries: Sequence[Retry] = ()
    deads: Sequence[DeadLetter] = ()

    def __len__(self) -> int:
        return len(self.acks) + len(self.retries) + len(self.deads)


@dataclass(frozen=True, slots=True)
class Settled:
    # Not empty: some settling failed, and every outcome of the call must be sent again
    # (settling twice is harmless).
    error: str = ""
    # Acks whose delivery was already gone: it was redelivered (its worker looked dead) and
    # may run again, which at-least-once allows.
    gone: int = 0


class Transport(Protocol):
    """What a broker implements. Not thread-safe: the worker calls one method at a time."""

    outage_errors: tuple[type[BaseException], ...]

    def fetch(self, max_count: int, timeout: float) -> list[Delivery]:
        """Up to ``max_count`` deliveries, waiting at most ``timeout`` seconds for the first."""
        ...

    def settle(self, outcomes: Outcomes) -> Settled: ...

    def give_back(self, tokens: Sequence[Token], *, redelivered: bool = False) -> int:
        """Return deliveries to the queue at once; returns how many went back. ``redelivered``:
        they were running when the worker had to stop, which counts as a redelivery (so a
        message that keeps a worker from stopping is dead-lettered in the end)."""
        ...

    def renew(self, tokens: Sequence[Token]) -> int: ...

    def recover(self) -> int:
        """Return deliveries held by dead workers to the queue (0 where the broker does it)."""
        ...

    def close(self) -> None: ...


# --- The worker's side ---------------------------------------------------------------------------


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

    batch: Batch  # the newly fetched deliveries (empty when none were wanted)
    settle_error: str = ""  # as Settled.error
    gone: int = 0  # as Settled.gone


class PendingExchange(Protocol):
    def result(self) -> Exchanged:
        """Read the round trip's outcome. Raises an outage error if it could not fetch."""
        ...


class Done:
    """A round trip that already happened (links without send-ahead)."""

    def __init__(self, exchanged: Exchanged | BaseException) -> None:
        self._outcome = exchanged

    def result(self) -> Exchanged:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


class WorkerLink(Protocol):
    """What the worker runs on: a transport whose fetches honour the fleet rate limit."""

    outage_errors: tuple[type[BaseException], ...]

    def begin_exchange(self, outcomes: Outcomes, wanted: int) -> PendingExchange:
        """Settle finished deliveries, then fetch up to ``wanted`` more with their slots.
        Settling comes first, so the fetch already sees the room it freed."""
        ...

    def give_back(
        self,
        tokens: Sequence[Token],
        slots: SlotLease | None,
        unused_slots: int,
        *,
        redelivered: bool = False,
    ) -> int:
        """Return unstarted (or, ``redelivered``, unfinished) deliveries at once, and the newest
        lease's unused slots."""
        ...

    def acquire_slot(self) -> float:
        """One fresh rate-limit slot: seconds until it starts, or minus the wait when none."""
        ...

    def renew(self, tokens: Sequence[Token]) -> int: ...

    def recover(self) -> int: ...

    def adopt_orphans(self) -> int:
        """At start: return deliveries a previous process with our worker id left behind."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerSide:
    """Everything the worker engine talks to, built for one worker process by
    :func:`sluiceway.wiring.worker_side`."""

    link: WorkerLink
    coordinator: Coordinator
    outage_errors: tuple[type[BaseException], ...]  # every exception type that means "outage"
    round_trips: Callable[[], int]  # requests sent to the coordination Redis so far
    close: Callable[[], None]


# --- Publishing ----------------------------------------------------------------------------------


class Sink(Protocol):
    """Puts messages on a queue. A message is a JSON object of keyword arguments on every broker,
    so any language can publish; ``payloads`` are those bytes (see :mod:`sluiceway.codec`)."""

    def send(self, namespace: str, queue: str, payloads: Sequence[bytes], *, delay: float = 0.0) -> None:
        """Publish in order; returns only once the broker holds them (publisher confirms where
        the broker has them). ``delay`` holds them back that many seconds."""
        ...

    def close(self) -> None: ...


class AsyncSink(Protocol):
    async def send(
        self, namespace: str, queue: str, payloads: Sequence[bytes], *, delay: float = 0.0
    ) -> None: ...

    async def aclose(self) -> None: ...


class BrokerUnavailableError(RuntimeError):
    """The broker named in the settings has no transport in this build (or its client library
    is not installed). The message says which and how to get it."""
