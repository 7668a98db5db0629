"""Task functions for the process-mode tests (tests/test_process_mode.py): each records the pid of
the child process that ran it, so a test can tell children apart and kill one."""

from __future__ import annotations

import os
import signal
import time

from tests.tasks import _r


def record_pid(n: int, sleep: float = 0.0) -> None:
    """Record the message, its start and this child's pid, then sleep."""
    started = time.time()
    pipe = _r().pipeline(transaction=False)
    pipe.rpush("test:starts", f"{started:.6f}")
    pipe.hincrby("test:seen", str(n), 1)
    pipe.hset("test:pid", str(n), os.getpid())
    pipe.sadd("test:pids", os.getpid())
    pipe.execute()
    if sleep:
        time.sleep(sleep)
    _r().hincrby("test:done", str(n), 1)


def spin(n: int, seconds: float = 3600.0) -> None:
    """Pure Python, CPU-bound, never releasing the GIL on purpose: only killing the process stops
    it before ``seconds``."""
    _r().hset("test:pid", str(n), os.getpid())
    deadline = time.monotonic() + seconds
    x = 0
    while time.monotonic() < deadline:
        x += 1
    _r().hincrby("test:done", str(n), 1)


def die(n: int) -> None:
    """Kill this child outright, as the out-of-memory killer would."""
    _r().hincrby("test:attempts", str(n), 1)
    os.kill(os.getpid(), signal.SIGKILL)


def where() -> int:
    """The pid that ran the call."""
    return os.getpid()
