"""Coordination, on Redis for every broker: heartbeats, liveness, in-flight counts, the worker
registry.

- :class:`sluiceway.coordination.base.Coordinator` is what a worker writes (its heartbeat, and
  removing it on a clean exit); :mod:`sluiceway.coordination.redis` is its one implementation.
- Readers (the operator's backlog sources, the CLI) use :func:`sluiceway.coordination.redis.heartbeats`
  and :func:`sluiceway.coordination.base.in_flight`: the in-flight count of a queue comes from the
  heartbeats, whatever the broker, because only the workers know what they hold.

The key scheme is :class:`sluiceway.contract.Keys` (``workers``, ``heartbeat(worker)``).
"""
