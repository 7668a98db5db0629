"""The cluster demo (``make demo``) itself: a reduced run finishes drained and at zero, and a normal
exit, a Ctrl-C in a terminal through a pipe (``make demo 2>&1 | tee LOG``) and a killed run all leave
no process behind.

The demo starts its own control plane, Redis and operator, so these tests use no fixtures. The
interrupt tests run the demo in a pseudo-terminal, where Ctrl-C reaches the whole foreground
process group at once, as it does for a user: the ``tee`` of the pipe dies with the demo.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from tests.support.terminal import PtyProcess

from clusterdemo import RUNS_ENV
from localcluster.procs import started_processes, survivors
from support import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

# Without COLUMNS and LINES: pytest-xdist sets them (80 x 24) in its workers, and the demo's
# console would then wrap its lines at 80 columns whatever the terminal's width, splitting the
# "run dir" line the tests read (what failed the demo tests on xdist workers).
_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
    "PYTHONPATH": os.pathsep.join([str(ROOT / "e2e"), str(ROOT)]),
}
DEMO = [sys.executable, "-m", "clusterdemo"]


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a test's demo runs: a runs directory of the test's own. A demo's start
    sweeps every ended run in its directory, which took a test's run from under it while that test
    still read it, when the demo tests shared ``.run/demo`` beside each other (seen in CI)."""
    return {**_ENV, RUNS_ENV: str(tmp_path / "demo-runs")}


def _run_dir(out: str) -> Path:
    m = re.search(r"run dir (\S+)\)", out)
    assert m, out
    path = Path(m.group(1))
    return path if path.is_absolute() else ROOT / path


