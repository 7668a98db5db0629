"""The cluster demo (``make demo``) itself: a reduced run finishes drained and at zero, and both a
normal exit and Ctrl-C leave no process behind.

The demo starts its own control plane, Redis and operator, so these tests use no fixtures.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterdemo import processes_of
from support import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]


def _demo(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "e2e"), str(ROOT)])}
    return subprocess.Popen(
        [sys.executable, "-m", "clusterdemo", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_dir(out: str) -> Path:
    m = re.search(r"run dir (\S+)\)", out)
    assert m, out
    path = Path(m.group(1))
    return path if path.is_absolute() else ROOT / path


def _assert_no_strays(run_dir: Path) -> None:
    deadline = time.monotonic() + 10
    while (left := processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of {run_dir} left behind: {left}"


def test_demo_drains_to_zero_and_leaves_nothing_running() -> None:
    proc = _demo("--messages", "300")
    out, _ = proc.communicate(timeout=240)
    print(out[-3000:])
    assert proc.returncode == 0, out
    assert "Demo OK" in out
    assert "kubectl get tq -n sluiceway-demo -w" in out and "kubectl describe tq thumbnails" in out
    assert re.search(r"Replicas: 0 -> \d+ .*-> 0 ", out), out
    assert "Cleaned up" in out
    _assert_no_strays(_run_dir(out))


def test_demo_interrupted_with_ctrl_c_tears_everything_down() -> None:
    proc = _demo("--messages", "100000")
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        seen.append(line)
        if "Published a burst" in line or time.monotonic() > deadline:
            break
    time.sleep(3)  # mid-burst: worker pods are running
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(seen) + rest
    print(out[-2000:])
    assert proc.returncode == 130, out
    assert "Interrupted" in out
    _assert_no_strays(_run_dir(out))
