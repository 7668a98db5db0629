"""RabbitMQ queues of one Sluiceway queue: their names, their arguments, the header codec, and
the rule that sizes a worker's consumer prefetch.

Pure (no pika, no I/O), so the worker, the publishing SDK and the operator declare exactly the
same queues, and the rules are tested with examples and hypothesis.

For a queue ``Q`` (``spec.broker.queue``; a RabbitMQ queue name is global to its vhost, so
TaskQueues that must not share a queue use different names or vhosts):

- ``Q``: the work queue, durable. **Quorum by default**: it is replicated and fsyncs before it
  confirms (so a broker crash loses no confirmed message), and it counts deliveries
  (``x-delivery-count``), which is what lets a worker dead-letter a message that keeps killing
  its worker; a classic queue only says ``redelivered`` and cannot. Classic is an option for
  brokers without quorum queues or for throughput over safety. Its dead-letter exchange is the
  default exchange with routing key ``Q.dead``: anything the broker itself drops (RabbitMQ 4's
  quorum delivery limit of 20, an operator policy) lands in the dead-letter queue instead of
  vanishing.
- ``Q.dead``: the dead-letter queue, same type. Each message is the original payload byte for
  byte, with the reason in ``x-sluiceway-*`` headers (broker-side drops carry ``x-death``).
- ``Q.delay.<ms>``: one classic queue per retry delay (rounded to a grid of 1/16 octave) with
  ``x-message-ttl`` = that delay, dead-lettering back to ``Q``: a retry waits in the broker, not
  in a worker, so it survives the worker's death. One TTL per queue, because RabbitMQ expires
  messages only at a queue's head. Each expires (``x-expires``) when unused for twice its delay
  plus a minute, and every publisher re-declares it well before that (:func:`redeclare_after`),
  so an idle delay queue disappears and a busy one never does.

Queue arguments cannot change once a queue exists (the broker answers ``inequivalent arg``): a
declare that meets other arguments falls back to a passive declare and uses the queue as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from sluiceway.deadletter import payload_fields

QUEUE_TYPES: Final = ("quorum", "classic")
DEFAULT_QUEUE_TYPE: Final = "quorum"
DEAD_SUFFIX: Final = ".dead"
DELAY_INFIX: Final = ".delay."
# Below this a retry goes straight back to the work queue: a delay queue would cost more than it waits.
MIN_DELAY_MS: Final = 10
MAX_DELAY_MS: Final = 7 * 24 * 3600 * 1000
DELAY_STEPS_PER_OCTAVE: Final = 16  # delays are rounded to within about 2.2 % of what was asked
EXPIRY_SLACK_MS: Final = 60_000

HEADER_REASON: Final = "x-sluiceway-reason"
HEADER_DETAIL: Final = "x-sluiceway-detail"
HEADER_RECORD: Final = "x-sluiceway-record"  # the dead-letter record as JSON, without the payload
HEADER_DELIVERY_COUNT: Final = "x-delivery-count"  # quorum queues: times delivered before
# Redeliveries a message had before a worker handed it back unstarted and republished it (the
# copy's own x-delivery-count starts again at 0).
HEADER_REDELIVERIES: Final = "x-sluiceway-redeliveries"


def dead_queue(queue: str) -> str:
    return queue + DEAD_SUFFIX


def delay_queue(queue: str, delay_ms: int) -> str:
    return f"{queue}{DELAY_INFIX}{delay_ms}"


def check_queue_type(queue_type: str) -> str:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"RabbitMQ queue type {queue_type!r} must be one of {', '.join(QUEUE_TYPES)}")
    return queue_type


def work_arguments(queue: str, queue_type: str) -> dict[str, Any]:
    return {
        "x-queue-type": check_queue_type(queue_type),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_queue(queue),
    }


def dead_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": check_queue_type(queue_type)}


def delay_bucket_ms(seconds: float) -> int:
    """The delay queue a retry after ``seconds`` waits in, in ms; 0 means "no wait": publish to
    the work queue. Rounded on a geometric grid, so jittered delays share a few queues."""
    if not math.isfinite(seconds) or seconds <= 0:
        return 0
    ms = seconds * 1000.0
    if ms < MIN_DELAY_MS:
        return 0
    ms = min(ms, float(MAX_DELAY_MS))
    step = round(math.log2(ms) * DELAY_STEPS_PER_OCTAVE)
    bucket = round(math.pow(2.0, step / DELAY_STEPS_PER_OCTAVE))
    return max(MIN_DELAY_MS, min(MAX_DELAY_MS, bucket))


def delay_arguments(queue: str, delay_ms: int) -> dict[str, Any]:
    return {
        "x-queue-type": "classic",  # a short-lived buffer; quorum TTL queues need 3.10+ features
        "x-message-ttl": delay_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-expires": delay_expiry_ms(delay_ms),
    }


def delay_expiry_ms(delay_ms: int) -> int:
    return 2 * delay_ms + EXPIRY_SLACK_MS


def redeclare_after(delay_ms: int) -> float:
    """Seconds after a declare by which a publisher must declare the delay queue again.

    The broker deletes an unused queue ``x-expires`` after its last declare, and publishing does
    not count as use. A message published at most this long after a declare has expired (gone
    back to the work queue) before the queue can: E/4 + ttl < E since E > 2 ttl."""
    return delay_expiry_ms(delay_ms) / 4000.0


def redeliveries(headers: Mapping[str, Any] | None, redelivered: bool) -> int:
    """How often the broker delivered this message before without it being settled: quorum
    queues count exactly; a classic queue only flags a redelivery, which counts as one. A copy
    republished by a hand-back adds the count its original had (:func:`returned_headers`)."""
    before = 0
    if headers:
        carried = headers.get(HEADER_REDELIVERIES)
        if isinstance(carried, int) and not isinstance(carried, bool) and carried > 0:
            before = carried
        count = headers.get(HEADER_DELIVERY_COUNT)
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return before + count
    return before + (1 if redelivered else 0)


def returned_headers(redeliveries: int) -> dict[str, Any] | None:
    """Headers of the copy of a message handed back unstarted, which keeps its count."""
    return {HEADER_REDELIVERIES: redeliveries} if redeliveries > 0 else None


_PAYLOAD_FIELDS: Final = ("payload", "payload_b64")


def dead_headers(reason: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Headers of a dead-lettered message: its reason, and the record (without the payload,
    which is the message body itself), cut so the headers stay well inside one frame."""
    slim = {k: v for k, v in record.items() if k not in _PAYLOAD_FIELDS}
    detail = str(record.get("detail", ""))
    return {
        HEADER_REASON: reason,
        HEADER_DETAIL: detail[:2000],
        HEADER_RECORD: json.dumps(slim, default=str)[:16000],
    }


