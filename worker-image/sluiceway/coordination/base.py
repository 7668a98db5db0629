"""What a worker tells the fleet about itself, and pure readings of it. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from sluiceway.contract import Heartbeat


class Coordinator(Protocol):
    outage_errors: tuple[type[BaseException], ...]

    def write_heartbeat(self, heartbeat: Heartbeat, ttl_seconds: float) -> None:
        """Publish this worker's heartbeat; it lapses after ``ttl_seconds`` unless renewed."""
        ...

    def deregister(self) -> None:
        """Remove this worker's heartbeat on a clean exit."""
        ...

    def close(self) -> None: ...


def in_flight(beats: Iterable[Heartbeat]) -> int:
    """Messages the live workers hold (running plus prefetched), from their heartbeats."""
    return sum(max(0, int(hb.get("in_flight", 0))) for hb in beats)


def alive(hb: Heartbeat, *, now: float, missed_heartbeats: int) -> bool:
    """A heartbeat is live while fewer than ``missed_heartbeats`` intervals passed since it."""
    return now - float(hb["time"]) < missed_heartbeats * float(hb["interval"])
