"""Run a command on its own pseudo-terminal, as if typed in a terminal window: output that checks
``isatty()`` behaves as for a user, and Ctrl-C reaches the whole foreground process group at once
(in a pipeline, every command of it)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import signal
import struct
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


class PtyProcess:
    """A command on its own pseudo-terminal, as if typed in a terminal window."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: session leader, the pty is its controlling terminal
            try:
                os.chdir(cwd)
                os.execve(argv[0], list(argv), dict(env))
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        # A wide window, so the live view and long lines are not wrapped mid-word.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.status: int | None = None
        self._out = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not chunk:
                return
            with self._lock:
                self._out += chunk

    @property
    def output(self) -> str:
        """Everything written so far, escape sequences included."""
        with self._lock:
            return self._out.decode(errors="replace")

    @property
    def text(self) -> str:
        """What a reader sees: the output without colours and cursor movements."""
        return _ESCAPE.sub("", self.output)

    def wait_for(self, check: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.poll() is not None:
                raise AssertionError(f"exited ({self.status}) before {what}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output[-3000:]}")
            time.sleep(0.2)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")  # the terminal turns it into SIGINT for the foreground group

    def poll(self) -> int | None:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout:.0f} s:\n{self.output[-3000:]}")
            time.sleep(0.2)
        assert self.status is not None
        return self.status

    def close(self) -> None:
        # The terminal's whole foreground group (bash, the demo, tee), as closing the window would.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.poll() is None:
            self.wait(10)
        os.close(self.fd)
