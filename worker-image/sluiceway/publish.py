"""Publishing SDK: put messages on a Sluiceway queue from any Python program.

A queue is named ``"name"`` (in the default namespace, or ``SLUICEWAY_NAMESPACE``) or
``"namespace/name"``, matching the TaskQueue's namespace and ``spec.broker.queue``.

The broker is chosen by the URL's scheme (``redis://``, ``amqp://``, ``kafka://``), or, with no
URL given, by ``SLUICEWAY_BROKER`` and ``SLUICEWAY_BROKER_URL`` (``SLUICEWAY_REDIS_URL`` for Redis).
A message is a plain JSON object of keyword arguments on every broker. Importing this module
loads no broker client: a publisher loads its broker's when it is built
(:mod:`sluiceway.transports.registry`).

``key=`` is the Kafka record key: Kafka partitions by it, and a TaskQueue with
``ordering: key`` runs one key's messages one at a time in publish order. Redis and RabbitMQ have
no message key and no per-key order (their workers take messages in queue order), so a key there
is refused with a ``ValueError`` naming ``key`` rather than accepted and silently ignored: code
that relies on per-key order must not appear to work on a broker that cannot give it. A sink
that takes keys says so with ``takes_keys = True`` (the one place this is decided).

``reply=True`` asks the worker for the function's return value and returns a
:class:`sluiceway.results.Handle` (``handle.result()`` / ``await handle.result_async()``) instead
of the message id; :func:`sluiceway.submit` is ``publish(..., reply=True)``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from sluiceway import codec
from sluiceway.contract import (
    DEFAULT_NAMESPACE,
    ENV_BROKER,
    ENV_BROKER_URL,
    ENV_NAMESPACE,
    ENV_REDIS_URL,
    Keys,
    reply_key,
)
from sluiceway.transports import registry
from sluiceway.transports.base import AsyncSink, Sink

if TYPE_CHECKING:
    from sluiceway.results import Handle

MessageKey = bytes | str

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


def _wire(
    kwargs: Mapping[str, Any], metadata: bool, message_id: str | None, reply_to: str | None = None
) -> tuple[str, bytes]:
    msg_id = message_id or codec.new_id()
    meta = codec.Meta(id=msg_id, published_at=time.time(), reply=reply_to) if metadata else None
    return msg_id, codec.encode(dict(kwargs), meta)


def takes_keys(sink: object) -> bool:
    """Whether a sink sends a per-message key (Kafka's record key); see the module's docstring."""
    return getattr(sink, "takes_keys", False) is True


def check_keys(broker: str, sink: object, keys: Sequence[MessageKey | None] | None) -> None:
    """Refuse keys a broker would drop: a ``ValueError`` naming ``key`` and the broker."""
    if keys is None or all(k is None for k in keys):
        return
    if not takes_keys(sink):
        raise ValueError(
            f"key: the {broker} broker has no message key (no partitions, no per-key order); "
            "only Kafka takes one. Publish without key= on this broker"
        )
    for k in keys:
        if k is not None and not isinstance(k, bytes | str):
            raise ValueError(f"key must be bytes or str, not {type(k).__name__}")


class _Call:
    """What ``reply=True`` adds to a message: its reply key and where the result will be."""

    def __init__(self, broker: str, url: str, redis_url: str | None) -> None:
        from sluiceway import results  # results imports this module: bound at call time

        self.results = results
        self.msg_id = codec.new_id()
        self.key = reply_key(results.CLIENT_ID, self.msg_id)
        self.redis_url = results.results_url(broker, url, redis_url)

    def handle(self) -> Handle:
        return self.results.Handle(self.msg_id, self.key, self.redis_url)


class Publisher:
    """Synchronous publisher. Thread-safe; reuse one per process."""

    def __init__(
        self, url: str | None = None, *, namespace: str | None = None, broker: str | None = None
    ) -> None:
        self.broker, self.url = resolve_broker(url, broker)
        self.sink: Sink = registry.sink(self.broker, self.url)
        self.namespace = namespace

    @overload
    def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = ...,
        message_id: str | None = ...,
        metadata: bool = ...,
        key: MessageKey | None = ...,
        reply: Literal[False] = ...,
        redis_url: str | None = ...,
    ) -> str: ...

    @overload
    def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = ...,
        message_id: str | None = ...,
        metadata: bool = ...,
        key: MessageKey | None = ...,
        reply: Literal[True],
        redis_url: str | None = ...,
    ) -> Handle: ...

    def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = 0.0,
        message_id: str | None = None,
        metadata: bool = True,
        key: MessageKey | None = None,
        reply: bool = False,
        redis_url: str | None = None,
    ) -> str | Handle:
        """Publish one message; returns its id, or with ``reply=True`` a Handle for its result.

        ``delay`` holds it back that many seconds; ``key`` is the Kafka record key (refused on
        other brokers); ``redis_url`` is where a reply is read (default: the results Redis)."""
        keys = resolve_queue(queue, self.namespace)
        check_keys(self.broker, self.sink, [key])
        call = None
        if reply:
            if message_id is not None or not metadata:
                raise ValueError("reply=True makes its own message id and needs the metadata")
            call = _Call(self.broker, self.url, redis_url)
        msg_id, payload = _wire(
            kwargs, metadata, call.msg_id if call else message_id, call.key if call else None
        )
        self._send(keys, [payload], max(delay, 0.0), None if key is None else [key])
        return call.handle() if call else msg_id

    def publish_batch(
        self,
        queue: str,
        messages: Iterable[Mapping[str, Any]],
        *,
        metadata: bool = True,
        keys: Sequence[MessageKey | None] | None = None,
    ) -> list[str]:
        """Publish many messages in few round trips, in order; returns their ids. ``keys``, one
        per message, are Kafka record keys (refused on other brokers)."""
        scope = resolve_queue(queue, self.namespace)
        check_keys(self.broker, self.sink, keys)
        if keys is not None:
            messages = list(messages)  # counted before anything is sent: no half-keyed batch
            if len(keys) != len(messages):
                raise ValueError(f"keys: {len(keys)} keys for {len(messages)} messages")
        ids: list[str] = []
        chunk: list[bytes] = []
        for kwargs in messages:
            msg_id, payload = _wire(kwargs, metadata, None)
            ids.append(msg_id)
            chunk.append(payload)
            if len(chunk) == _CHUNK:
                self._send(scope, chunk, 0.0, keys[len(ids) - len(chunk) : len(ids)] if keys else None)
                chunk = []
        if chunk:
            self._send(scope, chunk, 0.0, keys[len(ids) - len(chunk) :] if keys else None)
        return ids

    def _send(
        self, scope: Keys, payloads: list[bytes], delay: float, keys: Sequence[MessageKey | None] | None
    ) -> None:
        if keys is None or not takes_keys(self.sink):  # check_keys: then every key is None
            self.sink.send(scope.namespace, scope.queue, payloads, delay=delay)
        else:
            # The sink said it takes keys (takes_keys); the Sink protocol itself does not say so.
            send: Any = self.sink.send
            send(scope.namespace, scope.queue, payloads, delay=delay, keys=keys)

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

    @overload
    async def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = ...,
        message_id: str | None = ...,
        metadata: bool = ...,
        key: MessageKey | None = ...,
        reply: Literal[False] = ...,
        redis_url: str | None = ...,
    ) -> str: ...

    @overload
    async def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = ...,
        message_id: str | None = ...,
        metadata: bool = ...,
        key: MessageKey | None = ...,
        reply: Literal[True],
        redis_url: str | None = ...,
    ) -> Handle: ...

    async def publish(
        self,
        queue: str,
        kwargs: Mapping[str, Any],
        *,
        delay: float = 0.0,
        message_id: str | None = None,
        metadata: bool = True,
        key: MessageKey | None = None,
        reply: bool = False,
        redis_url: str | None = None,
    ) -> str | Handle:
        """:meth:`Publisher.publish` for asyncio, with the same arguments and results."""
        scope = resolve_queue(queue, self.namespace)
        check_keys(self.broker, self.sink, [key])
        call = None
        if reply:
            if message_id is not None or not metadata:
                raise ValueError("reply=True makes its own message id and needs the metadata")
            call = _Call(self.broker, self.url, redis_url)
        msg_id, payload = _wire(
            kwargs, metadata, call.msg_id if call else message_id, call.key if call else None
        )
        if key is None:
            await self.sink.send(scope.namespace, scope.queue, [payload], delay=max(delay, 0.0))
        else:
            send: Any = self.sink.send  # check_keys made sure this sink takes keys
            await send(scope.namespace, scope.queue, [payload], delay=max(delay, 0.0), keys=[key])
        return call.handle() if call else msg_id

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


@overload
def publish(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    delay: float = ...,
    message_id: str | None = ...,
    key: MessageKey | None = ...,
    reply: Literal[False] = ...,
) -> str: ...


@overload
def publish(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    delay: float = ...,
    message_id: str | None = ...,
    key: MessageKey | None = ...,
    reply: Literal[True],
) -> Handle: ...


def publish(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    delay: float = 0.0,
    message_id: str | None = None,
    key: MessageKey | None = None,
    reply: bool = False,
) -> str | Handle:
    """Publish one message with the default publisher (broker and URL from the environment).
    Returns its id, or with ``reply=True`` a :class:`~sluiceway.results.Handle`."""
    pub = _default_publisher()
    if reply:
        return pub.publish(queue, kwargs, delay=delay, key=key, reply=True)
    return pub.publish(queue, kwargs, delay=delay, message_id=message_id, key=key)


def publish_batch(
    queue: str, messages: Iterable[Mapping[str, Any]], *, keys: Sequence[MessageKey | None] | None = None
) -> list[str]:
    return _default_publisher().publish_batch(queue, messages, keys=keys)


@overload
async def publish_async(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    delay: float = ...,
    message_id: str | None = ...,
    key: MessageKey | None = ...,
    reply: Literal[False] = ...,
) -> str: ...


@overload
async def publish_async(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    delay: float = ...,
    message_id: str | None = ...,
    key: MessageKey | None = ...,
    reply: Literal[True],
) -> Handle: ...


async def publish_async(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    delay: float = 0.0,
    message_id: str | None = None,
    key: MessageKey | None = None,
    reply: bool = False,
) -> str | Handle:
    """Publish one message from asyncio code. Opens a short-lived connection; for many messages
    keep an :class:`AsyncPublisher` instead."""
    pub = AsyncPublisher()
    try:
        if reply:
            return await pub.publish(queue, kwargs, delay=delay, key=key, reply=True)
        return await pub.publish(queue, kwargs, delay=delay, message_id=message_id, key=key)
    finally:
        await pub.aclose()
