"""Redis clients with the retry policy every Sluiceway process uses."""

from __future__ import annotations

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
