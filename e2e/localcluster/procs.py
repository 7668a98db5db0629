"""Process bookkeeping: every process the harness starts is a process-group leader, recorded in a
pid file in its run directory, and killed as a group on teardown.

The pid file lets a later run reap what a hard-killed earlier run (SIGKILL, OOM, a CI timeout)
left behind: a run whose owner pid is gone is swept before a new cluster starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ClusterError(RuntimeError):
    """A control-plane failure whose message says what to do about it."""


# Ports below the kernel's ephemeral range, for servers the harness starts. A port that bind(0)
# hands out is an ephemeral one, and while a test has its server stopped (a broker restart), any
# outgoing connection on the machine may be given that port as its local end, the server's own
# reconnecting clients included (a TCP self-connect to a port nobody listens on); the restart then
# fails with EADDRINUSE (seen: RabbitMQ, in a cold CI run).
_LOWEST_PORT = 10000
_EPHEMERAL_FALLBACK = (32768, 60999)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_FALLBACK


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports outside the ephemeral range, where it leaves room.

    Each is held bound until all are chosen, so none is handed out twice. Random, so parallel test
    sessions rarely try the same one; a taken one is skipped.
    """
    low, _ = _ephemeral_range()
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            port = random.randrange(_LOWEST_PORT, low) if low - _LOWEST_PORT >= 1000 else 0
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _proc_start_time(pid: int) -> str | None:
    # Field 22 of /proc/PID/stat identifies a pid incarnation, so a recycled pid is never mistaken
    # for one of ours.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits to be reaped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds while only zombies remain; look for a live member.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class Registry:
    """The pid file of one run directory, and its ledger.

    ``pids.json`` lists what is running now (entries leave when stopped), so a later run can kill
    what a killed run left. ``started.jsonl`` is append-only: every process this registry ever
    started, with its process group and start time, so a run can check afterwards that none of its
    processes outlived it, by identity and never by command line.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "pids.json"
        self.ledger = run_dir / "started.jsonl"
        self._lock = threading.Lock()
        self._entries: dict[int, dict[str, object]] = {}
        self._owner = {"pid": os.getpid(), "start": _proc_start_time(os.getpid())}
        self._flush()

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"owner": self._owner, "groups": list(self._entries.values())}))
        tmp.replace(self.path)

    def add(self, pid: int, name: str, *, group: bool = True) -> None:
        """Record ``pid``; ``group``: it leads its own process group, which is killed as a whole."""
        entry: dict[str, object] = {
            "pid": pid,
            "pgid": pid if group else None,
            "name": name,
            "start": _proc_start_time(pid),
        }
        with self._lock:
            self._entries[pid] = entry
            self._flush()
            with self.ledger.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def remove(self, pid: int) -> None:
        with self._lock:
            self._entries.pop(pid, None)
            self._flush()

    def set_owner(self, pid: int) -> None:
        with self._lock:
            self._owner = {"pid": pid, "start": _proc_start_time(pid)}
            self._flush()


def _entry_pid(entry: Mapping[str, object]) -> int:
    # Older pid files have only "pgid": every entry was a group leader then.
    return int(str(entry.get("pid") or entry.get("pgid")))


def _kill_entry(entry: Mapping[str, object], sig: int) -> bool:
    """Signal an entry's group (or lone process) if the pid is still that incarnation."""
    pid = _entry_pid(entry)
    if _proc_start_time(pid) != entry.get("start"):
        return False
    if entry.get("pgid") is not None:
        kill_group(int(str(entry["pgid"])), sig)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return True


