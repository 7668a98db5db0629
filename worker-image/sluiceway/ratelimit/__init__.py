"""The fleet rate limiter: GCRA with leased future slots, on the Redis server's clock.

- :mod:`sluiceway.ratelimit.gcra` is the pure model (no clock, no I/O), re-exported here.
- :mod:`sluiceway.ratelimit.redis` runs the same arithmetic atomically in Lua
  (``lua/acquire.lua``, ``lua/release.lua``; the Redis transport's ``lua/fetch.lua`` fuses it with
  taking messages). ``tests/test_ratelimit_redis.py`` checks the Lua against the model on a real
  Redis.

Every broker uses it: a worker on RabbitMQ or Kafka takes its slots here before it fetches.
"""

from sluiceway.ratelimit.gcra import MICROS, Grant, grant, interval_us, max_in_window, release, slot_times

__all__ = ["MICROS", "Grant", "grant", "interval_us", "max_in_window", "release", "slot_times"]
