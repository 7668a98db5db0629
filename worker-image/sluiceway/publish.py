"""Publishing SDK: put messages on a Sluiceway queue from any Python program.

A queue is named ``"name"`` (in the default namespace, or ``SLUICEWAY_NAMESPACE``) or
``"namespace/name"``, matching the TaskQueue's namespace and ``spec.broker.queue``.

The broker is chosen by the URL's scheme (``redis://``, ``amqp://``, ``kafka://``), or, with no
URL given, by ``SLUICEWAY_BROKER`` and ``SLUICEWAY_BROKER_URL`` (``SLUICEWAY_REDIS_URL`` for Redis).
A message is a plain JSON object of keyword arguments on every broker. Importing this module
loads no broker client: a publisher loads its broker's when it is built
(:mod:`sluiceway.transports.registry`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from sluiceway import codec
from sluiceway.contract import (
    DEFAULT_NAMESPACE,
    ENV_BROKER,
    ENV_BROKER_URL,
    ENV_NAMESPACE,
    ENV_REDIS_URL,
    Keys,
)
from sluiceway.transports import registry
from sluiceway.transports.base import AsyncSink, Sink

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_CHUNK = 1000  # messages per send in a batch: bounds memory and one broker call


def resolve_queue(queue: str, namespace: str | None = None) -> Keys:
    if "/" in queue:
        ns, _, name = queue.partition("/")
        if namespace and namespace != ns:
            raise ValueError(f"queue {queue!r} names namespace {ns!r} but namespace={namespace!r} was given")
        return Keys(ns, name)
    return Keys(namespace or os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE, queue)


def resolve_broker(url: str | None, broker: str | None = None) -> tuple[str, str]:
    """The broker type and URL a publisher uses: from ``url`` (its scheme names the broker),
    else from the environment."""
    if url:
        return broker or registry.broker_of(url), url
    kind = broker or os.environ.get(ENV_BROKER) or "redis"
    if kind == "redis":
        return kind, os.environ.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL
    found = os.environ.get(ENV_BROKER_URL)
    if not found:
        raise ValueError(f"publishing to {kind} needs a broker URL: pass one or set {ENV_BROKER_URL}")
    return kind, found


def _wire(kwargs: Mapping[str, Any], metadata: bool, message_id: str | None) -> tuple[str, bytes]:
    msg_id = message_id or codec.new_id()
    meta = codec.Meta(id=msg_id, published_at=time.time()) if metadata else None
    return msg_id, codec.encode(dict(kwargs), meta)


class Publisher:
    """Synchronous publisher. Thread-safe; reuse one per process."""

    def __init__(
        self, url: str | None = None, *, namespace: str | None = None, broker: str | None = None
    ) -> None:
        self.broker, self.url = resolve_broker(url, broker)
        self.sink: Sink = registry.sink(self.broker, self.url)
        self.namespace = namespace

    def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = 0.0,
        message_id: str | None = None,
        metadata: bool = True,
    ) -> str:
        """Publish one message; returns its id. ``delay`` holds it back that many seconds."""
        keys = resolve_queue(queue, self.namespace)
        msg_id, payload = _wire(kwargs, metadata, message_id)
        self.sink.send(keys.namespace, keys.queue, [payload], delay=max(delay, 0.0))
        return msg_id

    def publish_batch(
        self, queue: str, messages: Iterable[Mapping[str, Any]], *, metadata: bool = True
    ) -> list[str]:
        """Publish many messages in few round trips, in order; returns their ids."""
        keys = resolve_queue(queue, self.namespace)
        ids: list[str] = []
        chunk: list[bytes] = []
        for kwargs in messages:
            msg_id, payload = _wire(kwargs, metadata, None)
            ids.append(msg_id)
            chunk.append(payload)
            if len(chunk) == _CHUNK:
                self.sink.send(keys.namespace, keys.queue, chunk)
                chunk = []
        if chunk:
            self.sink.send(keys.namespace, keys.queue, chunk)
        return ids

    def close(self) -> None:
        self.sink.close()


class AsyncPublisher:
    """asyncio publisher."""

    def __init__(
        self, url: str | None = None, *, namespace: str | None = None, broker: str | None = None
    ) -> None:
        self.broker, self.url = resolve_broker(url, broker)
        self.sink: AsyncSink = registry.async_sink(self.broker, self.url)
        self.namespace = namespace

    async def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = 0.0,
        message_id: str | None = None,
        metadata: bool = True,
    ) -> str:
        keys = resolve_queue(queue, self.namespace)
        msg_id, payload = _wire(kwargs, metadata, message_id)
        await self.sink.send(keys.namespace, keys.queue, [payload], delay=max(delay, 0.0))
        return msg_id

    async def publish_batch(
        self, queue: str, messages: Iterable[Mapping[str, Any]], *, metadata: bool = True
    ) -> list[str]:
        keys = resolve_queue(queue, self.namespace)
        ids: list[str] = []
        payloads: list[bytes] = []
        for kwargs in messages:
            msg_id, payload = _wire(kwargs, metadata, None)
            ids.append(msg_id)
            payloads.append(payload)
        if payloads:
            await self.sink.send(keys.namespace, keys.queue, payloads)
        return ids

    async def aclose(self) -> None:
        await self.sink.aclose()


_default: Publisher | None = None
_default_lock = threading.Lock()


def _default_publisher() -> Publisher:
    global _default
    with _default_lock:
        if _default is None:
            _default = Publisher()
        return _default


def publish(
    queue: str, kwargs: Mapping[str, Any], *, delay: float = 0.0, message_id: str | None = None
) -> str:
    """Publish one message with the default publisher (broker and URL from the environment)."""
    return _default_publisher().publish(queue, kwargs, delay=delay, message_id=message_id)


def publish_batch(queue: str, messages: Iterable[Mapping[str, Any]]) -> list[str]:
    return _default_publisher().publish_batch(queue, messages)


async def publish_async(
    queue: str, kwargs: Mapping[str, Any], *, delay: float = 0.0, message_id: str | None = None
) -> str:
    """Publish one message from asyncio code. Opens a short-lived connection; for many messages
    keep an :class:`AsyncPublisher` instead."""
    pub = AsyncPublisher()
    try:
        return await pub.publish(queue, kwargs, delay=delay, message_id=message_id)
    finally:
        await pub.aclose()