def sweep_run(run_dir: Path, log: Callable[[str], None]) -> bool:
    """Kill the process groups of ``run_dir`` if the run's owner died. True if it was stale."""
    pidfile = run_dir / "pids.json"
    try:
        data = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return False
    owner = data.get("owner", {})
    owner_pid = int(owner.get("pid") or 0)
    # A SIGKILLed owner can linger as a zombie when nothing reaps it: that is dead too.
    if owner_pid and _proc_start_time(owner_pid) == owner.get("start") and pid_alive(owner_pid):
        return False
    killed = []
    for entry in data.get("groups", []):
        if _kill_entry(entry, signal.SIGKILL):
            log(f"killing leftover {entry.get('name')} (pid {_entry_pid(entry)}) of a dead run in {run_dir}")
            killed.append(_entry_pid(entry))
    # A starter killed between starting a process and recording it (the test kubelet records a
    # pod's pid after Popen returns) leaves one no pid file names; pods run in a directory of the
    # run, so what still works there once the recorded ones are gone is such a process (a demo's
    # worker outlived the next run's sweep so, once, in CI).
    gone_by = time.monotonic() + 5.0
    while any(pid_alive(pid) for pid in killed) and time.monotonic() < gone_by:
        time.sleep(0.02)
    for pid in _working_in(run_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            log(f"killing leftover pid {pid}, not recorded, working in {run_dir}")
    return True


def _working_in(run_dir: Path) -> list[int]:
    """Live pids (not this one) whose working directory is ``run_dir`` or below it."""
    root = os.path.realpath(run_dir)
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        pid = int(proc.name)
        if (cwd == root or cwd.startswith(root + os.sep)) and pid != os.getpid() and pid_alive(pid):
            found.append(pid)
    return found


def sweep_stale(root: Path, log: Callable[[str], None]) -> None:
    """Kill the processes of runs under ``root`` whose owner died, and remove those runs.

    A run is a directory directly under ``root``; its pid files sit in it or one level deeper
    (the cluster demo keeps its own beside the cluster's ``<run>/cluster/pids.json``).
    """
    if not root.is_dir():
        return
    for run in sorted(d for d in root.iterdir() if d.is_dir()):
        pidfiles = [run / "pids.json", *sorted(run.glob("*/pids.json"))]
        stale = [sweep_run(f.parent, log) for f in pidfiles if f.is_file()]
        if stale and all(stale):
            shutil.rmtree(run, ignore_errors=True)


def started_processes(run_dir: Path) -> list[dict[str, object]]:
    """Every process the registries in ``run_dir`` (or one level below) ever started."""
    out: list[dict[str, object]] = []
    for ledger in [run_dir / "started.jsonl", *sorted(run_dir.glob("*/started.jsonl"))]:
        with contextlib.suppress(OSError):
            out.extend(json.loads(line) for line in ledger.read_text().splitlines() if line.strip())
    return out


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def survivors(started: Sequence[Mapping[str, object]]) -> list[int]:
    """Live pids among ``started`` and in their process groups: what outlived its run.

    A process counts when it is the same incarnation as a recorded pid (start time), or when it is
    in a recorded process group and started no earlier than that group's leader did (Linux does
    not reuse a pid while a group of that number exists, so such a process is the group's own).
    """
    own: dict[int, int] = {}  # pid -> start ticks
    groups: dict[int, int] = {}  # pgid -> leader start ticks
    for e in started:
        start = e.get("start")
        if start is None:
            continue
        own[_entry_pid(e)] = int(str(start))
        if e.get("pgid") is not None:
            groups[int(str(e["pgid"]))] = int(str(start))
    found: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        pgid, start = int(fields[2]), int(fields[19])
        if own.get(pid) == start or (pgid in groups and start >= groups[pgid]):
            found.append(pid)
    return sorted(found)


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        registry: Registry,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.registry = registry
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        registry.add(self.proc.pid, name)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        pgid = self.proc.pid
        if self.alive() or group_alive(pgid):
            kill_group(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        # Children that outlived the leader (or ignored SIGTERM) go too.
        kill_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.registry.remove(pgid)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    watch: Sequence[ManagedProcess] = (),
    interval: float = 0.1,
) -> None:
    """Poll ``check``; fail at once, with the log tail, if a process in ``watch`` dies meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for p in watch:
            if not p.alive():
                raise ClusterError(
                    f"{p.name} exited with code {p.proc.returncode} while waiting for {what}. "
                    f"Last lines of {p.log_path}:\n{_indent(p.log_tail())}"
                )
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