def record_of(headers: Mapping[str, Any] | None, body: bytes) -> dict[str, Any]:
    """The full dead-letter record (:mod:`sluiceway.deadletter`) of a message in ``Q.dead``: the
    record from its headers plus the payload from its body. A message the broker dead-lettered
    itself (no Sluiceway headers) gets the reason from its ``x-death`` entry."""
    headers = headers or {}
    raw = headers.get(HEADER_RECORD)
    rec: dict[str, Any] = {}
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            loaded = json.loads(raw)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            rec = loaded
    if "reason" not in rec:
        reason = headers.get(HEADER_REASON)
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        if not isinstance(reason, str):
            deaths = headers.get("x-death")
            first = deaths[0] if isinstance(deaths, list) and deaths else {}
            why = first.get("reason") if isinstance(first, dict) else None
            reason = f"broker:{why.decode() if isinstance(why, bytes) else why}" if why else "unknown"
        rec["reason"] = reason
    rec.update(payload_fields(body))
    return rec


# --- the consumer's prefetch (unlimited workers) ---------------------------------------------------

MAX_PREFETCH: Final = 65535  # basic.qos prefetch-count is a short
# Deliveries kept in flight beyond the worker's capacity: this many seconds at the measured rate
# (at most MAX_IN_FLIGHT_AHEAD), to cover the round trip from an ack to the next delivery.
IN_FLIGHT_SECONDS: Final = 0.2
MAX_IN_FLIGHT_AHEAD: Final = 2000
# Growth by more than this fraction re-subscribes at once; smaller changes wait REQOS_INTERVAL.
REQOS_GROWTH: Final = 1 / 4
REQOS_INTERVAL: Final = 1.0
# A growing window adds a consumer for the difference, up to this many consumers; past it the
# window is re-subscribed as one consumer.
MAX_CONSUMERS: Final = 4


