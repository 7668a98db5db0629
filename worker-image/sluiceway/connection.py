"""Redis clients with the retry policy every Sluiceway process uses.

A ``redis://``, ``rediss://`` or ``unix://`` URL names one Redis server. A Redis Cluster is chosen
explicitly by the scheme ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS), naming any
one node: the client is redis-py's ``RedisCluster``, which learns the rest from ``CLUSTER SLOTS``.
Nothing guesses: a cluster node behind a plain ``redis://`` URL answers ``MOVED`` for most keys,
and a cluster URL pointed at a single server fails at connect, both loudly.
"""

from __future__ import annotations

import threading
from typing import Any, Final, cast
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# Short per-call retries ride out a blip or a failover; longer outages surface as ConnectionError
# to the caller's loop, which backs off and keeps the process alive (an outage is never fatal).
_RETRY_ERRORS: list[type[Exception]] = [redis.ConnectionError, redis.TimeoutError]


# The cluster schemes and the plain scheme redis-py's RedisCluster.from_url takes for each.
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def cluster_node_url(url: str) -> str | None:
    """For a Redis Cluster URL, the same URL with the plain scheme redis-py expects; ``None``
    for a single-server URL. Raises ``ValueError`` for a cluster URL with a database other than 0
    (a cluster has only database 0)."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if plain is None:
        return None
    db = parts.path.strip("/")
    if db not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, the URL names database {db!r}")
    return urlunsplit((plain, parts.netloc, "", parts.query, parts.fragment))


def is_cluster(client: Any) -> bool:
    """True for a client :func:`client` or :func:`async_client` made from a cluster URL."""
    return isinstance(client, redis.RedisCluster | redis.asyncio.RedisCluster)


def client(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``. For a cluster URL it is a ``redis.RedisCluster``, typed as
    ``redis.Redis``: it has the same command methods, and the code that reaches below the
    commands (:class:`~sluiceway.transports.redis.RedisExchange`, :func:`count_round_trips`)
    asks :func:`is_cluster` first."""
    node_url = cluster_node_url(url)
    if node_url is not None:
        try:
            cluster = redis.RedisCluster.from_url(
                node_url,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
                socket_connect_timeout=2.0,
                socket_timeout=10.0,
                health_check_interval=15,
                **kwargs,
            )
        except redis.exceptions.RedisClusterException as exc:
            # Unlike redis.Redis, RedisCluster connects as it is made (to read the slot map), and
            # its error is not a RedisError; callers handle an unreachable Redis as an outage.
            raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc
        return cast(redis.Redis, cluster)
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
    """The asyncio twin of :func:`client`; a cluster URL gives ``redis.asyncio.RedisCluster``."""
    node_url = cluster_node_url(url)
    if node_url is not None:
        return cast(
            redis.asyncio.Redis,
            redis.asyncio.RedisCluster.from_url(
                node_url,
                retry=redis.asyncio.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
                retry_on_error=_RETRY_ERRORS,
                socket_connect_timeout=2.0,
                socket_timeout=10.0,
                health_check_interval=15,
                **kwargs,
            ),
        )
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

    Connections the client opened already (a cluster client connects while it learns the slot
    map) are counted from now on too, so the count never depends on which node that was.
    """
    counter = RoundTrips()
    if is_cluster(client):
        # One pool per node: the nodes known now, and (through the kwargs every new node's client
        # is made with) the nodes a resharding or failover reveals later.
        cluster: Any = client
        manager = cluster.nodes_manager
        for node in list(manager.nodes_cache.values()):
            if node.redis_connection is not None:
                _count_pool(node.redis_connection.connection_pool, counter)
        base = manager.connection_kwargs.get("connection_class", redis.Connection)
        manager.connection_kwargs["connection_class"] = _counting(base, counter)
        return counter
    _count_pool(client.connection_pool, counter)
    return counter


def _count_pool(pool: Any, counter: RoundTrips) -> None:
    pool.connection_class = _counting(pool.connection_class, counter)
    # redis-py keeps a pool's open connections in these two (private) lists; a test checks they exist.
    opened = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
    for conn in opened:
        conn.__class__ = _counting(type(conn), counter)


def _counting(base: Any, counter: RoundTrips) -> Any:
    class CountingConnection(base):  # type: ignore[misc]
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter.add()
            super().send_packed_command(command, check_health)

    return CountingConnection
