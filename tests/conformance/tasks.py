"""Task functions of the conformance suite. Broker-blind: they record on the coordination Redis
(``TEST_RECORD_URL``) what ran, where and when, so a scenario can count lost and duplicate work
on any broker. The recording itself is ``tests.tasks``'s, under the ``c:`` prefix."""

from __future__ import annotations

import time

from tests.tasks import _r, record_done, record_start, spin


def work(n: int, sleep: float = 0.0) -> None:
    """Record the start (time, message, worker process), work ``sleep`` seconds, record done."""
    record_start("c", n, pid=True)
    if sleep:
        time.sleep(sleep)
    record_done("c", n)


def fails(n: int) -> None:
    """Always raises; records each attempt's time, to see the backoff between them."""
    _r().rpush(f"c:attempt:{n}", f"{time.time():.6f}")
    raise ValueError(f"message {n} always fails")


def hangs(n: int) -> None:
    _r().rpush(f"c:attempt:{n}", f"{time.time():.6f}")
    spin(120)
