"""Task functions the tests run inside real worker processes.

Each records what happened in Redis (``TEST_RECORD_URL``), so a test can check that every message
was processed, how often, and when each task started.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import redis

import sluiceway

_client: redis.Redis | None = None


_client_lock = threading.Lock()


def _r() -> redis.Redis:
    global _client
    # Locked: two threads that each built a client would drop one, and its pool closes sockets
    # the other thread is using ("Bad file descriptor").
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(os.environ["TEST_RECORD_URL"])
        return _client


def record_start(prefix: str, n: int, *, pid: bool = False) -> None:
    """Record a start: its time in ``{prefix}:starts``, a count in ``{prefix}:seen`` and, with
    ``pid``, the worker process in ``{prefix}:by``. One round trip, before the work."""
    pipe = _r().pipeline(transaction=False)
    pipe.rpush(f"{prefix}:starts", f"{time.time():.6f}")
    pipe.hincrby(f"{prefix}:seen", str(n), 1)
    if pid:
        pipe.hset(f"{prefix}:by", str(n), os.getpid())
    pipe.execute()


def record_done(prefix: str, n: int) -> None:
    _r().hincrby(f"{prefix}:done", str(n), 1)


def spin(seconds: float) -> None:
    """Work for ``seconds`` in short Python-level steps: the worker's injected timeout can interrupt
    these, while nothing can interrupt one long C-level sleep."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)


def record(n: int, sleep: float = 0.0) -> None:
    """Record the message number and the start time, then work for ``sleep`` seconds."""
    record_start("test", n)
    if sleep:
        time.sleep(sleep)
    record_done("test", n)


def record_traced(n: int, sleep: float = 0.0) -> None:
    """:func:`record`, plus ``"<time> <pod> <n>"`` in ``test:trace``: which pod ran what, when (the
    e2e Kafka burst prints that timeline; HOSTNAME is the pod's name under the test kubelet)."""
    pipe = _r().pipeline(transaction=False)
    now = time.time()
    pipe.rpush("test:starts", f"{now:.6f}")
    pipe.hincrby("test:seen", str(n), 1)
    pipe.rpush("test:trace", f"{now:.3f} {os.environ.get('HOSTNAME', os.getpid())} {n}")
    pipe.execute()
    if sleep:
        time.sleep(sleep)
    record_done("test", n)


async def record_async(n: int, sleep: float = 0.0) -> None:
    record_start("test", n)
    if sleep:
        await asyncio.sleep(sleep)
    record_done("test", n)


def flaky(n: int, fail_times: int = 1) -> None:
    """Fail the first ``fail_times`` attempts of each message, then succeed."""
    attempts = _r().hincrby("test:attempts", str(n), 1)
    if attempts <= fail_times:
        raise RuntimeError(f"planned failure {attempts} of message {n}")
    _r().hincrby("test:done", str(n), 1)


def always_fails(n: int) -> None:
    _r().hincrby("test:attempts", str(n), 1)
    raise ValueError(f"message {n} can never succeed")


def rejects(n: int) -> None:
    raise sluiceway.Reject(f"message {n} is poison")


def hangs(n: int, seconds: float = 3600) -> None:
    """Run far past any timeout, interruptibly (see ``spin``)."""
    _r().hincrby("test:attempts", str(n), 1)
    spin(seconds)


def noop(n: int = 0) -> None:
    return None


def leaves_a_thread(n: int) -> None:
    """Starts a non-daemon thread that never ends, as a client library may, then succeeds (a
    thread inherits daemon from its creator, and the executors are daemons: hence the flag)."""
    threading.Thread(target=threading.Event().wait, name=f"left-behind-{n}", daemon=False).start()
    _r().hincrby("test:done", str(n), 1)


async def noop_async(n: int = 0) -> None:
    return None


def misbehave(n: int, mode: str = "ok") -> None:
    """One function, many ways to fail, chosen by the message."""
    started = time.time()
    _r().rpush("test:starts", f"{started:.6f}")
    attempts = _r().hincrby("test:attempts", str(n), 1)
    if mode == "raise":
        raise ValueError(f"message {n} always fails")
    if mode == "hang":
        spin(60)
    if mode == "reject":
        raise sluiceway.Reject(f"message {n} is poison")
    if mode == "flaky" and attempts == 1:
        raise RuntimeError("first attempt fails")
    if mode == "retry_never" and attempts == 1:
        raise sluiceway.RetryLater(float("inf"), "asks for an endless delay")
    _r().hincrby("test:done", str(n), 1)
