"""The Kafka broker's backlog: consumer-group lag from committed offsets and watermarks.

- The work topic (and its retry and dead-letter topics) is created when missing, with
  ``spec.broker.kafka.partitions`` partitions; an existing topic keeps its own count.
- ``ready`` is the group's lag on the work topic, summed over partitions, under the workers'
  offset-reset policy (:mod:`.kafka_lag`), so a partition that never committed counts in full,
  not as 1 (KEDA's 52 for a true 250). ``delayed`` is the retry group's lag on the retry topic:
  retries and delayed publishes, which a worker holds until due. ``dead`` is the dead-letter topic's size.
- In-flight is not a broker figure on Kafka (offsets say nothing of what runs): the operator sums
  the workers' heartbeats, as it does for every broker.
- ``max_useful_replicas`` is the work topic's partition count: a group never gives one partition
  to two members, so replicas past it sit idle.
- Right after a broker starts, group requests answer NOT_COORDINATOR for a moment; reads retry
  those within a short bound before they count as an outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from sluiceway.transports import kafka_common as kc

from .base import Backlog
from .kafka_lag import PartitionOffsets, total_lag

T = TypeVar("T")
TIMEOUT = 10.0
COORDINATOR_RETRY = 10.0  # seconds to retry the transient errors below
_RETRIABLE = {
    # A topic created a moment ago has no leader yet.
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
}


class KafkaSource:
    broker = "kafka"
    outage_errors: tuple[type[BaseException], ...] = (KafkaException,)

    def __init__(self, namespace: str, queue: str, url: str, *, partitions: int = -1) -> None:
        self.topic = kc.topic(namespace, queue)
        self.retry_topic = kc.retry_topic(namespace, queue)
        self.dead_topic = kc.dead_topic(namespace, queue)
        self.group = kc.group(namespace, queue)
        self.retry_group = kc.retry_group(namespace, queue)
        self.partitions = partitions  # for creating the work topic; -1 = the broker's default
        self.bootstrap = kc.bootstrap(url)
        kc.route_to_structlog()
        self.admin = AdminClient(kc.admin_config(url))
        # Never subscribe: with a group's id each may read that group's committed offsets only.
        self.consumer = self._reader(self.group)
        self.retry_consumer = self._reader(self.retry_group)
        self.partition_count: int | None = None
        self.ensured = False

    def _reader(self, group: str) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                **kc.client_logging(),
            }
        )

    def ensure_topics(self) -> list[str]:
        created = kc.ensure_topics(
            self.admin,
            {self.topic: self.partitions, self.retry_topic: -1, self.dead_topic: -1},
            timeout=TIMEOUT,
        )
        self.ensured = True
        return created

    def _partitions(self, topic: str) -> list[int]:
        def read() -> list[int]:
            md = self.admin.list_topics(topic, timeout=TIMEOUT).topics.get(topic)
            if md is None or md.error is not None:
                raise KafkaException(
                    md.error if md is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
                )
            return sorted(md.partitions)

        return _retrying(read)

    def _watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        tp = TopicPartition(topic, partition)
        low, high = _retrying(lambda: self.consumer.get_watermark_offsets(tp, timeout=TIMEOUT, cached=False))
        return int(low), int(high)

    def offsets(self, topic: str) -> list[PartitionOffsets]:
        """Watermarks and the committed offsets of every partition of ``topic``, by the group that
        consumes it."""
        parts = self._partitions(topic)
        tps = [TopicPartition(topic, p) for p in parts]
        reader = self.retry_consumer if topic == self.retry_topic else self.consumer
        committed = _retrying(lambda: reader.committed(tps, timeout=TIMEOUT))
        out = []
        for tp in committed:
            if tp.error is not None:
                raise KafkaException(tp.error)
            low, high = self._watermarks(topic, tp.partition)
            out.append(PartitionOffsets(tp.partition, low, high, tp.offset if tp.offset >= 0 else None))
        return out

    def backlog(self) -> Backlog:
        self.admin.poll(0)  # serves the client's log lines (kafka_common.client_logger)
        if not self.ensured:
            self.ensure_topics()
        work = self.offsets(self.topic)
        self.partition_count = len(work)
        ready = total_lag(work, kc.AUTO_OFFSET_RESET)
        delayed = total_lag(self.offsets(self.retry_topic), kc.AUTO_OFFSET_RESET)
        dead = 0
        for p in self._partitions(self.dead_topic):
            low, high = self._watermarks(self.dead_topic, p)
            dead += high - low
        return Backlog(ready=ready, delayed=delayed, in_flight=None, acked=None, dead=dead)

    def max_useful_replicas(self) -> int | None:
        if self.partition_count is None:
            self.partition_count = len(self._partitions(self.topic))
        return self.partition_count

    def orphaned_workers(self, known: set[str]) -> list[str]:
        return []  # the group coordinator reassigns a dead member's partitions by itself

    def requeue_worker(self, worker_id: str) -> int:
        return 0  # a deleted pod leaves the group; its uncommitted records go to the next owner

    def purge(self) -> int:
        """Delete the groups and the three topics; returns how many of those existed."""
        gone = 0
        futures = self.admin.delete_consumer_groups([self.group, self.retry_group], request_timeout=TIMEOUT)
        for f in futures.values():
            try:
                f.result(TIMEOUT)
                gone += 1
            except KafkaException as exc:
                if exc.args[0].code() not in (KafkaError.GROUP_ID_NOT_FOUND, KafkaError.NON_EMPTY_GROUP):
                    raise
        existing = set(self.admin.list_topics(timeout=TIMEOUT).topics)
        names = [t for t in (self.topic, self.retry_topic, self.dead_topic) if t in existing]
        if names:
            for f in self.admin.delete_topics(names, operation_timeout=TIMEOUT).values():
                f.result(TIMEOUT)
            gone += len(names)
        self.ensured = False
        return gone

    def describe(self) -> Mapping[str, Any]:
        existing = set(self.admin.list_topics(timeout=TIMEOUT).topics)
        info: dict[str, Any] = {
            "broker": "kafka",
            "topics": [t for t in (self.topic, self.retry_topic, self.dead_topic) if t in existing],
            "group": self.group,
            "retryGroup": self.retry_group,
        }
        if self.topic in existing:
            try:
                work = self.offsets(self.topic)
            except KafkaException as exc:
                # Deleted between the listing and this read (a purge, another TaskQueue's
                # finalizer): the cluster-wide listing still showed it for a moment.
                if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise
                info["topics"].remove(self.topic)
                return info
            info["partitions"] = len(work)
            info["lag"] = total_lag(work, kc.AUTO_OFFSET_RESET)
        return info

    def close(self) -> None:
        self.consumer.close()
        self.retry_consumer.close()


def _retrying(call: Callable[[], T]) -> T:
    deadline = time.monotonic() + COORDINATOR_RETRY
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            code = err.code() if isinstance(err, KafkaError) else None
            if code not in _RETRIABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def source(
    *, namespace: str, queue: str, coordination: Any, broker_url: str, partitions: int = -1
) -> KafkaSource:
    return KafkaSource(namespace, queue, broker_url, partitions=partitions)
