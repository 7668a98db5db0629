"""The fleet rate limiter on Redis: slots without a queue, for transports that fetch after the
slots are granted (RabbitMQ, Kafka), and for the single-slot re-slot of any worker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sluiceway.ratelimit.clock import ServerClock
from sluiceway.transports.base import SlotLease


@dataclass(frozen=True, slots=True)
class Slots:
    """One acquire's grant, on the server's clock at the moment it ran."""

    count: int
    first_offset_us: float  # slot i starts at first_offset_us + i * interval_us (negative: now)
    interval_us: float
    retry_after_us: float  # when nothing was granted: until a slot falls inside the horizon
    lease: SlotLease | None  # hands unused slots back; None when nothing was granted
    granted: float  # the grant's moment on the local monotonic clock (see ratelimit.clock)

    def start_after(self, i: int) -> float:
        """Seconds after the grant until slot ``i`` starts (0 when it may start now)."""
        offset = self.first_offset_us + i * self.interval_us
        return offset / 1e6 if offset > 0 else 0.0


class RedisLimiter:
    """GCRA on one ``ratelimit`` key: ``qps`` slots a second, ``burst`` extra after idle, and no
    slot granted further ahead than ``horizon_seconds``."""

    def __init__(
        self, client: Any, key: str, *, qps: float, burst: int = 0, horizon_seconds: float = 0.1
    ) -> None:
        from sluiceway.scripts import source

        self.key = key
        self.qps = qps
        self.burst = burst
        self.horizon_us = int(horizon_seconds * 1_000_000)
        self._acquire = client.register_script(source("acquire"))
        self._release = client.register_script(source("release"))
        self.clock = ServerClock()

    @property
    def limited(self) -> bool:
        return self.qps > 0

    def acquire(self, wanted: int) -> Slots:
        sent = time.monotonic()
        count, first, step, retry_after, tat, server_us = self._acquire(
            keys=[self.key], args=[self.qps, self.burst, self.horizon_us, wanted]
        )
        received = time.monotonic()
        server = float(server_us) / 1e6
        self.clock.observe(sent, received, server)
        n = int(count)
        lease = SlotLease(tat.decode() if isinstance(tat, bytes) else str(tat), float(step)) if n else None
        return Slots(
            n, float(first), float(step), float(retry_after), lease, self.clock.local(server, received)
        )

    def release(self, lease: SlotLease | None, count: int) -> bool:
        """Hand back the last ``count`` slots of ``lease``; False when a later lease exists."""
        if lease is None or count <= 0:
            return False
        return bool(int(self._release(keys=[self.key], args=[lease.tat, lease.interval_us, count])))
