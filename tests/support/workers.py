"""Start real worker processes (``python -m sluiceway worker``) and collect what they did."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

import sluiceway

REPO = Path(__file__).resolve().parents[2]

# Worker flags for the worker tests: a lapsed lease returns within seconds, heartbeats are frequent.
FAST = ["--lease", "3", "--heartbeat", "0.5"]


def publish(url: str, n: int, start: int = 0, **extra: object) -> None:
    """``n`` messages ``{"n": i, **extra}`` on the queue ``jobs``, numbered from ``start``."""
    pub = sluiceway.Publisher(url)
    pub.publish_batch("jobs", ({"n": i, **extra} for i in range(start, start + n)))
    pub.close()


def counts(r: redis.Redis, key: str) -> dict[int, int]:
    """A hash of message number -> count, as the test tasks record them."""
    return {int(k): int(v) for k, v in r.hgetall(key).items()}


class WorkerProcess:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sluiceway", "worker", *args],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float = 30) -> int:
        """The exit code; a worker still running after ``timeout`` fails the test with its
        threads' stacks (``kill -USR1``, see docs/worker.md) and the end of its log, so the
        failure says what it was waiting on."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)  # faulthandler writes from a signal handler; give it the moment
            tail = "\n".join(self.output().splitlines()[-150:])
            raise AssertionError(
                f"worker {self.pid} still running {timeout:g} s after it was told to stop; "
                f"its stacks and log:\n{tail}"
            ) from None
        finally:
            self._log_file.close()

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def children(pid: int) -> list[int]:
    """A process-mode worker's task children (not multiprocessing's resource tracker), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent's wait()."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Test task functions live in tests/; the real image would have the user's code installed.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SLUICEWAY_REDIS_URL"] = redis_url
    env["SLUICEWAY_LOG_FORMAT"] = "json"
    env["SLUICEWAY_METRICS_PORT"] = "0"
    env.update(extra)
    return env


def wait_for(predicate: object, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def wait_for_async(predicate: Callable[[], object], timeout: float, what: str = "condition") -> None:  # noqa: ASYNC109
    """``wait_for`` for async tests: it yields to the event loop between polls, so the client's
    own background tasks (result listeners, unlinkers) run while the test waits on them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


SpawnWorker = Callable[..., WorkerProcess]
