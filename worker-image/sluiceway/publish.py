"""Publishing SDK: put messages on a Sluiceway queue from any Python program.

A queue is named ``"name"`` (in the default namespace, or ``SLUICEWAY_NAMESPACE``) or
``"namespace/name"``, matching the TaskQueue's namespace and ``spec.broker.queue``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis as redis_lib
import redis.asyncio

from sluiceway import codec, connection
from sluiceway.contract import DEFAULT_NAMESPACE, ENV_NAMESPACE, ENV_REDIS_URL, Keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_CHUNK = 1000  # messages per LPUSH: large enough to amortize, small enough not to stall Redis


def resolve_queue(queue: str, namespace: str | None = None) -> Keys:
    if "/" in queue:
        ns, _, name = queue.partition("/")
        if namespace and namespace != ns:
            raise ValueError(f"queue {queue!r} names namespace {ns!r} but namespace={namespace!r} was given")
        return Keys(ns, name)
    return Keys(namespace or os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE, queue)


def _wire(kwargs: Mapping[str, Any], metadata: bool, message_id: str | None) -> tuple[str, bytes]:
    msg_id = message_id or codec.new_id()
    meta = codec.Meta(id=msg_id, published_at=time.time()) if metadata else None
    return msg_id, codec.encode(dict(kwargs), meta)


class Publisher:
    """Synchronous publisher. Thread-safe; reuse one per process."""

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None) -> None:
        self.client: redis_lib.Redis = connection.client(
            redis_url or os.environ.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL
        )
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
        if delay > 0:
            server_ms = _server_ms(self.client.time())
            self.client.zadd(keys.delayed, {payload: server_ms + int(delay * 1000)})
        else:
            self.client.lpush(keys.ready, payload)
        return msg_id

    def publish_batch(
        self, queue: str, messages: Iterable[Mapping[str, Any]], *, metadata: bool = True
    ) -> list[str]:
        """Publish many messages in few round trips, in order; returns their ids."""
        keys = resolve_queue(queue, self.namespace)
        ids: list[str] = []
        chunk: list[bytes] = []
        pipe = self.client.pipeline(transaction=False)
        for kwargs in messages:
            msg_id, payload = _wire(kwargs, metadata, None)
            ids.append(msg_id)
            chunk.append(payload)
            if len(chunk) == _CHUNK:
                pipe.lpush(keys.ready, *chunk)
                chunk = []
        if chunk:
            pipe.lpush(keys.ready, *chunk)
        pipe.execute()
        return ids

    def close(self) -> None:
        self.client.close()


class AsyncPublisher:
    """asyncio publisher."""

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None) -> None:
        self.client: redis.asyncio.Redis = connection.async_client(
            redis_url or os.environ.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL
        )
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
        if delay > 0:
            server_ms = _server_ms(await self.client.time())
            await self.client.zadd(keys.delayed, {payload: server_ms + int(delay * 1000)})
        else:
            await self.client.lpush(keys.ready, payload)
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
        async with self.client.pipeline(transaction=False) as pipe:
            for i in range(0, len(payloads), _CHUNK):
                pipe.lpush(keys.ready, *payloads[i : i + _CHUNK])
            await pipe.execute()
        return ids

    async def aclose(self) -> None:
        await self.client.aclose()


def _server_ms(t: tuple[int, int]) -> int:
    # Delays are measured on the Redis clock, like the retry schedule, so publisher skew is moot.
    return int(t[0]) * 1000 + int(t[1]) // 1000


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
    """Publish one message with the default publisher (``SLUICEWAY_REDIS_URL``)."""
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
