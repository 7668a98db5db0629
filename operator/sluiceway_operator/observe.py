"""Observation: the URLs from the TaskQueue's Secrets, the backlog from its broker, the workers
from their heartbeats.

The broker is read only through a :mod:`~sluiceway_operator.backlog` source (one per broker type),
and the heartbeats through :mod:`sluiceway.coordination` on the coordination Redis, whatever the
broker. Both are synchronous client libraries, run in a worker thread so a slow broker never
blocks the event loop that serves every other TaskQueue.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import redis

from sluiceway import connection
from sluiceway.contract import Heartbeat, Keys
from sluiceway.coordination import base as coordination
from sluiceway.coordination import redis as coordination_redis

from .backlog import registry
from .backlog.base import Backlog, BacklogSource
from .kube import Kube, secret_path
from .scaling import Observation, WorkerSample, worker_sample
from .spec import BrokerType, SecretKeyRef, TaskQueueSpec

# How long a broker URL read from a Secret is reused before it is read again.
BROKER_SECRET_TTL = 30.0


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
    """One client per URL, shared by every TaskQueue that uses the same Redis; and one backlog
    source per queue, kept across ticks."""

    def __init__(self) -> None:
        self._clients: dict[str, redis.Redis] = {}
        self._sources: dict[tuple[str, str, str, str, str], BacklogSource] = {}
        self.broker_urls: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, url: str) -> redis.Redis:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = connection.client(url)
        return client

    def source(
        self, broker: str, *, namespace: str, queue: str, coordination: redis.Redis, url: str, broker_url: str
    ) -> BacklogSource:
        key = (broker, namespace, queue, url, broker_url)
        found = self._sources.get(key)
        if found is None:
            try:
                found = registry.source(
                    broker, namespace=namespace, queue=queue, coordination=coordination, broker_url=broker_url
                )
            except registry.SourceUnavailableError as exc:
                raise ObservationError("BrokerUnsupported", str(exc)) from exc
            self._sources[key] = found
        return found

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
        self._sources.clear()
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


async def backlog_source(
    kube: Kube, pool: RedisPool, namespace: str, spec: TaskQueueSpec, client: redis.Redis, url: str
) -> BacklogSource:
    """The TaskQueue's backlog source; a broker other than Redis has its URL in its own Secret."""
    broker_url = url
    ref = spec.broker.url_secret_ref
    if spec.broker.type is not BrokerType.REDIS and ref is not None:
        cache_key = (namespace, ref.name, ref.key)
        cached = pool.broker_urls.get(cache_key)
        if cached is None or time.monotonic() - cached[1] > BROKER_SECRET_TTL:
            cached = (await secret_value(kube, namespace, ref), time.monotonic())
            pool.broker_urls[cache_key] = cached
        broker_url = cached[0]
    return pool.source(
        str(spec.broker.type),
        namespace=namespace,
        queue=spec.broker.queue,
        coordination=client,
        url=url,
        broker_url=broker_url,
    )


def view(backlog: Backlog, beats: list[Heartbeat], *, now: float, missed: int) -> QueueView:
    """Pure: a queue's view from its broker's backlog and its workers' heartbeats."""
    workers = tuple(worker_sample(hb, now=now, missed_heartbeats=missed) for hb in beats)
    times: dict[str, float] = {}
    for hb in beats:
        times[hb["pod"]] = max(times.get(hb["pod"], 0.0), float(hb["time"]))
    in_flight = backlog.in_flight if backlog.in_flight is not None else coordination.in_flight(beats)
    # Without a broker counter, the live workers' own counts (a restart makes it step back, which
    # the observed QPS reads as "unknown" for one tick).
    acked = backlog.acked if backlog.acked is not None else sum(int(hb["processed"]) for hb in beats)
    return QueueView(backlog.total, in_flight, workers, times, acked)


def _read(source: BacklogSource, client: redis.Redis, keys: Keys, missed: int) -> QueueView:
    backlog = source.backlog()
    beats = coordination_redis.heartbeats(client, keys)
    return view(backlog, beats, now=time.time(), missed=missed)


async def read_queue(
    source: BacklogSource, client: redis.Redis, keys: Keys, spec: TaskQueueSpec
) -> QueueView:
    try:
        return await asyncio.to_thread(_read, source, client, keys, spec.liveness.missed_heartbeats)
    except redis.RedisError as exc:
        raise ObservationError(
            "RedisUnreachable", f"coordination Redis: {type(exc).__name__}: {exc}"
        ) from exc
    except source.outage_errors as exc:
        raise ObservationError(
            "BrokerUnreachable", f"{source.broker} broker: {type(exc).__name__}: {exc}"
        ) from exc


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


async def orphaned_workers(source: BacklogSource, known: set[str]) -> list[str]:
    return await asyncio.to_thread(source.orphaned_workers, known)


async def requeue_worker(source: BacklogSource, worker_id: str) -> int:
    return await asyncio.to_thread(source.requeue_worker, worker_id)


async def purge(source: BacklogSource) -> int:
    """The finalizer's purge: the queue, its retries and dead letters on its broker."""
    return await asyncio.to_thread(source.purge)
