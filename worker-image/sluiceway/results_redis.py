"""The Redis side of calls (see :mod:`sluiceway.results` for the design): the caller's one
listener and one sender per event loop, the synchronous client, and the worker's result writer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Sequence
from typing import Any, cast

import redis
import redis.asyncio

from sluiceway import connection, result_record
from sluiceway.contract import reply_channel, reply_channel_of
from sluiceway.results import CLIENT_ID
from sluiceway.transports import registry
from sluiceway.transports.base import AsyncSink

_SEND_BATCH = 1000  # messages per publish when many calls start at once

_sync_lock = threading.Lock()
_sync_clients: dict[str, redis.Redis] = {}


def sync_client(url: str) -> redis.Redis:
    with _sync_lock:
        if url not in _sync_clients:
            _sync_clients[url] = connection.client(url)
        return _sync_clients[url]


class _Listener:
    """One per event loop and results Redis: one subscription for every waiting call."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Two sockets whatever the number of calls: the subscription, and one for commands.
        self.redis = connection.async_client(url, max_connections=1)
        self.pubsub: Any = None  # made in _run: a cluster client must learn its slots first
        self.channel = reply_channel(CLIENT_ID)
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

    # The timeout is the caller's budget for this one result, as in call_async's signature.
    async def wait(self, key: str, timeout: float, *, check_first: bool = False) -> dict[str, Any]:  # noqa: ASYNC109
        self.expect(key)
        fut = self.waiters[key]
        try:
            if check_first:
                # A late caller: the notification may have come and gone; the LIST still has it.
                async with self.command_lock:
                    raw: Any = await self.redis.lpop(key)
                if raw is not None and not fut.done():
                    fut.set_result(result_record.parse(raw))
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise TimeoutError(f"no result for {key} within {timeout} s") from None
        finally:
            if self.waiters.get(key) is fut:
                del self.waiters[key]

    async def _subscriber(self) -> Any:
        client = connection.async_client(self.url)
        if connection.is_cluster(client):
            # The cluster's pub/sub routes by the channel's slot, so it needs the slot map.
            await cast(Any, client).initialize()
        return client.pubsub(ignore_subscribe_messages=True)

    async def _run(self) -> None:
        unlinker = asyncio.get_running_loop().create_task(self._unlink_delivered())
        failures = 0
        try:
            while True:
                try:
                    if self.pubsub is None:
                        self.pubsub = await self._subscriber()
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
                    if self.pubsub is not None:
                        with contextlib.suppress(redis.RedisError, ConnectionError):
                            await self.pubsub.reset()
        finally:
            unlinker.cancel()

    async def _unlink_delivered(self) -> None:
        """Remove delivered results from Redis, many per command, off the listener's path."""
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


async def listener(url: str) -> _Listener:
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


def sender(broker: str, url: str) -> _Sender:
    mine = _senders.setdefault(asyncio.get_running_loop(), {})
    if (broker, url) not in mine:
        mine[(broker, url)] = _Sender(broker, url)
    return mine[(broker, url)]


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
            self._client = connection.client(self.url)
        cluster = connection.is_cluster(self._client)
        pipe = self._client.pipeline(transaction=False)
        notices: list[tuple[str, bytes]] = []
        for key, record in records:
            channel = reply_channel_of(key)
            if channel is None:  # codec.decode already refused it; never write elsewhere
                continue
            pipe.rpush(key, record)
            # A message that ran twice (at-least-once) keeps its first result only.
            pipe.ltrim(key, 0, 0)
            pipe.expire(key, self.ttl)
            if cluster:
                notices.append((channel, record))
            else:
                pipe.publish(channel, record)
        pipe.execute()
        if notices:
            # redis-py's cluster pipeline refuses PUBLISH. A cluster forwards a PUBLISH to every
            # node, so one node's plain pipeline reaches each caller, wherever it subscribed;
            # it runs after the records are stored, so a notified caller finds its result.
            node_client: Any = self._client
            plain = node_client.get_redis_connection(node_client.get_default_node())
            notify = plain.pipeline(transaction=False)
            for channel, record in notices:
                notify.publish(channel, record)
            notify.execute()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
