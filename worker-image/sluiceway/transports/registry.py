"""The ONE switch from a broker type to its transport, publisher and client library.

The broker type comes from the settings (``SLUICEWAY_BROKER``) or a URL's scheme
(:func:`broker_of`). Each broker lives in ``sluiceway.transports.<type>`` and is imported only
when used, so its client library (redis-py, pika, confluent-kafka) loads only in processes that
need it. A broker module provides:

- ``transport(settings, worker_id) -> Transport`` (RabbitMQ, Kafka), wrapped here with the fleet
  limiter by :class:`~sluiceway.transports.gated.Gated`; or ``link(settings, worker_id, client)``
  returning a ready :class:`~sluiceway.transports.base.WorkerLink` (Redis, whose fetch takes the
  slots itself);
- ``sink(url) -> Sink`` and optionally ``async_sink(url) -> AsyncSink`` for the publishing SDK
  (without one, the sync sink runs in a thread);
- ``outage_errors``: the client library's exception types for "broker unreachable for now".

Coordination (heartbeats) and the rate limiter are on the coordination Redis
(``SLUICEWAY_REDIS_URL``) for every broker.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sluiceway.transports.base import AsyncSink, BrokerUnavailableError, Sink, WorkerLink

if TYPE_CHECKING:
    from sluiceway.coordination.base import Coordinator
    from sluiceway.settings import WorkerSettings

BROKERS: Final = ("redis", "rabbitmq", "kafka")
_SCHEMES: Final = {
    "redis": "redis",
    "rediss": "redis",
    "unix": "redis",
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "kafka": "kafka",
}
_EXTRA: Final = {
    "rabbitmq": "pika (pip install 'sluiceway[rabbitmq]')",
    "kafka": "confluent-kafka (pip install 'sluiceway[kafka]')",
}


def broker_of(url: str) -> str:
    """The broker type a URL names by its scheme; raises ``ValueError`` naming the scheme."""
    scheme = urlsplit(url).scheme.lower()
    try:
        return _SCHEMES[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise ValueError(
            f"broker URL scheme {scheme + '://' if scheme else '(none)'} is not one of {known}"
        ) from None


def module(broker: str) -> ModuleType:
    """The broker's module, imported now; :class:`BrokerUnavailableError` says why it cannot be."""
    if broker not in BROKERS:
        raise BrokerUnavailableError(f"broker {broker!r} must be one of {', '.join(BROKERS)}")
    name = f"sluiceway.transports.{broker}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise BrokerUnavailableError(
                f"the {broker} transport is not built into this version of sluiceway"
            ) from None
        need = _EXTRA.get(broker, exc.name or "its client library")
        raise BrokerUnavailableError(f"the {broker} transport needs {need}: {exc}") from None


@dataclass(frozen=True, slots=True)
class WorkerSide:
    """Everything the worker talks to, built for one worker process."""

    link: WorkerLink
    coordinator: Coordinator
    outage_errors: tuple[type[BaseException], ...]  # every exception type that means "outage"
    round_trips: Callable[[], int]  # requests sent to the coordination Redis so far
    close: Callable[[], None]


def worker_side(settings: WorkerSettings, worker_id: str) -> WorkerSide:
    """The worker's link and coordinator for ``settings.broker``."""
    from sluiceway import connection
    from sluiceway.contract import Keys
    from sluiceway.coordination.redis import RedisCoordinator
    from sluiceway.transports.gated import Gated

    mod = module(settings.broker)
    client = connection.client(settings.redis_url)
    counter = connection.count_round_trips(client)
    keys = Keys(settings.namespace, settings.queue)
    coordinator = RedisCoordinator(client, keys, worker_id)
    link: WorkerLink
    if hasattr(mod, "link"):
        link = mod.link(settings, worker_id, client)
    else:
        from sluiceway.ratelimit.redis import RedisLimiter

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


def sink(broker: str, url: str) -> Sink:
    result: Sink = module(broker).sink(url)
    return result


def async_sink(broker: str, url: str) -> AsyncSink:
    mod = module(broker)
    if hasattr(mod, "async_sink"):
        result: AsyncSink = mod.async_sink(url)
        return result
    return _Threaded(mod.sink(url))


class _Threaded:
    """A sync sink used from asyncio: each send runs in a thread, one at a time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lock = asyncio.Lock()

    async def send(
        self, namespace: str, queue: str, payloads: Sequence[bytes], *, delay: float = 0.0
    ) -> None:
        async with self.lock:
            await asyncio.to_thread(self.inner.send, namespace, queue, payloads, delay=delay)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.inner.close)
