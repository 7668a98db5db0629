"""A worker that starts while its broker is down waits for it instead of crashing.

A crash at start would put the pod in CrashLoopBackOff, whose delay grows to minutes after the
broker is back; the running worker already rides out outages, so the start does too
(``sluiceway/run.py``). Against a real RabbitMQ node, stopped and started by the test.
"""

from __future__ import annotations

import redis

import sluiceway
from sluiceway.run import START_RETRY_EVENT
from tests.support.rabbitmq_server import RabbitMQServer
from tests.support.redis_server import free_port
from tests.support.workers import FAST, SpawnWorker, WorkerProcess, counts, wait_for


def waiting_worker(spawn_worker: SpawnWorker, url: str, *flags: str) -> WorkerProcess:
    """A RabbitMQ worker on ``url``, once it has logged that it waits for the broker."""
    worker = spawn_worker(
        "--function",
        "tests.tasks:record",
        "--queue",
        "jobs",
        *flags,
        SLUICEWAY_BROKER="rabbitmq",
        SLUICEWAY_BROKER_URL=url,
    )
    wait_for(lambda: START_RETRY_EVENT in worker.output(), 60, what="the worker's retry line")
    return worker


def test_a_worker_started_during_a_rabbitmq_outage_waits_then_runs_its_messages(
    rabbitmq_server: RabbitMQServer, rabbitmq_url: str, spawn_worker: SpawnWorker, r: redis.Redis
) -> None:
    rabbitmq_server.stop()
    try:
        worker = waiting_worker(spawn_worker, rabbitmq_url, *FAST)
        assert worker.proc.poll() is None, worker.output()
    finally:
        rabbitmq_server.start()
    pub = sluiceway.Publisher(rabbitmq_url)
    pub.publish_batch("jobs", ({"n": i} for i in range(20)))
    pub.close()
    wait_for(lambda: len(counts(r, "test:done")) == 20, 90, what="the 20 messages to run")
    assert "the broker is reachable; starting" in worker.output()
    worker.terminate()
    assert worker.wait(60) == 0, worker.output()


def test_a_stop_signal_while_the_broker_is_unreachable_ends_the_worker_cleanly(
    spawn_worker: SpawnWorker,
) -> None:
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    worker = waiting_worker(spawn_worker, closed)
    worker.terminate()
    assert worker.wait(60) == 0, worker.output()
    assert "Traceback" not in worker.output()
