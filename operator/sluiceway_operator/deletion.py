"""Who else uses a queue, and what deleting a TaskQueue may do to it. Pure: no I/O.

A queue is named by its namespace and resolved queue name (``spec.broker.queue``, or the TaskQueue's
name): that pair scopes every Redis key of the queue, its DLQ, leases, heartbeats, rate limit and
schedule markers (``contract.Keys``). Two TaskQueues with the same pair in one namespace share all of
it, whatever their broker type or Secret, so that is what counts as "the same queue" here. Erring on
the side of "shared" only ever keeps data.

- ``queue_users`` reads a TaskQueue list (the API's ``TaskQueueList``) into who uses which queue.
- ``conflict_owner``: the oldest TaskQueue on a queue owns it; every later one is in ``Conflict``.
- ``deletion_plan``: Retain keeps the queue; Purge deletes it, unless another TaskQueue still uses it.
- ``deletion_message``: the Event text, with what was kept or purged and the counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .spec import DeletionPolicy, SpecError, parse_spec


class DeletionEvent(StrEnum):
    """The reasons of the Event the finalizer posts on the deleted TaskQueue."""

    RETAINED = "QueueRetained"  # Normal
    PURGED = "QueuePurged"  # Normal
    CLEANUP_FAILED = "QueueCleanupFailed"  # Warning: Redis unreachable; nothing was deleted


@dataclass(frozen=True, slots=True, order=True)
class QueueUser:
    created: str  # RFC 3339 creationTimestamp: sorts in time order
    name: str
    queue: str


@dataclass(frozen=True, slots=True)
class QueueCounts:
    ready: int
    delayed: int
    in_flight: int
    dead: int


@dataclass(frozen=True, slots=True)
class DeletionPlan:
    purge: bool
    policy: DeletionPolicy
    shared_with: tuple[str, ...]  # other TaskQueues on the same queue, by name


def queue_users(items: Iterable[Mapping[str, Any]]) -> list[QueueUser]:
    """Every TaskQueue in ``items`` whose spec resolves to a queue, oldest first.

    A TaskQueue whose spec does not parse is still counted under its own name when that is all it
    can resolve to (``spec.broker.queue`` unreadable): it may have workers from an earlier valid spec.
    """
    out: list[QueueUser] = []
    for item in items:
        meta = item.get("metadata") or {}
        name = str(meta.get("name", ""))
        if not name:
            continue
        try:
            queue = parse_spec(item.get("spec") or {}, name=name).broker.queue
        except SpecError:
            raw = ((item.get("spec") or {}).get("broker") or {}).get("queue")
            queue = raw if isinstance(raw, str) and raw else name
        out.append(QueueUser(created=str(meta.get("creationTimestamp", "")), name=name, queue=queue))
    return sorted(out)


def sharing(name: str, queue: str, users: Iterable[QueueUser]) -> tuple[str, ...]:
    """The other TaskQueues on ``queue``, oldest first."""
    return tuple(u.name for u in sorted(users) if u.queue == queue and u.name != name)


def conflict_owner(name: str, queue: str, users: Iterable[QueueUser]) -> str | None:
    """The TaskQueue that owns ``queue`` when it is not ``name``: the oldest user (then by name)."""
    on_queue = sorted(u for u in users if u.queue == queue)
    if not on_queue or on_queue[0].name == name:
        return None
    return on_queue[0].name


def deletion_plan(policy: DeletionPolicy, shared_with: Sequence[str]) -> DeletionPlan:
    """Purge only when asked to and nobody else uses the queue; otherwise keep it."""
    return DeletionPlan(
        purge=policy is DeletionPolicy.PURGE and not shared_with,
        policy=policy,
        shared_with=tuple(shared_with),
    )


def _counts(c: QueueCounts) -> str:
    return f"{c.ready} ready, {c.delayed} delayed, {c.in_flight} in flight, {c.dead} dead-lettered"


def deletion_message(
    plan: DeletionPlan, queue: str, counts: QueueCounts | None, removed_keys: int = 0
) -> str:
    """The deletion Event's message. ``counts`` is None when the queue could not be read."""
    seen = _counts(counts) if counts is not None else "counts unknown (Redis unreachable)"
    if plan.purge:
        return (
            f"Purged queue {queue!r} (deletionPolicy Purge): {seen} messages and {removed_keys} keys deleted."
        )
    if plan.shared_with:
        why = f"TaskQueue {', '.join(plan.shared_with)} still uses it"
        if plan.policy is DeletionPolicy.PURGE:
            why += ", so deletionPolicy Purge was not applied"
    else:
        why = "deletionPolicy Retain"
    return (
        f"Kept queue {queue!r} ({why}): {seen} messages, the dead-letter queue and the schedules' state "
        "stay in Redis; a TaskQueue re-created on this queue picks them up."
    )


def conflict_message(queue: str, owner: str) -> str:
    return (
        f"Queue {queue!r} is also used by the older TaskQueue {owner!r}: both fleets consume it and share "
        "its rate limit, leases and DLQ. Give one of them its own spec.broker.queue. Neither deletion "
        "purges the queue while the other exists."
    )
