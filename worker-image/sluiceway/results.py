"""Calls: publish a message, then wait for its function's return value.

Results travel through the coordination Redis for every broker (the broker only carries the
message). The key scheme is :func:`sluiceway.contract.reply_key`; the record is
:mod:`sluiceway.result_record`.

Why a LIST per call plus a pub/sub channel per caller process:

- the worker RPUSHes the record to the call's reply key (trimmed to one entry, with a TTL), so a
  caller that asks late, within the TTL, still finds it, and Redis memory stays bounded;
- it also PUBLISHes the record on the caller's channel, so one subscription per process and event
  loop hears every result: 10,000 waiting calls cost one socket and one listener task, not a
  blocking BLPOP (and a socket) each. The listener UNLINKs the keys it delivered, in batches.

Redis pub/sub is at-most-once: a notification published while the listener reconnects is lost.
So after every (re)subscription the listener LPOPs the keys of the calls still waiting; the LIST
is the truth, the notification only a wake-up.

Importing this module loads no Redis client: a caller loads it when it first calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sluiceway import codec, result_record
from sluiceway.contract import ENV_REDIS_URL, reply_channel, reply_channel_of, reply_key
from sluiceway.publish import DEFAULT_REDIS_URL, Publisher, resolve_broker, resolve_queue
from sluiceway.transports import registry

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from sluiceway.transports.base import AsyncSink

DEFAULT_TIMEOUT = 30.0
_SEND_BATCH = 1000  # messages per publish when many calls start at once
_BLPOP_STEP = 5.0  # seconds per blocking pop: below the client's socket timeout

# One client id per process: every call's reply key sits under it, and its channel carries them.
_CLIENT_ID = codec.new_id()


def results_url(broker: str, broker_url: str, redis_url: str | None) -> str:
    """The Redis that carries results: given, else the broker's own Redis, else the
    coordination Redis from the environment."""
    if redis_url:
        return redis_url
    if broker == "redis":
        return broker_url
    return os.environ.get(ENV_REDIS_URL) or DEFAULT_REDIS_URL


def _payload(kwargs: Mapping[str, Any], key: str, msg_id: str) -> bytes:
    return codec.encode(dict(kwargs), codec.Meta(id=msg_id, published_at=time.time(), reply=key))


class Handle:
    """A published call whose result may be awaited now or later (within the result TTL)."""

    def __init__(self, message_id: str, key: str, redis_url: str) -> None:
        self.id = message_id
        self.key = key
        self.redis_url = redis_url

    def result(self, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Block until the result; raises ``RemoteError`` or ``TimeoutError``."""
        client = _sync_client(self.redis_url)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no result for message {self.id} within {timeout} s")
            got = client.blpop([self.key], timeout=min(left, _BLPOP_STEP))
            if got is not None:
                return result_record.outcome(result_record.parse(got[1]))

    async def result_async(self, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Await the result on this event loop's shared listener."""
        listener = await _listener(self.redis_url)
        return result_record.outcome(await listener.wait(self.key, timeout, check_first=True))


# --- synchronous callers -------------------------------------------------------------------------

_sync_lock = threading.Lock()
_sync_clients: dict[str, redis.Redis] = {}
_publishers: dict[tuple[str | None, str | None, str | None], Publisher] = {}


def _sync_client(url: str) -> redis.Redis:
    from sluiceway import connection

    with _sync_lock:
        if url not in _sync_clients:
            _sync_clients[url] = connection.client(url)
        return _sync_clients[url]


def submit(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    url: str | None = None,
    redis_url: str | None = None,
    namespace: str | None = None,
) -> Handle:
    """Publish a message that asks for a reply; returns its :class:`Handle`."""
    with _sync_lock:
        pub = _publishers.get((url, namespace, None))
        if pub is None:
            pub = _publishers[(url, namespace, None)] = Publisher(url, namespace=namespace)
    keys = resolve_queue(queue, pub.namespace)
    msg_id = codec.new_id()
    key = reply_key(_CLIENT_ID, msg_id)
    pub.sink.send(keys.namespace, keys.queue, [_payload(kwargs, key, msg_id)])
    return Handle(msg_id, key, results_url(pub.broker, pub.url, redis_url))


def call(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
    redis_url: str | None = None,
    namespace: str | None = None,
) -> Any:
    """Run the queue's function with ``kwargs`` on a worker and return what it returned.

    Raises ``RemoteError`` when the task failed for good and ``TimeoutError`` when no result came
    within ``timeout`` seconds (the task may still run; its result waits in Redis for the TTL).
    """
    return submit(queue, kwargs, url=url, redis_url=redis_url, namespace=namespace).result(timeout)


# --- asyncio callers -----------------------------------------------------------------------------


class _Listener:
    """One per event loop and results Redis: one subscription for every waiting call."""

    def __init__(self, url: str) -> None:
        from sluiceway import connection

        self.url = url
        # Two sockets whatever the number of calls: the subscription, and one for commands.
        self.redis = connection.async_client(url, max_connections=1)
        self.pubsub = connection.async_client(url).pubsub(ignore_subscribe_messages=True)
        self.channel = reply_channel(_CLIENT_ID)
        self.waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.command_lock = asyncio.Lock()
        self.delivered: list[str] = []  # keys whose results were handed over, to UNLINK
        self.delivered_event = asyncio.Event()

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="sluiceway-results")
        try:
            async with asyncio.timeout(10.0):
                await self.ready.wait()
        except TimeoutError:
            self.task.cancel()
            raise ConnectionError(f"cannot subscribe to results on {self.url}") from None

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def expect(self, key: str) -> None:
        """Register a waiter for ``key`` now, before its message is published."""
        if key not in self.waiters:
            self.waiters[key] = asyncio.get_running_loop().create_future()

    async def wait(self, key: str, timeout: float, *, check_first: bool = False) -> dict[str, Any]:
        self.expect(key)
        fut = self.waiters[key]
        try:
            if check_first:
                # A late caller: the notification may have come and gone; the LIST still has it.
                async with self.command_lock:
                    raw = await self.redis.lpop(key)
                if raw is not None and not fut.done():
                    fut.set_result(result_record.parse(raw))
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise TimeoutError(f"no result for {key} within {timeout} s") from None
        finally:
            if self.waiters.get(key) is fut:
                del self.waiters[key]

    async def _run(self) -> None:
        import redis

        unlinker = asyncio.get_running_loop().create_task(self._unlink_delivered())
        failures = 0
        try:
            while True:
                try:
                    await self.pubsub.subscribe(self.channel)
                    # Results published while we were not subscribed: fetch them from their lists.
                    await self._sweep()
                    self.ready.set()
                    failures = 0
                    # A blocking read: no per-read timeout, which redis-py implements with
                    # cancellation and which would make this task hard to cancel cleanly.
                    async for msg in self.pubsub.listen():
                        self._deliver(msg.get("data"))
                except (redis.ConnectionError, redis.TimeoutError, ConnectionError):
                    failures += 1
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                    with contextlib.suppress(redis.RedisError, ConnectionError):
                        await self.pubsub.reset()
        finally:
            unlinker.cancel()

    async def _unlink_delivered(self) -> None:
        """Remove delivered results from Redis, many per command, off the listener's path."""
        import redis

        while True:
            await self.delivered_event.wait()
            self.delivered_event.clear()
            keys, self.delivered = self.delivered, []
            for i in range(0, len(keys), _SEND_BATCH):
                with contextlib.suppress(redis.RedisError, ConnectionError):  # the TTL removes them
                    async with self.command_lock:
                        await self.redis.unlink(*keys[i : i + _SEND_BATCH])

    def _deliver(self, data: Any) -> None:
        try:
            record = result_record.parse(data)
        except (ValueError, TypeError):
            return
        key = record["key"]
        fut = self.waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_result(record)
            self.delivered.append(key)
            self.delivered_event.set()

    async def _sweep(self) -> None:
        keys = [k for k, f in self.waiters.items() if not f.done()]
        for i in range(0, len(keys), _SEND_BATCH):
            chunk = keys[i : i + _SEND_BATCH]
            async with self.command_lock, self.redis.pipeline(transaction=False) as pipe:
                for k in chunk:
                    pipe.lpop(k)
                found = await pipe.execute()
            for k, raw in zip(chunk, found, strict=True):
                fut = self.waiters.get(k)
                if raw is not None and fut is not None and not fut.done():
                    fut.set_result(result_record.parse(raw))


