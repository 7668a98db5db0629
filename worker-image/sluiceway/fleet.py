"""Read and repair a queue's state in Redis: what the operator, the CLI and the demo observe.

These are the only functions outside the worker that touch the queue's keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis as redis_lib

from sluiceway.brokers.redis import reap
from sluiceway.contract import Heartbeat, Keys


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int
    delayed: int
    in_flight: int
    dead: int
    acked: int  # fleet-wide counters since the queue was created
    retried: int
    dead_total: int
    reaped: int

    @property
    def backlog(self) -> int:
        return self.ready + self.delayed


_STATS_SCRIPT = """
local inflight = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  inflight = inflight + redis.call('ZCARD', ARGV[1] .. 'inflight:' .. w)
end
local s = redis.call('HMGET', KEYS[5], 'acked', 'retried', 'dead', 'reaped')
return {redis.call('LLEN', KEYS[1]), redis.call('ZCARD', KEYS[2]), inflight, redis.call('LLEN', KEYS[3]),
        tonumber(s[1] or '0'), tonumber(s[2] or '0'), tonumber(s[3] or '0'), tonumber(s[4] or '0')}
"""


def queue_stats(client: redis_lib.Redis, keys: Keys) -> QueueStats:
    """Depth, in-flight and counters in one round trip."""
    r = client.eval(
        _STATS_SCRIPT, 5, keys.ready, keys.delayed, keys.dead, keys.leased_workers, keys.stats, keys.prefix
    )
    return QueueStats(*(int(x) for x in cast(list[Any], r)))


def heartbeats(client: redis_lib.Redis, keys: Keys) -> list[Heartbeat]:
    """Live workers' latest heartbeats (expired ones are gone by TTL)."""
    ids = [w.decode() if isinstance(w, bytes) else str(w) for w in client.zrange(keys.workers, 0, -1)]
    if not ids:
        return []
    raw = client.mget([keys.heartbeat(w) for w in ids])
    return [cast(Heartbeat, json.loads(r)) for r in raw if r]


def requeue_worker(client: redis_lib.Redis, keys: Keys, worker_id: str) -> int:
    """Return every lease of a worker that is gone (its pod was deleted) to the queue at once."""
    n = reap(client, keys, worker_id=worker_id, force=True)
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.heartbeat(worker_id))
    pipe.zrem(keys.workers, worker_id)
    pipe.execute()
    return n


def orphaned_workers(client: redis_lib.Redis, keys: Keys, known: set[str]) -> list[str]:
    """Workers that hold leases, are not in ``known`` (live pods), and have no live heartbeat.

    Both tests are needed: ``known`` may lag behind the cluster (a watch just starting), and a
    heartbeat may lapse in a Redis hiccup; a worker is only an orphan when it fails both.
    """
    holders = [w.decode() if isinstance(w, bytes) else str(w) for w in client.smembers(keys.leased_workers)]
    candidates = [w for w in holders if w not in known]
    if not candidates:
        return []
    pipe = client.pipeline(transaction=False)
    for w in candidates:
        pipe.exists(keys.heartbeat(w))
    return [w for w, alive in zip(candidates, pipe.execute(), strict=True) if not alive]


def dead_letters(client: redis_lib.Redis, keys: Keys, limit: int = 100) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(keys.dead, 0, limit - 1)]


_REPLAY_SCRIPT = """
local moved = 0
for i = 1, tonumber(ARGV[1]) do
  local entry = redis.call('RPOP', KEYS[1])
  if not entry then break end
  redis.call('LPUSH', KEYS[2], cjson.decode(entry)['payload'])
  moved = moved + 1
end
return moved
"""


def replay_dead_letters(client: redis_lib.Redis, keys: Keys, count: int) -> int:
    """Move up to ``count`` dead-lettered messages back to the queue, oldest first, atomically."""
    return int(cast(int, client.eval(_REPLAY_SCRIPT, 2, keys.dead, keys.ready, count)))


def purge(client: redis_lib.Redis, keys: Keys) -> int:
    """Delete every key of the queue scope (the operator's finalizer, and tests)."""
    found = list(client.scan_iter(match=_glob_escape(keys.prefix) + "*", count=1000))
    if found:
        client.delete(*found)
    return len(found)


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)
