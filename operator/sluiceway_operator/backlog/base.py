"""The backlog seam: what the operator needs to know about a queue from its broker.

A source is synchronous and blocking (broker client libraries are); ``observe.py`` calls it in a
worker thread, so a slow broker never blocks the event loop. One source serves one queue
(namespace and queue name) and may be kept across ticks; it reconnects by itself after an outage,
and raises one of ``outage_errors`` while its broker is unreachable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Backlog:
    ready: int  # messages due now: work a worker could start at once
    delayed: int = 0  # retries and delayed publishes, not due yet
    # Messages the broker itself counts as held by workers; None when it cannot tell (then the
    # operator sums the workers' heartbeats).
    in_flight: int | None = None
    # A counter of completions that only grows (for the observed QPS); None when unknown.
    acked: int | None = None
    dead: int = 0  # messages in the dead-letter queue

    @property
    def total(self) -> int:
        """What the autoscaler scales for."""
        return self.ready + self.delayed


class BacklogSource(Protocol):
    broker: str  # "redis" | "rabbitmq" | "kafka"
    outage_errors: tuple[type[BaseException], ...]

    def backlog(self) -> Backlog: ...

    def max_useful_replicas(self) -> int | None:
        """The most worker pods that can be busy at once (Kafka: the partition count); None
        when the broker sets no such bound."""
        ...

    def orphaned_workers(self, known: set[str]) -> list[str]:
        """Workers that hold deliveries, are not in ``known`` (live pods) and have no live
        heartbeat; [] where the broker redelivers a dead consumer's messages by itself."""
        ...

    def requeue_worker(self, worker_id: str) -> int:
        """Return everything a deleted pod held to the queue at once; returns how many."""
        ...

    def purge(self) -> int:
        """Delete the queue, its retries and its dead letters (the finalizer), and the queue's
        coordination keys on Redis (``sluiceway.fleet.purge``: heartbeats, rate limiter);
        returns how many objects (keys, queues, topics) went."""
        ...

    def describe(self) -> Mapping[str, Any]:
        """What the finalizer logs about what it purges or keeps: names, counts."""
        ...

    def close(self) -> None: ...