class _Sender:
    """Publishes calls for one event loop and broker: calls that start together go out in one
    send, one send at a time, so 10,000 calls need neither 10,000 sockets nor round trips."""

    def __init__(self, broker: str, url: str) -> None:
        self.sink: AsyncSink = registry.async_sink(broker, url)
        self.queue: asyncio.Queue[tuple[str, str, bytes, asyncio.Future[None]]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="sluiceway-calls")

    async def send(self, namespace: str, queue: str, payload: bytes) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((namespace, queue, payload, fut))
        await fut

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            while len(items) < _SEND_BATCH and not self.queue.empty():
                items.append(self.queue.get_nowait())
            groups: dict[tuple[str, str], list[tuple[bytes, asyncio.Future[None]]]] = {}
            for ns, q, payload, fut in items:
                groups.setdefault((ns, q), []).append((payload, fut))
            for (ns, q), batch in groups.items():
                try:
                    await self.sink.send(ns, q, [p for p, _ in batch])
                except Exception as exc:
                    _settle_all([f for _, f in batch], exc)
                else:
                    _settle_all([f for _, f in batch], None)


def _settle_all(futures: Sequence[asyncio.Future[None]], exc: BaseException | None) -> None:
    for f in futures:
        if not f.done():
            if exc is None:
                f.set_result(None)
            else:
                f.set_exception(exc)


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Listener]] = (
    weakref.WeakKeyDictionary()
)
_senders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], _Sender]] = (
    weakref.WeakKeyDictionary()
)
_starting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def _listener(url: str) -> _Listener:
    loop = asyncio.get_running_loop()
    mine = _listeners.setdefault(loop, {})
    if url in mine and mine[url].alive():
        return mine[url]
    lock = _starting.setdefault(loop, asyncio.Lock())
    async with lock:  # 10,000 first calls at once start one listener
        if url not in mine or not mine[url].alive():
            listener = _Listener(url)
            await listener.start()
            mine[url] = listener
    return mine[url]


