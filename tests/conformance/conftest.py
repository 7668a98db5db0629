"""The conformance suite's broker parametrisation.

Every scenario in ``test_conformance.py`` takes the ``broker_env`` fixture: a started broker
server plus what a worker and a publisher need to use it. A scenario only talks to the broker
through :class:`BrokerEnv` and real worker processes, so it runs unchanged on every broker.

**Adding a broker** (RabbitMQ, Kafka): write a factory ``def my_env(request) -> Iterator[BrokerEnv]``
that starts the server (the project's own scripts/fixtures, on loopback), yields a
:class:`BrokerEnv`, and stops it; then add it to :data:`FACTORIES`. Nothing else changes. Run
one broker with ``pytest tests/conformance -k rabbitmq``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

import sluiceway
from sluiceway import fleet
from sluiceway.contract import Keys
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess, worker_env

QUEUE = "conformance"
NAMESPACE = "default"


@dataclass
class BrokerEnv:
    """One broker, started, and the ways a scenario may touch it."""

    name: str
    coordination_url: str  # Redis: heartbeats, the rate limiter, and the tasks' records
    env: dict[str, str]  # SLUICEWAY_* variables that point a worker at this broker
    publisher: Callable[[], sluiceway.Publisher]  # the SDK's publisher for this broker
    publish_raw: Callable[[Sequence[bytes]], None]  # exact bytes, for poison inputs
    dead_letters: Callable[[], list[dict[str, Any]]]  # decoded dead-letter records
    restart: Callable[[float], None]  # stop the broker, wait, start it again (data kept)
    # Seconds a dead worker's unsettled messages may take to run again (the lease, for Redis).
    redelivery_bound: float = 10.0
    extra_worker_args: list[str] = field(default_factory=list)
    record_url: str = ""  # where the tasks record what ran, when not the coordination Redis

    @property
    def records(self) -> str:
        """A single-server Redis URL for the tasks' records (plain ``redis.Redis`` clients)."""
        return self.record_url or self.coordination_url

    def publish(self, messages: Sequence[dict[str, Any]]) -> None:
        pub = self.publisher()
        try:
            pub.publish_batch(f"{NAMESPACE}/{QUEUE}", messages)
        finally:
            pub.close()


def _redis_queue_env(
    name: str, server: Any, url: str, client: redis.Redis, record_url: str = ""
) -> Iterator[BrokerEnv]:
    """Redis as queue and coordination, a single server or a cluster (``client`` made for ``url``,
    closed after the test)."""
    keys = Keys(NAMESPACE, QUEUE)

    def publish_raw(payloads: Sequence[bytes]) -> None:
        client.lpush(keys.ready, *payloads)

    yield BrokerEnv(
        name=name,
        coordination_url=url,
        env={"SLUICEWAY_BROKER": "redis"},
        publisher=lambda: sluiceway.Publisher(url),
        publish_raw=publish_raw,
        dead_letters=lambda: fleet.dead_letters(client, keys, 10_000),
        restart=lambda down_for: server.restart(down_for=down_for),
        redelivery_bound=3.0 + 2.0,  # the scenarios' lease, plus a reaper tick and slack
        record_url=record_url,
    )
    client.close()


def redis_env(request: pytest.FixtureRequest) -> Iterator[BrokerEnv]:
    server: RedisServer = request.getfixturevalue("redis_server")
    url: str = request.getfixturevalue("redis_url")  # flushed for this test
    yield from _redis_queue_env("redis", server, url, redis.Redis.from_url(url))


def _beside_redis(
    name: str,
    server: Any,
    url: str,
    coordination: str,
    publish_raw: Callable[[Sequence[bytes]], None],
    dead_letters: Callable[[], list[dict[str, Any]]],
    redelivery_bound: float,
) -> BrokerEnv:
    """A broker named ``name`` at ``url`` for the messages, the session Redis (``coordination``)
    for coordination and the tasks' records."""
    return BrokerEnv(
        name=name,
        coordination_url=coordination,
        env={"SLUICEWAY_BROKER": name, "SLUICEWAY_BROKER_URL": url},
        publisher=lambda: sluiceway.Publisher(url),
        publish_raw=publish_raw,
        dead_letters=dead_letters,
        restart=lambda down_for: server.restart(down_for=down_for),
        redelivery_bound=redelivery_bound,
    )


