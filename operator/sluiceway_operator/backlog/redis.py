"""The Redis broker's backlog: the queue's LISTs and ZSETs on the coordination Redis itself.

Reads go through :mod:`sluiceway.fleet`, the one owner of the queue's key scheme outside the
worker; in-flight is exact here (the per-worker lease ZSETs), not taken from heartbeats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from sluiceway import fleet
from sluiceway.contract import Keys

from .base import Backlog, BacklogSource


class RedisSource:
    broker = "redis"
    outage_errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def backlog(self) -> Backlog:
        s = fleet.queue_stats(self.client, self.keys)
        return Backlog(ready=s.ready, delayed=s.delayed, in_flight=s.in_flight, acked=s.acked, dead=s.dead)

    def max_useful_replicas(self) -> int | None:
        return None

    def orphaned_workers(self, known: set[str]) -> list[str]:
        return fleet.orphaned_workers(self.client, self.keys, known)

    def requeue_worker(self, worker_id: str) -> int:
        return fleet.requeue_worker(self.client, self.keys, worker_id)

    def purge(self) -> int:
        return fleet.purge(self.client, self.keys)

    def describe(self) -> Mapping[str, Any]:
        s = fleet.queue_stats(self.client, self.keys)
        return {"broker": "redis", "prefix": self.keys.prefix, "ready": s.ready, "dead": s.dead}

    def close(self) -> None:
        pass  # the client belongs to the operator's pool


def source(*, namespace: str, queue: str, coordination: Any, broker_url: str) -> RedisSource:
    # The Redis broker is the coordination Redis: broker_url names the same server.
    return RedisSource(coordination, Keys(namespace, queue))


def _conforms(s: RedisSource) -> BacklogSource:
    return s  # mypy checks RedisSource against the seam's protocol
