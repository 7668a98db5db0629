"""Observation: the coordination Redis URL from the TaskQueue's Secret, and the queue from Redis.

Redis is read only through ``sluiceway.fleet`` (synchronous redis-py), run in a worker thread so a
slow Redis never blocks the event loop that serves every other TaskQueue.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import cast

import redis

from sluiceway import connection, fleet
from sluiceway.contract import Keys

from .faults import redis_problem
from .kube import Kube, secret_path
from .scaling import Observation, WorkerSample, worker_sample
from .spec import SecretKeyRef, TaskQueueSpec


class ObservationError(Exception):
    """A fault outside the spec: a missing Secret or key, an unreachable Redis. ``reason`` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def secret_value(kube: Kube, namespace: str, ref: SecretKeyRef) -> str:
    secret = await kube.get(secret_path(namespace, ref.name))
    if secret is None:
        raise ObservationError("SecretMissing", f"Secret {namespace}/{ref.name} not found")
    raw = (secret.get("data") or {}).get(ref.key)
    if raw is None:
        raise ObservationError("SecretMissing", f"Secret {namespace}/{ref.name} has no key {ref.key!r}")
    return base64.b64decode(raw).decode()


class RedisPool:
    """One client per URL, shared by every TaskQueue that uses the same Redis."""

    def __init__(self) -> None:
        self._clients: dict[str, redis.Redis] = {}

    def get(self, url: str) -> redis.Redis:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = connection.client(url)
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


@dataclass(frozen=True, slots=True)
class QueueView:
    backlog: int
    in_flight: int
    workers: tuple[WorkerSample, ...]
    heartbeat_times: dict[str, float]  # pod -> latest heartbeat (unix s), for silent-pod detection
    acked: int  # fleet-wide completions counter, for the observed QPS


# --- Delayed messages (publish(delay=...), retry backoff) are backlog only once they are nearly due.
# A message due in an hour is not work to scale for: counted at once, it woke pods from zero and held
# them up for an hour of nothing. Counted from DELAYED_LEAD_SECONDS before it is due, the fleet
# wakes (the loop ticks every interval anyway) in time for a pod to start before the message is due.
DELAYED_LEAD_SECONDS = 15.0

# On the Redis clock, like the publisher's scores: how many delayed messages are due within the lead.
_DUE_SCRIPT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '-inf', now_ms + tonumber(ARGV[1]))
"""


def due_delayed(client: redis.Redis, keys: Keys, delayed: int, lead: float = DELAYED_LEAD_SECONDS) -> int:
    """Delayed messages due within ``lead`` seconds; no round trip when none are delayed."""
    if delayed <= 0:
        return 0
    return int(cast(int, client.eval(_DUE_SCRIPT, 1, keys.delayed, int(lead * 1000))))


def _read(client: redis.Redis, keys: Keys, missed: int) -> QueueView:
    stats = fleet.queue_stats(client, keys)
    backlog = stats.ready + due_delayed(client, keys, stats.delayed)
    beats = fleet.heartbeats(client, keys)
    now = time.time()
    workers = tuple(worker_sample(hb, now=now, missed_heartbeats=missed) for hb in beats)
    times: dict[str, float] = {}
    for hb in beats:
        times[hb["pod"]] = max(times.get(hb["pod"], 0.0), float(hb["time"]))
    return QueueView(backlog, stats.in_flight, workers, times, stats.acked)


async def read_queue(client: redis.Redis, keys: Keys, spec: TaskQueueSpec) -> QueueView:
    try:
        return await asyncio.to_thread(_read, client, keys, spec.liveness.missed_heartbeats)
    except redis.RedisError as exc:
        # A class of failure only: the text names the host and port (see faults.py).
        raise ObservationError("RedisUnreachable", f"coordination Redis: {redis_problem(exc)}") from exc


def observation(view: QueueView, *, now: float, current: int, pods: int, ready: int) -> Observation:
    return Observation(
        now=now,
        backlog=view.backlog,
        in_flight=view.in_flight,
        workers=view.workers,
        current_replicas=current,
        pods=pods,
        ready_pods=ready,
    )


async def orphaned_workers(client: redis.Redis, keys: Keys, known: set[str]) -> list[str]:
    return await asyncio.to_thread(fleet.orphaned_workers, client, keys, known)


async def requeue_worker(client: redis.Redis, keys: Keys, worker_id: str) -> int:
    return await asyncio.to_thread(fleet.requeue_worker, client, keys, worker_id)


async def purge(client: redis.Redis, keys: Keys) -> int:
    return await asyncio.to_thread(fleet.purge, client, keys)
