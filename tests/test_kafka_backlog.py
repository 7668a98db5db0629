"""The operator's Kafka backlog source against a real broker: topic creation, lag, the cap, purge."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from sluiceway.transports import kafka_common as kc
from sluiceway_operator.backlog import kafka as kafka_backlog
from tests.support.workers import wait_for

pytestmark = pytest.mark.slow


def test_lag_counts_never_committed_partitions_in_full(kafka_url: str) -> None:
    """The measured KEDA case, for real: 400 records on 4 partitions (100, 100, 75, 125); the
    group committed p2 at 25 and p3 at 125 and never committed p0, p1. Backlog 250, not 52."""
    queue = f"b{uuid.uuid4().hex[:8]}"
    src = kafka_backlog.source(
        namespace="kb", queue=queue, coordination=None, broker_url=kafka_url, partitions=4
    )
    try:
        assert src.backlog().ready == 0  # creates the topics
        assert src.max_useful_replicas() == 4
        topic = kc.topic("kb", queue)
        producer = Producer(kc.producer_config(kafka_url))
        for partition, count in enumerate((100, 100, 75, 125)):
            for i in range(count):
                producer.produce(topic, value=b'{"i": %d}' % i, partition=partition)
        assert producer.flush(30) == 0
        committer = Consumer(
            {"bootstrap.servers": kc.bootstrap(kafka_url), "group.id": kc.group("kb", queue)}
        )
        committer.commit(
            offsets=[TopicPartition(topic, 2, 25), TopicPartition(topic, 3, 125)], asynchronous=False
        )
        committer.close()
        b = src.backlog()
        print(f"[figures] records=400 backlog={b.ready} keda_default_would_read=52")
        assert b.ready == 250
        assert b.delayed == 0
        info = src.describe()
        assert info["partitions"] == 4 and info["lag"] == 250
        assert src.purge() >= 3
        # A topic's deletion reaches every broker's metadata a moment after the delete returns.
        wait_for(lambda: not src.describe()["topics"], 30, what="the purged topics gone")
    finally:
        src.close()


def test_an_existing_topic_keeps_its_partition_count(kafka_url: str) -> None:
    queue = f"b{uuid.uuid4().hex[:8]}"
    first = kafka_backlog.source(
        namespace="kb", queue=queue, coordination=None, broker_url=kafka_url, partitions=3
    )
    second = kafka_backlog.source(
        namespace="kb", queue=queue, coordination=None, broker_url=kafka_url, partitions=6
    )
    try:
        first.backlog()
        second.backlog()
        assert second.max_useful_replicas() == 3
    finally:
        first.purge()
        first.close()
        second.close()