def kafka_env(request: pytest.FixtureRequest) -> Iterator[BrokerEnv]:
    """The session's Kafka broker (tests/support/kafka_server.py); the scenario's three topics and
    group are deleted and the topics made again (4 partitions) for each test, so every scenario
    starts from an empty queue as on Redis."""
    from confluent_kafka import Consumer, Producer

    from sluiceway.transports import kafka_common as kc
    from sluiceway_operator.backlog.kafka import KafkaSource
    from tests.support.kafka_server import KafkaServer

    server: KafkaServer = request.getfixturevalue("kafka_server")
    url: str = request.getfixturevalue("kafka_url")
    coordination: str = request.getfixturevalue("redis_url")  # flushed for this test
    source = KafkaSource(NAMESPACE, QUEUE, url, partitions=4)
    source.purge()
    deadline = time.monotonic() + 60
    while True:  # a deleted topic may linger for a moment before it can be made again
        try:
            source.ensure_topics()
            if source.max_useful_replicas() == 4:
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)

    def publish_raw(payloads: Sequence[bytes]) -> None:
        p = Producer(kc.producer_config(url))
        for payload in payloads:
            p.produce(kc.topic(NAMESPACE, QUEUE), payload)
        assert p.flush(30) == 0

    def dead_letters() -> list[dict[str, Any]]:
        topic = kc.dead_topic(NAMESPACE, QUEUE)
        c = Consumer(
            {
                "bootstrap.servers": kc.bootstrap(url),
                "group.id": f"conformance-dlq-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
            }
        )
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        want = {p for p in parts if source._watermarks(topic, p)[1] > 0}
        c.subscribe([topic])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        try:
            while want and time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is None:
                    continue
                if m.error() is not None:
                    want.discard(m.partition())  # end of that partition
                    continue
                out.append(json.loads(m.value() or b"{}"))
        finally:
            c.close()
        return out

    # The redelivery bound: the session timeout (a killed consumer's partitions move once it
    # lapses), plus the rebalance and slack on a loaded machine.
    yield _beside_redis(
        "kafka", server, url, coordination, publish_raw, dead_letters, kc.SESSION_TIMEOUT_MS / 1000 + 8.0
    )
    source.close()


def rabbitmq_env(request: pytest.FixtureRequest) -> Iterator[BrokerEnv]:
    """RabbitMQ for the messages (a session node, one vhost per test), the session Redis for
    coordination and the tasks' records."""
    import pika

    from sluiceway.transports import rabbitmq_topology

    server = request.getfixturevalue("rabbitmq_server")
    url: str = request.getfixturevalue("rabbitmq_url")  # a fresh vhost for this test
    coordination: str = request.getfixturevalue("redis_url")  # flushed for this test

    def publish_raw(payloads: Sequence[bytes]) -> None:
        sluiceway.Publisher(url).sink.send(NAMESPACE, QUEUE, list(payloads))

    def dead_letters() -> list[dict[str, Any]]:
        # Read without taking: get every dead letter, then close the channel unacked (they go back).
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            ch = conn.channel()
            out: list[dict[str, Any]] = []
            while True:
                method, props, body = ch.basic_get(rabbitmq_topology.dead_queue(QUEUE), auto_ack=False)
                if method is None:
                    return out
                out.append(rabbitmq_topology.record_of(props.headers, body))
        finally:
            conn.close()

    # The redelivery bound: the broker requeues a dead consumer's deliveries as soon as its
    # connection drops.
    yield _beside_redis("rabbitmq", server, url, coordination, publish_raw, dead_letters, 5.0)


# The scenarios a Redis Cluster runs (the CI time budget is tight): lost leases reaped across
# workers, the poison inputs' dead letters, and the fleet rate limit. The rest exercise the same
# scripts and client paths as these and as the single-server run.
CLUSTER_SCENARIOS = ("kill_9", "every_poison_input", "fleet_qps_bound")


def redis_cluster_env(request: pytest.FixtureRequest) -> Iterator[BrokerEnv]:
    """A Redis Cluster of three masters (tests/support/redis_cluster.py) as queue and coordination;
    the tasks record on the session's single Redis."""
    if not any(s in request.node.name for s in CLUSTER_SCENARIOS):
        pytest.skip("not in the Redis Cluster subset (CLUSTER_SCENARIOS)")
    from sluiceway import connection

    server = request.getfixturevalue("redis_cluster")
    url: str = request.getfixturevalue("redis_cluster_url")  # flushed for this test
    records: str = request.getfixturevalue("redis_url")
    yield from _redis_queue_env("redis-cluster", server, url, connection.client(url), record_url=records)


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Iterator[BrokerEnv]]] = {
    "redis": redis_env,
    "redis-cluster": redis_cluster_env,
    "kafka": kafka_env,
    "rabbitmq": rabbitmq_env,
}


@pytest.fixture(params=sorted(FACTORIES))
def broker_env(request: pytest.FixtureRequest) -> Iterator[BrokerEnv]:
    yield from FACTORIES[request.param](request)


@pytest.fixture
def record(broker_env: BrokerEnv) -> Iterator[redis.Redis]:
    """The coordination Redis, where the conformance tasks record what ran."""
    client = redis.Redis.from_url(broker_env.records)
    yield client
    client.close()


@dataclass
class Fleet:
    broker: BrokerEnv
    tmp: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def spawn(self, function: str, *args: str, worker_id: str = "") -> WorkerProcess:
        env = worker_env(self.broker.coordination_url, TEST_RECORD_URL=self.broker.records, **self.broker.env)
        ids = ["--worker-id", worker_id] if worker_id else []
        argv = ["-f", function, "-q", QUEUE, "-n", NAMESPACE, *ids, *self.broker.extra_worker_args, *args]
        proc = WorkerProcess(argv, env, self.tmp / f"worker-{len(self.started)}.log")
        self.started.append(proc)
        return proc


@pytest.fixture
def fleet_(broker_env: BrokerEnv, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(broker_env, tmp_path)
    yield f
    for proc in f.started:
        proc.stop()


def figures_line(scenario: str, broker: str, **values: Any) -> str:
    """The ``[figures]`` line every scenario prints (the run's summary repeats them)."""
    parts = " ".join(f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items())
    return f"[figures] conformance {broker} {scenario}: {parts}"