def prefetch_target(held: int, room: int, rate: float) -> int:
    """The prefetch a consumer should have: the deliveries the worker holds (handed to it and not
    settled), the room it reports, and :data:`IN_FLIGHT_SECONDS` at ``rate`` deliveries/s.

    Deliveries that arrived and wait in the transport's buffer are not counted: they are the
    in-flight part the rate term provides for. Counting them as well made the prefetch grow with
    every delivery the broker sent, up to the whole queue."""
    ahead = min(MAX_IN_FLIGHT_AHEAD, int(rate * IN_FLIGHT_SECONDS))
    return max(1, min(MAX_PREFETCH, held + room + ahead))


def new_prefetch(current: int, target: int, since_last: float) -> int | None:
    """The prefetch to re-subscribe with, or None to keep ``current``.

    Each re-subscription costs a cancel, a qos and a consume (commands of the queue's Raft log
    on a quorum queue), so small changes wait :data:`REQOS_INTERVAL`. A large growth does not
    wait: a worker whose broker window is too small idles while the queue is full, and a worker
    starting on a full queue grows its window in a few steps within its first fraction of a
    second instead of one step a second. Shrinking waits, and only below half."""
    if target > current:
        if target > current * (1 + REQOS_GROWTH) or since_last >= REQOS_INTERVAL:
            return target
        return None
    if target < current / 2 and since_last >= REQOS_INTERVAL:
        return target
    return None


def added_consumer_prefetch(current: int, want: int, consumers: int) -> int | None:
    """The prefetch of one more consumer that grows a window of ``current`` (held by
    ``consumers`` consumers) to ``want``, or None when the window must be re-subscribed instead.

    With ``basic.qos`` per consumer, a window is the sum of its consumers' prefetches, so a
    growth needs no cancel. A cancel is what costs: a quorum queue returns the deliveries it had
    checked out to a cancelled consumer and not yet sent, each counted in ``x-delivery-count``
    and behind the rest of the queue (docs/brokers/rabbitmq.md, "Re-subscribing can return
    deliveries"). A shrink still cancels, as does a growth past :data:`MAX_CONSUMERS`, which keeps
    a worker that grows in many small steps from collecting consumers."""
    if want <= current or consumers < 1 or consumers >= MAX_CONSUMERS:
        return None
    return min(MAX_PREFETCH, want - current)


def backlog_after(granted: int, taken: int, ready: int | None) -> bool:
    """Whether a rate-limited fetch leaves the queue read as holding more (so the next fetch
    skips its ready count): it took its whole grant, and the queue was not seen to hold only
    that. ``ready`` is the count read for this fetch, None when it was skipped.

    A fetch that emptied what was ready must leave it False: the link sizes its grant to the
    ready count, so "took everything granted" is also what emptying the queue looks like, and a
    next fetch that skipped the count would open a consumer on an empty queue and cancel it
    unfilled (the race this count is there to avoid)."""
    return taken >= granted and (ready is None or ready > granted)
