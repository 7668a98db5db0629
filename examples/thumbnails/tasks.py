"""The example task of ``examples/taskqueue.yaml`` (and of ``make demo``): make a thumbnail.

It stands in for real work (a tenth of a second per image) and shows the two ways a task fails:
``sluiceway.Reject`` dead-letters the message at once with its reason; any other exception is
retried with backoff and dead-lettered after ``spec.retry.maxAttempts``.
"""

from __future__ import annotations

import time

import sluiceway

WORK_SECONDS = 0.1


def make_thumbnail(path: str, size: int = 128) -> None:
    if not path.endswith(".png"):
        raise sluiceway.Reject(f"{path} is not a PNG")
    if size <= 0 or size > 4096:
        raise sluiceway.Reject(f"size {size} is out of range 1-4096")
    time.sleep(WORK_SECONDS)  # decode, resize and upload would happen here
