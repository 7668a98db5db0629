"""Process mode's children: one process per task at once, each running the function alone.

The pod (the worker process) keeps every broker round trip, rate-limit slot, lease and
heartbeat; a child only imports the function by its reference, then runs one payload at a time
sent over its own pipe and answers with a :mod:`sluiceway.procwire` reply. A child can be killed
at any moment (a timeout, ``kill -9``, the out-of-memory killer) and only the task it ran is
affected: the pod starts another in its place.

Children are started with the ``spawn`` method: the pod has threads, and forking a process with
threads can copy a lock some other thread held. So nothing is inherited but what the child
imports itself: the function must be importable by reference, its arguments and a call's value
are JSON (the codec's), and its exceptions travel as type name, text and traceback.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from sluiceway import codec, procwire

START_TIMEOUT = 120.0  # seconds a child may take to import the function (a slow, loaded node)
PARENT_CHECK = 0.5  # seconds between a child's checks that its pod is still alive


class ChildGone(Exception):  # noqa: N818
    """The child died (or its pipe broke) before it answered."""


class ChildTimedOut(Exception):  # noqa: N818
    """The child did not answer within the timeout; it has been killed."""


class ChildStartError(Exception):
    """A child could not start: the function does not import there, or it never said ready."""


def _child_main(conn: Connection, function_ref: str, parent_pid: int) -> None:
    # Signals are the pod's to handle: it drains, then ends its children. A Ctrl-C sent to the
    # whole process group must not kill tasks the pod is still waiting for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    from sluiceway.loading import load_function

    try:
        fn = load_function(function_ref)
    except ImportError as exc:
        conn.send_bytes(procwire.error_reply(exc))
        return
    conn.send_bytes(procwire.READY)
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the pod closed the pipe, or died
        try:
            msg = codec.decode(payload)
            value = fn(**msg.kwargs)
            reply = procwire.ok_reply(value, keep_value=msg.meta.reply is not None)
        except BaseException as exc:  # as in thread mode: a SystemExit is the task's failure
            reply = procwire.error_reply(exc)
        conn.send_bytes(reply)


def _exit_with_parent(parent_pid: int) -> None:
    # A pod killed with -9 cannot end its children; a CPU-bound task would not notice the closed
    # pipe until it finished. This thread gets the GIL between the task's bytecodes.
    while True:
        time.sleep(PARENT_CHECK)
        if os.getppid() != parent_pid:
            os._exit(1)


class Child:
    """One child process and the pod's end of its pipe. Used by one executor thread at a time."""

    def __init__(self, function_ref: str, index: int) -> None:
        self.function_ref = function_ref
        self.index = index
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the process; :meth:`wait_ready` waits for it to import the function."""
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_child_main,
            args=(theirs, self.function_ref, os.getpid()),
            name=f"sluiceway-child-{self.index}",
            daemon=True,
        )
        proc.start()
        theirs.close()  # ours alone now: a dead child reads as EOF
        with self._lock:
            self.process, self.conn = proc, ours

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        conn, proc = self.conn, self.process  # the pod may close this child meanwhile
        if conn is None or proc is None:
            raise ChildStartError("the child process was closed while starting")
        try:
            if not conn.poll(timeout):
                self.kill()
                raise ChildStartError(f"child process did not start within {timeout:.0f} s")
            first = conn.recv_bytes()
        except (EOFError, OSError):
            raise ChildStartError(
                f"child process exited while starting (exit code {proc.exitcode})"
            ) from None
        if first != procwire.READY:
            self.kill()
            _, error = procwire.parse_reply(first)
            raise ChildStartError(str(error) or "child process could not import the function")

    def alive(self) -> bool:
        proc = self.process  # read once: the drain may clear it meanwhile
        return proc is not None and proc.is_alive()

    @property
    def pid(self) -> int | None:
        proc = self.process
        return proc.pid if proc is not None else None

    def run(self, payload: bytes, timeout: float) -> bytes:
        """Send one payload and wait for the reply; raises :class:`ChildGone` or
        :class:`ChildTimedOut` (after killing the child)."""
        conn, proc = self.conn, self.process
        if conn is None or proc is None:
            raise ChildGone("no child process")
        try:
            conn.send_bytes(payload)
            if not conn.poll(timeout):
                self.kill()
                raise ChildTimedOut(f"no answer within {timeout} s")
            return conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise ChildGone(f"child process {proc.pid} died (exit code {proc.exitcode})") from exc

    def kill(self) -> None:
        """End the process and close the pipe. Only the executor thread that owns this child
        calls it: closing a pipe another thread reads could hand that thread a reused fd."""
        self._end_process()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _end_process(self) -> None:
        with self._lock:  # the drain may end it while its executor replaces it
            proc, self.process = self.process, None
        if proc is not None:
            with contextlib.suppress(OSError):  # it died meanwhile
                proc.kill()
            proc.join(5)

    def restart(self) -> None:
        """Kill what is left of this child and start a fresh one in its place."""
        self.kill()
        if self.closed:
            return
        self.start()
        if self.closed:  # closed while it started: it must not outlive the pod's drain
            self.kill()
            return
        self.wait_ready()

    def close(self) -> None:
        """End the child for good, from any thread. Killed, not asked: the pod closes its
        children only once nothing runs there that it still waits for. The pipe stays open for
        the executor that may be reading it, which then sees the child's end close (EOF)."""
        self.closed = True
        self._end_process()


class ChildPool:
    """``size`` children, started together; each executor thread claims one for good."""

    def __init__(self, function_ref: str, size: int) -> None:
        self.children = [Child(function_ref, i) for i in range(size)]
        self._free = list(reversed(self.children))
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start every child at once and wait until each has imported the function."""
        try:
            for child in self.children:
                child.start()
            for child in self.children:
                child.wait_ready()
        except BaseException:
            self.close()
            raise

    def claim(self) -> Child:
        with self._lock:
            return self._free.pop()

    def pids(self) -> list[int]:
        return [p for p in (c.pid for c in self.children) if p is not None]

    def close(self) -> None:
        for child in self.children:
            child.close()
