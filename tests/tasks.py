"""Task functions the tests run inside real worker processes.

Each records what happened in Redis (``TEST_RECORD_URL``), so a test can check that every message
was processed, how often, and when each task started.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import redis

import sluiceway

_client: redis.Redis | None = None


_client_lock = threading.Lock()


def _r() -> redis.Redis:
    global _client
    # Locked: two threads that each built a client would drop one, and its pool closes sockets
    # the other thread is using ("Bad file descriptor").
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ["TEST_RECORD_URL"])
        return _client


def record(n: int, sleep: float = 0.0) -> None:
    """Record the message number and the start time, then work for ``sleep`` seconds."""
    started = time.time()
    pipe = _r().pipeline(transaction=False)
    pipe.rpush("test:starts", f"{started:.6f}")
    pipe.hincrby("test:seen", str(n), 1)
    pipe.execute()
    if sleep:
        time.sleep(sleep)
    _r().hincrby("test:done", str(n), 1)


async def record_async(n: int, sleep: float = 0.0) -> None:
    started = time.time()
    _r().rpush("test:starts", f"{started:.6f}")
    _r().hincrby("test:seen", str(n), 1)
    if sleep:
        await asyncio.sleep(sleep)
    _r().hincrby("test:done", str(n), 1)


def flaky(n: int, fail_times: int = 1) -> None:
    """Fail the first ``fail_times`` attempts of each message, then succeed."""
    attempts = _r().hincrby("test:attempts", str(n), 1)
    if attempts <= fail_times:
        raise RuntimeError(f"planned failure {attempts} of message {n}")
    _r().hincrby("test:done", str(n), 1)


def always_fails(n: int) -> None:
    _r().hincrby("test:attempts", str(n), 1)
    raise ValueError(f"message {n} can never succeed")


def rejects(n: int) -> None:
    raise sluiceway.Reject(f"message {n} is poison")


def hangs(n: int, seconds: float = 3600) -> None:
    """Run far past any timeout, in short Python-level steps (the worker's injected timeout can
    interrupt these; nothing can interrupt one long C-level sleep)."""
    _r().hincrby("test:attempts", str(n), 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def noop(n: int = 0) -> None:
    return None


async def noop_async(n: int = 0) -> None:
    return None


def misbehave(n: int, mode: str = "ok") -> None:
    """One function, many ways to fail, chosen by the message."""
    started = time.time()
    _r().rpush("test:starts", f"{started:.6f}")
    attempts = _r().hincrby("test:attempts", str(n), 1)
    if mode == "raise":
        raise ValueError(f"message {n} always fails")
    if mode == "hang":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
    if mode == "reject":
        raise sluiceway.Reject(f"message {n} is poison")
    if mode == "flaky" and attempts == 1:
        raise RuntimeError("first attempt fails")
    if mode == "retry_never" and attempts == 1:
        raise sluiceway.RetryLater(float("inf"), "asks for an endless delay")
    _r().hincrby("test:done", str(n), 1)
