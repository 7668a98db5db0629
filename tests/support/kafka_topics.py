"""A queue's topics and its group's committed offsets, for the Kafka tests that need them."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from sluiceway.transports import kafka_common as kc


def create(url: str, namespace: str, queue: str, partitions: int) -> None:
    """The work topic with ``partitions``, and the retry and dead-letter topics with one each."""
    admin = AdminClient({"bootstrap.servers": kc.bootstrap(url)})
    kc.ensure_topics(
        admin,
        {
            kc.topic(namespace, queue): partitions,
            kc.retry_topic(namespace, queue): 1,
            kc.dead_topic(namespace, queue): 1,
        },
    )


def committed(url: str, namespace: str, queue: str, partitions: int) -> list[int]:
    """The queue's group's committed offset of each work partition (negative: none yet)."""
    c = Consumer({"bootstrap.servers": kc.bootstrap(url), "group.id": kc.group(namespace, queue)})
    try:
        tps = [TopicPartition(kc.topic(namespace, queue), p) for p in range(partitions)]
        return [tp.offset for tp in c.committed(tps, timeout=30)]
    finally:
        c.close()
