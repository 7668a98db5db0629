"""Process mode on every broker: the pod owns the transport, so a killed child loses nothing and
a SIGTERM drains, whatever the broker (see ``conftest.py`` for the parametrisation)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tests.conformance.conftest import BrokerEnv, Fleet, figures_line
from tests.support.workers import wait_for
from tests.test_process_mode import children

pytestmark = [pytest.mark.redis, pytest.mark.slow]

FAST = ["--lease", "3", "--heartbeat", "0.5"]
WORK = "tests.conformance.tasks:work"


def _counts(r: redis.Redis, key: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in r.hgetall(key).items()}


def test_process_mode_kill_9_of_a_child_loses_nothing_and_sigterm_drains(
    broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis
) -> None:
    total = 200
    broker_env.publish([{"n": i, "sleep": 0.02} for i in range(total)])
    w = fleet_.spawn(WORK, "-c", "3", "--concurrency-mode", "process", *FAST)
    wait_for(lambda: record.hlen("c:done") >= 50, 120, what="50 done")
    os.kill(children(w.pid)[0], signal.SIGKILL)
    wait_for(lambda: record.hlen("c:done") >= total, 120, what="all done")
    seen, done = _counts(record, "c:seen"), _counts(record, "c:done")
    lost = total - len(set(done) & set(range(total)))
    duplicates = sum(seen.values()) - len(seen)
    print(
        figures_line("process-kill-child", broker_env.name, messages=total, lost=lost, duplicates=duplicates)
    )
    assert lost == 0 and duplicates <= 1  # only the killed child's task may run twice
    assert w.proc.poll() is None and len(children(w.pid)) == 3
    broker_env.publish([{"n": total + i, "sleep": 3} for i in range(3)])
    wait_for(lambda: record.hlen("c:seen") >= total + 3, 60, what="3 long tasks running")
    w.terminate()
    t0 = time.monotonic()
    assert w.wait(60) == 0, w.output()[-3000:]
    assert {total, total + 1, total + 2} <= set(_counts(record, "c:done")), "the drain let them finish"
    print(figures_line("process-sigterm", broker_env.name, drain_s=round(time.monotonic() - t0, 2)))
