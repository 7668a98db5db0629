"""The finish rate a worker's heartbeat reports: pure, no clock of its own.

The rate was once the number of duration samples in the last 10 s over 10 s, from a window that
keeps at most 4,096 samples for the latency quantiles, so no worker could report more than
409.6 tasks/s; the operator sums these rates into the fleet's throughput. A count of finishes,
read at each heartbeat, has no such ceiling and costs nothing per task.
"""

from __future__ import annotations

from collections import deque
from typing import Final

WINDOW: Final = 10.0  # seconds of finishes the rate is taken over, as the latency window


class RateMeter:
    """Finishes per second over about the last :data:`WINDOW` seconds, from a running count
    read at each heartbeat (``rate(now, count)``)."""

    def __init__(self, started: float) -> None:
        self.marks: deque[tuple[float, int]] = deque([(started, 0)])

    def rate(self, now: float, count: int) -> float:
        marks = self.marks
        # The base is the newest mark at least WINDOW old, else the oldest (a young worker).
        while len(marks) > 1 and marks[1][0] <= now - WINDOW:
            marks.popleft()
        since, base = marks[0]
        marks.append((now, count))
        return (count - base) / max(now - since, 0.001)
