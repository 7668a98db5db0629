"""Redis clients with the retry policy every Sluiceway process uses."""

from __future__ import annotations

import threading
from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# Short per-call retries ride out a blip or a failover; longer outages surface as ConnectionError
# to the caller's loop, which backs off and keeps the process alive (an outage is never fatal).
_RETRY_ERRORS: list[type[Exception]] = [redis.ConnectionError, redis.TimeoutError]


def client(url: str, **kwargs: Any) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=_RETRY_ERRORS,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=15,
        **kwargs,
    )


def async_client(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(
        url,
        retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=_RETRY_ERRORS,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=15,
        **kwargs,
    )


class RoundTrips:
    """How many requests a client has sent to Redis. Each waits for its reply, so each is one
    round trip, whatever it carries: a command, a pipeline, a health-check PING, or the SCRIPT
    LOAD redis-py makes after a NOSCRIPT reply."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # several threads send, and += can lose an update
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        return self._count


def count_round_trips(client: redis.Redis) -> RoundTrips:
    """Count every request ``client`` sends from now on, at the one place all of them pass.

    Call it before the client connects: connections opened earlier are not counted.
    """
    counter = RoundTrips()
    pool = client.connection_pool
    base: Any = pool.connection_class

    class CountingConnection(base):  # type: ignore[misc]
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter.add()
            super().send_packed_command(command, check_health)

    pool.connection_class = CountingConnection
    return counter
