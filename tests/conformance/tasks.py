"""Task functions of the conformance suite. Broker-blind: they record on the coordination Redis
(``TEST_RECORD_URL``) what ran, where and when, so a scenario can count lost and duplicate work
on any broker."""

from __future__ import annotations

import os
import threading
import time

import redis

_client: redis.Redis | None = None
_lock = threading.Lock()


def _r() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ["TEST_RECORD_URL"])
        return _client


def work(n: int, sleep: float = 0.0) -> None:
    """Record the start (time, message, worker process), work ``sleep`` seconds, record done."""
    pipe = _r().pipeline(transaction=False)
    pipe.rpush("c:starts", f"{time.time():.6f}")
    pipe.hincrby("c:seen", str(n), 1)
    pipe.hset("c:by", str(n), os.getpid())
    pipe.execute()
    if sleep:
        time.sleep(sleep)
    _r().hincrby("c:done", str(n), 1)


def fails(n: int) -> None:
    """Always raises; records each attempt's time, to see the backoff between them."""
    _r().rpush(f"c:attempt:{n}", f"{time.time():.6f}")
    raise ValueError(f"message {n} always fails")


def hangs(n: int) -> None:
    _r().rpush(f"c:attempt:{n}", f"{time.time():.6f}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # short steps, so the injected timeout can interrupt
        time.sleep(0.05)
