"""Counting starts that tasks timestamp themselves.

The rate limit bounds when the worker *starts* a task; the test tasks read the clock as their
first statement, which comes after the start, and later still on a loaded 2-core machine (the GIL
handed to a woken thread, a descheduled process). If every recorded time lags its true start by at
most ``RECORD_LAG``, the recorded starts inside any window of ``1 s - RECORD_LAG`` were truly
started inside one 1-s window, so the documented bound applies to them exactly.
"""

from __future__ import annotations

from sluiceway.ratelimit import max_in_window

RECORD_LAG = 0.05  # seconds a task's own timestamp may trail the worker's start of it


def worst_window(starts: list[float], window: float = 1.0) -> int:
    """The most recorded starts in any window that maps inside one true ``window``-second window."""
    return max_in_window(starts, window - RECORD_LAG)
