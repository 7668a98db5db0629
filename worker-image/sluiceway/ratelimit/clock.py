"""Where the rate limiter's clock (Redis ``TIME``) stands on this process's monotonic clock.

Slots are dated on the server's clock. A worker that dates them from when it *read* the reply
starts every slot of that reply late by however long the reply waited: in the network, in the
socket buffer while the thread was descheduled or held off the GIL, behind a send-ahead. Workers
late by different amounts bunch their starts, and a 1-second window then holds more than the
limit allows. A round trip instead bounds the offset between the clocks: the server read its
clock after the request left and before the reply came back, so

    server - received  <=  server clock - local clock  <=  server - sent

and every round trip tightens that interval; one answered quickly is enough to pin the offset to
within its duration, however slow the others are. (NTP's bound, without its statistics: a worker
makes hundreds of round trips a minute.) Old bounds widen by the most the two clocks may drift
apart since, so a stepped clock or a slewing one cannot leave a stale, too-tight interval behind:
bounds that no longer overlap start again from the newest round trip.

Slots are placed at the *latest* local time they may stand for, never early, so the one-sided
error left is the interval's width: the best round trip, well under a millisecond inside a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# The most two clocks are assumed to drift apart, in seconds per second: NTP keeps hosts within
# tens of parts per million, and its slewing runs at most 500 ppm.
DRIFT: Final = 500e-6


@dataclass(slots=True)
class ServerClock:
    """Bounds on ``server clock - local clock`` (seconds), as of local time ``at``."""

    low: float = 0.0
    high: float = 0.0
    at: float | None = None  # None until the first round trip

    def observe(self, sent: float, received: float, server: float) -> None:
        """One round trip: sent and received on the local clock, the server's clock in between."""
        # As of `received`: the server read its clock up to one round trip before, and the
        # clocks may have drifted apart by that much since.
        slack = DRIFT * (received - sent)
        low, high = server - received - slack, server - sent + slack
        if self.at is not None:
            age = max(0.0, received - self.at)
            aged_low, aged_high = self.low - DRIFT * age, self.high + DRIFT * age
            if aged_low <= high and low <= aged_high:  # the bounds still overlap: intersect
                low, high = max(low, aged_low), min(high, aged_high)
        self.low, self.high, self.at = low, high, received

    def local(self, server: float, now: float) -> float:
        """The latest local time that the server time ``server`` may be, as known at ``now``.

        Before any round trip there is nothing to go by: the caller must have observed one."""
        assert self.at is not None, "observe a round trip first"
        # Aged to when the time comes (a slot ahead of now), not just to now: the clocks drift on.
        when = max(now, server - self.low)
        return server - (self.low - DRIFT * max(0.0, when - self.at))

    def width(self, now: float) -> float:
        """How far the true local time of a server time may lie before :meth:`local`'s."""
        assert self.at is not None, "observe a round trip first"
        return self.high - self.low + 2 * DRIFT * max(0.0, now - self.at)
