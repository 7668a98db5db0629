"""Coordination on Redis: one STRING per worker heartbeat (with a TTL) and the ``workers`` ZSET."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis as redis_lib

from sluiceway.contract import Heartbeat, Keys

# Workers silent this long are forgotten, so the registry does not grow with every pod ever run.
FORGET_AFTER_MS = 3_600_000


class RedisCoordinator:
    outage_errors: tuple[type[BaseException], ...] = (redis_lib.RedisError,)

    def __init__(self, client: redis_lib.Redis, keys: Keys, worker_id: str) -> None:
        self.client = client
        self.keys = keys
        self.worker_id = worker_id

    def write_heartbeat(self, heartbeat: Heartbeat, ttl_seconds: float) -> None:
        k = self.keys
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(k.heartbeat(self.worker_id), json.dumps(heartbeat), px=int(ttl_seconds * 1000))
        pipe.zadd(k.workers, {self.worker_id: now_ms})
        pipe.zremrangebyscore(k.workers, "-inf", now_ms - FORGET_AFTER_MS)
        pipe.execute()

    def deregister(self) -> None:
        forget(self.client, self.keys, self.worker_id)

    def close(self) -> None:
        self.client.close()


def heartbeats(client: redis_lib.Redis, keys: Keys) -> list[Heartbeat]:
    """Live workers' latest heartbeats (expired ones are gone by TTL)."""
    ids = [_text(w) for w in client.zrange(keys.workers, 0, -1)]
    if not ids:
        return []
    raw = client.mget([keys.heartbeat(w) for w in ids])
    return [cast(Heartbeat, json.loads(r)) for r in raw if r]


def has_heartbeat(client: redis_lib.Redis, keys: Keys, worker_ids: list[str]) -> list[bool]:
    pipe = client.pipeline(transaction=False)
    for w in worker_ids:
        pipe.exists(keys.heartbeat(w))
    return [bool(x) for x in pipe.execute()]


def forget(client: redis_lib.Redis, keys: Keys, worker_id: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.heartbeat(worker_id))
    pipe.zrem(keys.workers, worker_id)
    pipe.execute()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
