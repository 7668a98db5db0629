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
(``SLUICEWAY_REDIS_URL``) for every broker; :mod:`sluiceway.wiring` puts a worker's side together.
Nothing here imports a client library, not even lazily inside a function (the import-linter
contracts in ``pyproject.toml`` check it).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Final
from urllib.parse import urlsplit

from sluiceway.transports.base import AsyncSink, BrokerUnavailableError, Sink

BROKERS: Final = ("redis", "rabbitmq", "kafka")
_SCHEMES: Final = {
    "redis": "redis",
    "rediss": "redis",
    "redis+cluster": "redis",  # a Redis Cluster (see sluiceway.connection)
    "rediss+cluster": "redis",
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
