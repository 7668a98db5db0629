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

Importing this module loads no Redis client: the Redis side (:mod:`sluiceway.results_redis`) is
loaded when a process first calls, the way the transport registry loads a broker's module.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sluiceway import codec, result_record
from sluiceway.contract import ENV_REDIS_URL, reply_key
from sluiceway.publish import DEFAULT_REDIS_URL, Publisher, resolve_broker, resolve_queue

DEFAULT_TIMEOUT = 30.0
_BLPOP_STEP = 5.0  # seconds per blocking pop: below the client's socket timeout

# One client id per process: every call's reply key sits under it, and its channel carries them.
CLIENT_ID = codec.new_id()


def _backend() -> Any:
    return importlib.import_module("sluiceway.results_redis")


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
        client = _backend().sync_client(self.redis_url)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no result for message {self.id} within {timeout} s")
            got = client.blpop([self.key], timeout=min(left, _BLPOP_STEP))
            if got is not None:
                return result_record.outcome(result_record.parse(got[1]))

    async def result_async(self, timeout: float = DEFAULT_TIMEOUT) -> Any:  # noqa: ASYNC109 - the API
        """Await the result on this event loop's shared listener."""
        listener = await _backend().listener(self.redis_url)
        return result_record.outcome(await listener.wait(self.key, timeout, check_first=True))


# --- synchronous callers -------------------------------------------------------------------------

_sync_lock = threading.Lock()
_publishers: dict[tuple[str | None, str | None, str | None], Publisher] = {}


def submit(
    queue: str,
    kwargs: Mapping[str, Any],
    *,
    url: str | None = None,
    redis_url: str | None = None,
    namespace: str | None = None,
) -> Handle:
    """Publish a message that asks for a reply; returns its :class:`Handle`. The same as
    ``Publisher(url, namespace=namespace).publish(queue, kwargs, reply=True)``, with the
    publisher kept for the process."""
    with _sync_lock:
        pub = _publishers.get((url, namespace, None))
        if pub is None:
            pub = _publishers[(url, namespace, None)] = Publisher(url, namespace=namespace)
    return pub.publish(queue, kwargs, reply=True, redis_url=redis_url)


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
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the API asks for it, as call() does
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
) -> tuple[Handle, Any, Callable[[], Awaitable[None]]]:
    broker, broker_url = resolve_broker(url)
    keys = resolve_queue(queue, namespace)
    msg_id = codec.new_id()
    key = reply_key(CLIENT_ID, msg_id)
    payload = _payload(kwargs, key, msg_id)  # bad kwargs raise here, before anything is sent
    handle = Handle(msg_id, key, results_url(broker, broker_url, redis_url))
    backend = _backend()
    listener = await backend.listener(handle.redis_url)
    sender = backend.sender(broker, broker_url)
    return handle, listener, lambda: sender.send(keys.namespace, keys.queue, payload)
