"""What every test server (Redis, Kafka) shares: a private directory, free ports, and a stop that
never leaves the child running.

A subclass starts its child in :meth:`ServerProcess.start` (setting ``self.proc``, then waiting
until it serves) and says how it stops: ``stop_grace`` seconds after SIGTERM before SIGKILL, and
whether the signals go to the child's process group (``own_group``: the child was started with
``start_new_session=True`` and may have children of its own, as a JVM launcher can).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# The one owner of how the harness picks ports (outside the ephemeral range: see there).
from localcluster.procs import free_port as free_port
from localcluster.procs import free_ports as free_ports


class ServerProcess:
    """A server child owned by one test session (or one test), in its own temporary directory."""

    stop_grace: float = 10.0
    own_group: bool = False

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        """Start the server again if a previous test stopped, restarted badly or killed it."""
        if not self.running:
            self.start()

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``stop_grace`` seconds, or at once if ``kill``."""
        if self.proc and self.proc.poll() is None:
            self._signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop and start again on the same ports and storage."""
        self.stop()
        time.sleep(down_for)  # the outage itself is what a restart test measures
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
