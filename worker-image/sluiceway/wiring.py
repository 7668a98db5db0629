"""Puts a worker process's side of the seam together: its link to the broker (through the
registry) and its coordinator and rate limiter on the coordination Redis. The one place a worker
process meets Redis directly; the worker engine only sees the :class:`WorkerSide`."""

from __future__ import annotations

from sluiceway import connection
from sluiceway.contract import Keys
from sluiceway.coordination.redis import RedisCoordinator
from sluiceway.ratelimit.redis import RedisLimiter
from sluiceway.settings import WorkerSettings
from sluiceway.transports import registry
from sluiceway.transports.base import WorkerLink, WorkerSide
from sluiceway.transports.gated import Gated


def worker_side(settings: WorkerSettings, worker_id: str) -> WorkerSide:
    """The worker's link and coordinator for ``settings.broker``."""
    mod = registry.module(settings.broker)
    client = connection.client(settings.redis_url)
    counter = connection.count_round_trips(client)
    keys = Keys(settings.namespace, settings.queue)
    coordinator = RedisCoordinator(client, keys, worker_id)
    link: WorkerLink
    if hasattr(mod, "link"):
        link = mod.link(settings, worker_id, client)
    else:
        limiter = RedisLimiter(
            client,
            keys.ratelimit,
            qps=settings.qps,
            burst=settings.qps_burst,
            horizon_seconds=settings.qps_horizon,
        )
        link = Gated(mod.transport(settings, worker_id), limiter, limiter_errors=coordinator.outage_errors)
    errors = tuple(dict.fromkeys((*link.outage_errors, *coordinator.outage_errors)))

    def close() -> None:
        try:
            link.close()
        finally:
            client.close()

    return WorkerSide(link, coordinator, errors, lambda: counter.count, close)
