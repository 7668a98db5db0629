"""Pytest fixtures for a real RabbitMQ: one node per test session, one vhost per test.

A vhost per test keeps tests apart as ``flushall`` does for Redis, without restarting the node
(a start takes 8-50 s on a loaded machine); deleting it at teardown deletes all its queues.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.rabbitmq_server import RabbitMQServer


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    server = RabbitMQServer()
    server.start()
    print(f"[figures] rabbitmq node started in {server.start_seconds:.1f} s")
    yield server
    server.close()


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> Iterator[str]:
    if rabbitmq_server.proc is None or rabbitmq_server.proc.poll() is not None:
        rabbitmq_server.start()  # a previous test stopped or killed it
    vhost = f"t-{uuid.uuid4().hex[:10]}"
    url = rabbitmq_server.create_vhost(vhost)
    yield url
    if rabbitmq_server.proc is None or rabbitmq_server.proc.poll() is not None:
        rabbitmq_server.start()
    rabbitmq_server.delete_vhost(vhost)
