"""Task functions the benchmarks run in real worker processes."""

from __future__ import annotations

import os
import time

import redis

_client: redis.Redis | None = None


def noop(n: int = 0) -> None:
    return None


def stamp(n: int = 0) -> None:
    """Record the start time, for rate-limit precision."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_RECORD_URL"])
    _client.rpush("bench:starts", f"{time.time():.6f}")
