"""Shared fixtures: a real Redis for the session, and real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, settings
from tests.support.redis_server import RedisServer
from tests.support.workers import SpawnWorker, WorkerProcess, worker_env

pytest_plugins = [
    "localcluster.pytest_plugin",
    "tests.support.rabbitmq_fixtures",
    "tests.support.kafka_server",
]

# Property tests check logic, not speed: on a shared 2-core machine that is also running Redis,
# a control plane and worker processes, Hypothesis's per-example deadline and its "generation
# is slow" check fail at random. Speed lives in `make bench`.
settings.register_profile(
    "sluiceway", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("sluiceway")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.ensure_running()  # a previous test restarted or stopped it
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def spawn_worker(redis_url: str, tmp_path: Path) -> Iterator[SpawnWorker]:
    """Start ``sluiceway worker`` processes; every one is killed at teardown."""
    started: list[WorkerProcess] = []

    def spawn(*args: str, **env: str) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        proc = WorkerProcess(list(args), worker_env(redis_url, TEST_RECORD_URL=redis_url, **env), log)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()


# --- Figures: tests print lines tagged "[figures]" or "[e2e figures]"; the run's summary repeats
# them, so CI logs show the measured figures without `pytest -s`.
_FIGURES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _FIGURES.extend(
            f"{report.nodeid.split('::')[-1]}: {line.strip()}"
            for line in report.capstdout.splitlines()
            if "figures]" in line
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