def _assert_no_strays(started: Sequence[dict[str, object]]) -> None:
    """Nothing the run started (by pid, process group and start time) is alive."""
    assert started, "the run recorded no processes"
    deadline = time.monotonic() + 10
    while (left := survivors(started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {left} of {[e['name'] for e in started]}"


def _pods_started(run_dir: Path) -> bool:
    return any(str(e["name"]).startswith("pod ") for e in started_processes(run_dir))


def test_demo_drains_to_zero_and_leaves_nothing_running(tmp_path: Path) -> None:
    """Also: a user's `tail -F` of the operator log the demo points to names the run directory
    on its command line; it is not the demo's, so it is neither blamed nor killed."""
    proc = subprocess.Popen(
        [*DEMO, "--messages", "300"],
        cwd=ROOT,
        env=demo_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    head = ""
    while "run dir" not in head:
        line = proc.stdout.readline()
        assert line, head
        head += line
    tail = subprocess.Popen(["tail", "-F", str(_run_dir(head) / "operator.log")], stdout=subprocess.DEVNULL)
    try:
        rest, _ = proc.communicate(timeout=240)
        assert tail.poll() is None, "the user's tail was killed"
    finally:
        tail.kill()
        tail.wait()
    out = head + rest
    print(out[-3000:])
    assert proc.returncode == 0, out
    assert "Demo OK" in out
    assert "kubectl get tq -n sluiceway-demo -w" in out and "kubectl describe tq thumbnails" in out
    assert re.search(r"Replicas: 0 -> \d+ .*-> 0 ", out), out
    assert "Cleaned up" in out
    _assert_no_strays(started_processes(_run_dir(out)))


def test_ctrl_c_through_a_pipe_in_a_terminal_tears_everything_down(tmp_path: Path) -> None:
    """``make demo 2>&1 | tee LOG`` and Ctrl-C: tee dies first, so every later write of the demo
    fails; the teardown must not depend on them."""
    log = tmp_path / "demo.log"
    cmd = f"{' '.join(DEMO)} --messages 100000 2>&1 | tee {log}"
    term = PtyProcess(["/bin/bash", "-c", cmd], demo_env(tmp_path), ROOT)
    try:
        term.wait_for(lambda: "run dir" in term.text, 60, "the run directory")
        run_dir = _run_dir(term.text)
        # Mid-burst, with worker pods running: the worst moment to lose the terminal.
        term.wait_for(lambda: re.search(r"workers=[1-9]", term.text), 180, "running workers")
        started = started_processes(run_dir)
        term.ctrl_c()
        term.wait(90)
    finally:
        term.close()
    assert "Published a burst" in log.read_text()
    _assert_no_strays(started_processes(run_dir) or started)


def test_a_killed_run_is_swept_by_the_next_one(tmp_path: Path) -> None:
    """kill -9 of the demo leaves its processes running; the next run finds and ends them, and a
    Ctrl-C during that run's start-up still leaves nothing behind."""
    env = demo_env(tmp_path)
    first = PtyProcess([*DEMO, "--messages", "100000"], env, ROOT)
    try:
        first.wait_for(lambda: "run dir" in first.text, 60, "the run directory")
        run_dir = _run_dir(first.text)
        first.wait_for(lambda: _pods_started(run_dir), 180, "worker pods")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        first.close()
    left = started_processes(run_dir)
    assert survivors(left), "killing the demo should have left its processes running"

    second = PtyProcess([*DEMO, "--messages", "10"], env, ROOT)
    try:
        second.wait_for(lambda: "Starting etcd" in second.text, 60, "the next run's start-up")
        assert "killing leftover" in second.text
        assert not run_dir.exists()
        _assert_no_strays(left)
        second_dir = _run_dir(second.text)
        second.ctrl_c()
        assert second.wait(90) == 130, second.output[-3000:]
    finally:
        second.close()
    assert "Interrupted" in second.text
    _assert_no_strays(started_processes(second_dir))


def test_keep_leaves_the_cluster_up_to_explore_until_ctrl_c(tmp_path: Path) -> None:
    env = demo_env(tmp_path)
    term = PtyProcess([*DEMO, "--messages", "40", "--keep"], env, ROOT)
    try:
        term.wait_for(lambda: "run dir" in term.text, 60, "the run directory")
        run_dir = _run_dir(term.text)
        term.wait_for(lambda: "press Ctrl-C to stop them" in term.text, 240, "the drain and --keep")
        assert "Demo OK" in term.text
        m = re.search(r"export KUBECONFIG=(\S+)", term.text)
        assert m, term.text[-3000:]
        kubectl = re.search(r"(\S+/kubectl) get tq,deploy,pods", term.text)
        assert kubectl, term.text[-3000:]
        # Still there after the drain: the TaskQueue can be inspected with the printed commands.
        got = subprocess.run(
            [kubectl.group(1), "get", "tq", "thumbnails", "-n", "sluiceway-demo", "-o", "name"],
            env={**env, "KUBECONFIG": m.group(1)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.stdout.strip() == "taskqueue.sluiceway.dev/thumbnails", got
        assert survivors(started_processes(run_dir)), "everything is still running"
        term.ctrl_c()
        assert term.wait(90) == 130, term.text[-3000:]
    finally:
        term.close()
    _assert_no_strays(started_processes(run_dir))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop itself
def test_an_interrupt_a_finalizer_dropped_is_raised_again_at_the_next_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal handler's KeyboardInterrupt raised inside an object's __del__ is printed and
    dropped by Python; the demo's next checkpoint raises it again, until the teardown answers."""
    import clusterdemo

    monkeypatch.setattr(clusterdemo, "_interrupted", False)
    monkeypatch.setattr(clusterdemo, "_unanswered", False)

    class Finalized:
        def __del__(self) -> None:
            clusterdemo._interrupt(signal.SIGINT, None)

    Finalized()  # collected at once: the interrupt is raised inside __del__, and lost there
    with pytest.raises(KeyboardInterrupt):
        clusterdemo._checkpoint()
    clusterdemo._answered()
    clusterdemo._checkpoint()  # the teardown has it: nothing is raised twice