def _sender(broker: str, url: str) -> _Sender:
    mine = _senders.setdefault(asyncio.get_running_loop(), {})
    if (broker, url) not in mine:
        mine[(broker, url)] = _Sender(broker, url)
    return mine[(broker, url)]


async def submit_async(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    url: str | None = None,
    redis_url: str | None = None,
    namespace: str | None = None,
) -> Handle:
    """Publish a message that asks for a reply from asyncio code; returns its :class:`Handle`."""
    handle, _, send = await _start_call(queue, kwargs, url, redis_url, namespace)
    await send()
    return handle


async def call_async(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    url: str | None = None,
    redis_url: str | None = None,
    namespace: str | None = None,
) -> Any:
    """:func:`call` for asyncio: the event loop keeps running while the task runs."""
    handle, listener, send = await _start_call(queue, kwargs, url, redis_url, namespace)
    # Waiting from before the publish: the notification cannot come before the waiter exists.
    listener.expect(handle.key)
    try:
        await send()
    except BaseException:
        listener.waiters.pop(handle.key, None)
        raise
    return result_record.outcome(await listener.wait(handle.key, timeout))


async def _start_call(
    queue: str, kwargs: Mapping[str, Any], url: str | None, redis_url: str | None, namespace: str | None
) -> tuple[Handle, _Listener, Callable[[], Awaitable[None]]]:
    broker, broker_url = resolve_broker(url)
    keys = resolve_queue(queue, namespace)
    msg_id = codec.new_id()
    key = reply_key(_CLIENT_ID, msg_id)
    payload = _payload(kwargs, key, msg_id)  # bad kwargs raise here, before anything is sent
    handle = Handle(msg_id, key, results_url(broker, broker_url, redis_url))
    listener = await _listener(handle.redis_url)
    sender = _sender(broker, broker_url)
    return handle, listener, lambda: sender.send(keys.namespace, keys.queue, payload)


# --- the worker's side ---------------------------------------------------------------------------


class ResultWriter:
    """Writes the records of settled calls: RPUSH + LTRIM to one entry + EXPIRE + PUBLISH each,
    in one pipeline per batch. Connects on first use, so a worker that only ever sees
    fire-and-forget messages never opens its socket."""

    def __init__(self, url: str, ttl_seconds: float) -> None:
        self.url = url
        self.ttl = max(1, int(ttl_seconds))
        self._client: redis.Redis | None = None

    def write(self, records: Sequence[tuple[str, bytes]]) -> None:
        if self._client is None:
            from sluiceway import connection

            self._client = connection.client(self.url)
        pipe = self._client.pipeline(transaction=False)
        for key, record in records:
            channel = reply_channel_of(key)
            if channel is None:  # codec.decode already refused it; never write elsewhere
                continue
            pipe.rpush(key, record)
            # A message that ran twice (at-least-once) keeps its first result only.
            pipe.ltrim(key, 0, 0)
            pipe.expire(key, self.ttl)
            pipe.publish(channel, record)
        pipe.execute()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
