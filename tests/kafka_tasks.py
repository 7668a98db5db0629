"""Task functions for the Kafka ordering tests, run inside real worker processes (pods).

``ordered`` records, per key, each run's sequence number, start and end time and process, so a
test can check that one key's messages ran one at a time in publish (= offset) order.
"""

from __future__ import annotations

import os
import time

from tests.tasks import _r


def ordered(key: str, seq: int, sleep: float = 0.0) -> None:
    started = time.time()
    if sleep:
        time.sleep(sleep)
    ended = time.time()
    pipe = _r().pipeline(transaction=False)
    pipe.rpush(f"test:order:{key}", f"{seq} {started:.6f} {ended:.6f} {os.getpid()}")
    pipe.hincrby("test:done", f"{key}/{seq}", 1)
    pipe.execute()
