"""``make demo BROKER=rabbitmq`` and ``BROKER=kafka``: the cluster demo with its messages on that
broker, which the demo starts itself the way the tests do. One short run per broker: the burst
drains, the fleet wakes from zero and returns to it, exactly the poison message is dead-lettered,
and nothing the run started is left. (The Redis demo and its interrupt handling are covered by
``test_e2e_demo.py``; the teardown code is the same for every broker.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from localcluster.procs import started_processes
from support import ROOT
from test_e2e_demo import DEMO, _assert_no_strays, _run_dir, demo_env

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(420)]

MESSAGES = 250  # one of them not a PNG (POISON_EVERY): one dead letter


@pytest.mark.parametrize("broker", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), "kafka"])
def test_the_demo_on_another_broker_drains_to_zero_and_leaves_nothing_running(
    broker: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [*DEMO, "--broker", broker, "--messages", str(MESSAGES)],
        cwd=ROOT,
        env=demo_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    out = done.stdout
    print(out[-3000:])
    assert done.returncode == 0, out[-5000:]
    assert f"on {broker} in" in out and "Demo OK" in out
    assert "0 left in the queue, 1 dead-lettered" in out
    assert re.search(r"Replicas: 0 -> \d+ .*-> 0 ", out), out
    assert "Cleaned up" in out
    _assert_no_strays(started_processes(_run_dir(out)))
