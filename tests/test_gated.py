"""transports/gated.py's single-slot acquire (a re-slot), with a stand-in limiter: a slot is
granted or not, whatever its reply's timing."""

from __future__ import annotations

import time
from typing import Any, cast

from sluiceway.ratelimit.redis import RedisLimiter, Slots
from sluiceway.transports.base import SlotLease, Transport
from sluiceway.transports.gated import Gated


class _Limiter:
    limited = True

    def __init__(self, slots: Slots) -> None:
        self.slots = slots

    def acquire(self, wanted: int) -> Slots:
        return self.slots

    def release(self, lease: Any, count: int) -> bool:
        return False


class _Transport:
    outage_errors: tuple[type[BaseException], ...] = ()


def _gated(slots: Slots) -> Gated:
    return Gated(cast(Transport, _Transport()), cast(RedisLimiter, _Limiter(slots)), limiter_errors=())


def test_a_slot_that_passed_while_its_reply_waited_is_still_granted() -> None:
    """The grant is dated 50 ms ago (its reply waited to be read): the slot starts at once. A
    negative figure would read as "none granted", and the worker would take another slot."""
    late = Slots(1, 0.0, 1000.0, 0.0, SlotLease("1", 1000.0), granted=time.monotonic() - 0.05)
    assert _gated(late).acquire_slot() == 0.0


def test_a_slot_ahead_counts_from_its_grant() -> None:
    ahead = Slots(1, 30_000.0, 1000.0, 0.0, SlotLease("1", 1000.0), granted=time.monotonic() - 0.01)
    assert 0.0 < _gated(ahead).acquire_slot() <= 0.02


def test_none_granted_reads_as_the_wait() -> None:
    none = Slots(0, 50_000.0, 1000.0, 20_000.0, None, granted=time.monotonic())
    assert _gated(none).acquire_slot() == -0.02
