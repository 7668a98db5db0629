"""Counting starts that tasks timestamp themselves.

The rate limit bounds when the worker *starts* a task; the test tasks read the clock as their
first statement, which comes after the start, and later still on a loaded 2-core machine (the GIL
handed to a woken thread, a descheduled process). If every recorded time lags its true start by at
most ``RECORD_LAG``, the recorded starts inside any window of ``1 s - RECORD_LAG`` were truly
started inside one 1-s window, so the documented bound applies to them exactly.
"""

from __future__ import annotations

import dataclasses
import math

from sluiceway.ratelimit import max_in_window
from sluiceway.settings import WorkerSettings

RECORD_LAG = 0.05  # seconds a task's own timestamp may trail the worker's start of it


def worst_window(starts: list[float], window: float = 1.0) -> int:
    """The most recorded starts in any window that maps inside one true ``window``-second window."""
    return max_in_window(starts, window - RECORD_LAG)


def _default_slot_tolerance() -> float:
    tolerance = {f.name: f.default for f in dataclasses.fields(WorkerSettings)}["qps_slot_tolerance"]
    assert isinstance(tolerance, float)
    return tolerance


def start_bound(qps: float, burst: int = 0, slot_tolerance: float | None = None) -> int:
    """Most task starts any 1-second window may hold fleet-wide (docs/worker.md, "Fleet-wide QPS").

    ``qps + burst``, plus 1 for a start at a window's edge, plus the starts a worker may make up to
    ``slot_tolerance`` (by default the worker's own default) after their slots. Compare it with
    :func:`worst_window`, not with the recorded count.
    """
    if slot_tolerance is None:
        slot_tolerance = _default_slot_tolerance()
    return math.floor(qps) + burst + 1 + math.floor(qps * slot_tolerance)
