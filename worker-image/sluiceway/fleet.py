"""Read and repair a queue's state in Redis: what the operator, the CLI and the demo observe.

These are the only functions outside the worker that touch the queue's keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis as redis_lib

from sluiceway.contract import Heartbeat, Keys
from sluiceway.coordination import redis as coordination
from sluiceway.transports.redis import reap


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int  # due now: fresh messages plus redelivered ones
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
-- KEYS: 1 ready  2 delayed  3 dead  4 stats  5 redelivered  6.. inflight(worker), every lease holder
local inflight = 0
for i = 6, #KEYS do inflight = inflight + redis.call('ZCARD', KEYS[i]) end
local s = redis.call('HMGET', KEYS[4], 'acked', 'retried', 'dead', 'reaped')
return {redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[5]), redis.call('ZCARD', KEYS[2]), inflight,
        redis.call('LLEN', KEYS[3]),
        tonumber(s[1] or '0'), tonumber(s[2] or '0'), tonumber(s[3] or '0'), tonumber(s[4] or '0')}
"""


def queue_stats(client: redis_lib.Redis, keys: Keys) -> QueueStats:
    """Depth, in-flight and counters, consistent with each other, in two round trips: the lease
    holders, then one script told every key it reads (so it runs on a Redis Cluster too)."""
    holders = sorted(_text(w) for w in client.smembers(keys.leased_workers))
    r = client.eval(
        _STATS_SCRIPT,
        5 + len(holders),
        keys.ready,
        keys.delayed,
        keys.dead,
        keys.stats,
        keys.redelivered,
        *(keys.inflight(w) for w in holders),
    )
    return QueueStats(*(int(x) for x in cast(list[Any], r)))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def heartbeats(client: redis_lib.Redis, keys: Keys) -> list[Heartbeat]:
    """Live workers' latest heartbeats (expired ones are gone by TTL)."""
    return coordination.heartbeats(client, keys)


def requeue_worker(client: redis_lib.Redis, keys: Keys, worker_id: str) -> int:
    """Return every lease of a worker that is gone (its pod was deleted) to the queue at once."""
    n = reap(client, keys, worker_id=worker_id, force=True)
    coordination.forget(client, keys, worker_id)
    return n


def orphaned_workers(client: redis_lib.Redis, keys: Keys, known: set[str]) -> list[str]:
    """Workers that hold leases, are not in ``known`` (live pods), and have no live heartbeat.

    Both tests are needed: ``known`` may lag behind the cluster (a watch just starting), and a
    heartbeat may lapse in a Redis hiccup; a worker is only an orphan when it fails both.
    """
    holders = [_text(w) for w in client.smembers(keys.leased_workers)]
    candidates = [w for w in holders if w not in known]
    if not candidates:
        return []
    alive = coordination.has_heartbeat(client, keys, candidates)
    return [w for w, live in zip(candidates, alive, strict=True) if not live]


def dead_letters(client: redis_lib.Redis, keys: Keys, limit: int = 100) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(keys.dead, 0, limit - 1)]


# The payload goes back byte for byte: as text, or decoded from base64 (see sluiceway.deadletter).
_REPLAY_SCRIPT = """
local value = {}
local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
for i = 1, 64 do value[string.byte(alphabet, i)] = i - 1 end
local function unbase64(s)
  local out, acc, bits = {}, 0, 0
  for i = 1, #s do
    local v = value[string.byte(s, i)]
    if v then
      acc = acc * 64 + v
      bits = bits + 6
      if bits >= 8 then
        bits = bits - 8
        local byte = math.floor(acc / 2 ^ bits)
        out[#out + 1] = string.char(byte)
        acc = acc - byte * 2 ^ bits
      end
    end
  end
  return table.concat(out)
end
local moved = 0
for i = 1, tonumber(ARGV[1]) do
  local entry = redis.call('RPOP', KEYS[1])
  if not entry then break end
  local record = cjson.decode(entry)
  local payload = record['payload']
  if type(record['payload_b64']) == 'string' then payload = unbase64(record['payload_b64']) end
  redis.call('LPUSH', KEYS[2], payload)
  moved = moved + 1
end
return moved
"""


def replay_dead_letters(client: redis_lib.Redis, keys: Keys, count: int) -> int:
    """Move up to ``count`` dead-lettered messages back to the queue, oldest first, atomically."""
    if count <= 0:
        return 0
    return int(cast(int, client.eval(_REPLAY_SCRIPT, 2, keys.dead, keys.ready, count)))


def purge(client: redis_lib.Redis, keys: Keys) -> int:
    """Delete every key of the queue scope (the operator's finalizer, and tests)."""
    found = list(client.scan_iter(match=_glob_escape(keys.prefix) + "*", count=1000))
    if found:
        client.delete(*found)
    return len(found)


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)
