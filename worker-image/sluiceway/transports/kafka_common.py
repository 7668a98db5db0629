"""What the Kafka worker, publisher and operator agree on: topic and group names, headers, client
settings, and creating topics. The one owner of each; no client library is imported at module load.

A TaskQueue ``<namespace>/<queue>`` on Kafka is three topics and two consumer groups:

- ``sluiceway.<namespace>.<queue>``: the work; its partition count caps the useful replicas
  (a '.' or '_' in the queue is escaped, see :func:`topic`, so no two queues' topics collide);
- ``<work>.retry``: retries and delayed publishes, each record carrying the wall-clock time it is
  due in the ``sluiceway-due-ms`` header. Every worker consumes it too, in a group of its own, and
  holds a record in memory (uncommitted) until it is due, so a retry survives the death of the
  worker that scheduled it;
- ``<work>.dead``: dead letters; the value is the dead-letter record (:mod:`sluiceway.deadletter`)
  and the headers repeat the reason and where the record came from;
- the group ``sluiceway.<namespace>.<queue>`` consumes the work topic, and the group
  ``<work>.retry`` the retry topic (see :func:`retry_group` for why two).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from sluiceway import contract

# Where a group with no valid committed offset starts. The operator's lag uses the same policy
# (sluiceway_operator.backlog.kafka_lag), so the backlog it scales for is what workers will run.
AUTO_OFFSET_RESET: Final = "earliest"

# A killed consumer's partitions move once the broker misses its heartbeats for this long. Lower
# is a faster recovery from kill -9 or a node loss; higher survives longer GC pauses and network
# blips without a rebalance (which redoes in-flight work). 10 s is the broker's lowest allowed
# group.min.session.timeout.ms (6 s) plus margin for a loaded node.
SESSION_TIMEOUT_MS: Final = 10_000
# A third of the session timeout or less, as Kafka advises, and short: a member learns that a
# rebalance began from a heartbeat's answer, and a cooperative rebalance takes two rounds, so a
# scale event cost up to two intervals without progress on the moved partitions (2 s + 2 s seen
# in the e2e burst at 2000 ms). A heartbeat is one small request to the coordinator.
HEARTBEAT_INTERVAL_MS: Final = 500

HEADER_DUE_MS: Final = "sluiceway-due-ms"  # retry topic: wall-clock ms when the record is due
HEADER_REASON: Final = "sluiceway-reason"  # dead-letter topic: why
HEADER_SOURCE: Final = "sluiceway-source"  # dead-letter topic: topic/partition/offset it came from

ENV_ORDERING: Final = contract.ENV_ORDERING
ORDERINGS: Final = ("", "none", "key")

# Topic names. Kafka allows letters, digits, '.', '_' and '-', at most 249 characters, and treats
# '.' and '_' as the same character when it names metrics, so it refuses a topic whose name differs
# from an existing one only there ("a.b" and "a_b"). The derivation below is injective even under
# that equivalence, so two TaskQueues never map to colliding topics:
# - the namespace is a Kubernetes namespace (a DNS label: no '.' or '_'), so the first '.' after
#   the prefix ends it;
# - in the queue, '.' becomes ".." and '_' becomes ".-"; every other queue character is itself.
#   So a '.' inside the encoded queue is always followed by '.' or '-', and a '.' followed by a
#   letter or digit can only start the ".retry" / ".dead" suffix;
# - names of letters, digits and '-' (most queues) are unchanged: "sluiceway.<namespace>.<queue>".
TOPIC_PREFIX: Final = "sluiceway."
RETRY_SUFFIX: Final = ".retry"
DEAD_SUFFIX: Final = ".dead"
MAX_TOPIC_NAME: Final = 249  # Kafka's own limit (kafka.common.internals.Topic)
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ESCAPE: Final = {".": "..", "_": ".-"}
_UNESCAPE: Final = {".": ".", "-": "_"}


def encode_queue(queue: str) -> str:
    """The queue's part of its topic names: '.' -> "..", '_' -> ".-", all else unchanged."""
    return "".join(_ESCAPE.get(ch, ch) for ch in queue)


def topic(namespace: str, queue: str) -> str:
    """The work topic of ``namespace/queue``; raises ValueError naming the field at fault."""
    if not _NAMESPACE.match(namespace):
        raise ValueError(
            f"namespace {namespace!r} must be a Kubernetes namespace (a DNS label: 1-63 lowercase "
            "letters, digits or '-', starting and ending with a letter or digit) to name Kafka topics"
        )
    if not contract.QUEUE_RE.match(queue):
        raise ValueError(f"queue {queue!r} {contract.QUEUE_PROBLEM}")
    name = f"{TOPIC_PREFIX}{namespace}.{encode_queue(queue)}"
    longest = len(name) + max(len(RETRY_SUFFIX), len(DEAD_SUFFIX))
    if longest > MAX_TOPIC_NAME:
        raise ValueError(
            f"queue {queue!r} (spec.broker.queue) in namespace {namespace!r} is too long for Kafka: its "
            f"retry topic {name + RETRY_SUFFIX!r} would be {longest} characters, over Kafka's "
            f"{MAX_TOPIC_NAME} ('.' and '_' in the queue count twice)"
        )
    return name


def retry_topic(namespace: str, queue: str) -> str:
    return topic(namespace, queue) + RETRY_SUFFIX


def dead_topic(namespace: str, queue: str) -> str:
    return topic(namespace, queue) + DEAD_SUFFIX


def parse_topic(name: str) -> tuple[str, str, str]:
    """The inverse of the three derivations: ``(namespace, queue, kind)``, kind one of "work",
    "retry", "dead"; raises ValueError for a name none of them makes. It exists to prove (in
    tests) that the derivation is injective: every name decodes to exactly one TaskQueue."""
    if not name.startswith(TOPIC_PREFIX):
        raise ValueError(f"{name!r} is not a Sluiceway topic")
    rest = name[len(TOPIC_PREFIX) :]
    namespace, sep, encoded = rest.partition(".")
    if not sep:
        raise ValueError(f"{name!r} names no queue")
    out: list[str] = []
    kind = "work"
    i = 0
    while i < len(encoded):
        ch = encoded[i]
        if ch == "_":
            raise ValueError(f"{name!r}: a bare '_' is never made")
        if ch != ".":
            out.append(ch)
            i += 1
            continue
        nxt = encoded[i + 1 : i + 2]
        if nxt in _UNESCAPE:
            out.append(_UNESCAPE[nxt])
            i += 2
            continue
        tail = encoded[i:]
        if tail in (RETRY_SUFFIX, DEAD_SUFFIX):
            kind = "retry" if tail == RETRY_SUFFIX else "dead"
            break
        raise ValueError(f"{name!r}: '.' followed by {nxt!r} is never made")
    queue = "".join(out)
    made = {"work": topic, "retry": retry_topic, "dead": dead_topic}[kind](namespace, queue)
    if made != name:
        raise ValueError(f"{name!r} is not the name {namespace!r}/{queue!r} makes ({made!r})")
    return namespace, queue, kind


def group(namespace: str, queue: str) -> str:
    """The work topic's consumer group."""
    return topic(namespace, queue)


def retry_group(namespace: str, queue: str) -> str:
    """The retry topic's consumer group: the same workers, a group of their own. In one group with
    the work topic, the sticky assignor balances the *count* of partitions over both topics (12 for
    6 + 6), so a worker could hold only retry partitions and run nothing while another held several
    work partitions; a group per topic spreads each topic over every worker. Named after the topic
    it consumes, so it is as collision-free as the topic names."""
    return retry_topic(namespace, queue)


def bootstrap(url: str) -> str:
    """``kafka://host:port[,host:port...]`` -> librdkafka's ``bootstrap.servers``."""
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ValueError(f"Kafka broker URL {url!r} must start with kafka://")
    servers = parts.netloc.rsplit("@", 1)[-1]
    if not servers:
        raise ValueError(f"Kafka broker URL {url!r} names no host:port")
    return servers


def consumer_config(url: str, group_id: str, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap(url),
        "group.id": group_id,
        "client.id": client_id,
        # At-least-once: nothing is committed by the client on its own; the transport commits the
        # finished prefix of each partition (transports/kafka_offsets.py).
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": AUTO_OFFSET_RESET,
        # Cooperative rebalancing moves only the partitions that change owner, so a scale event
        # does not stop the whole group, and on_revoke can drain just those.
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
        # The poll thread polls every ~100 ms even when the worker is full (partitions paused),
        # so this default only trips on a real hang.
        "max.poll.interval.ms": 300_000,
        "fetch.wait.max.ms": 100,
        "queued.max.messages.kbytes": 16384,
        **client_logging(),
    }


def admin_config(url: str, reachability: Reachability | None = None) -> dict[str, Any]:
    """``reachability``: an admin client of a caller that fails fast (see :class:`Reachability`)."""
    extra = {"error_cb": reachability.on_error} if reachability is not None else {}
    return {"bootstrap.servers": bootstrap(url), **client_logging(), **extra}


def producer_config(url: str, client_id: str = "sluiceway") -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap(url),
        "client.id": client_id,
        # The publisher returns only once every in-sync replica has the record, and a retried
        # send never duplicates or reorders it.
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 2,
        **client_logging(),
    }


# librdkafka's own log lines. Left to itself it prints every one to stderr, and a broker that is
# down is retried (and logged) every 50 ms or so: about 680 lines in 30 s against a closed port.
# They go instead through one Python logger, and a line that repeats (numbers aside) is folded:
# the first one passes, the same one again within REPEAT_WINDOW seconds is counted and dropped,
# and the next one that passes after that says how many were dropped.
CLIENT_LOGGER: Final = "sluiceway.kafka.client"
CLIENT_LOG_LEVEL: Final = 3  # librdkafka's syslog level: errors and worse (warnings are chatty)
REPEAT_WINDOW: Final = 60.0
_VARYING = re.compile(r"\d+")


class FoldRepeats(logging.Filter):
    """Passes a message the first time, and the same message (its digits aside: "after 0ms",
    the client's instance number) at most once every ``window`` seconds, saying how many it
    dropped in between."""

    def __init__(self, window: float = REPEAT_WINDOW, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[float, int]] = {}  # key -> (when it last passed, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = _VARYING.sub("#", record.getMessage())
        now = self.clock()
        with self.lock:
            last = self.seen.get(key)
            if last is not None and now - last[0] < self.window:
                self.seen[key] = (last[0], last[1] + 1)
                return False
            dropped = last[1] if last is not None else 0
            self.seen[key] = (now, 0)
            if len(self.seen) > 1000:  # bounded: the oldest keys go first
                for old in sorted(self.seen, key=lambda k: self.seen[k][0])[:500]:
                    del self.seen[old]
        if dropped:
            record.msg = f"{record.getMessage()} (and {dropped} more like it in the last {self.window:.0f} s)"
            record.args = ()
        return True


def client_logger() -> logging.Logger:
    """The logger every Kafka client of Sluiceway logs through (confluent-kafka's ``logger``),
    with repeats folded. It propagates like any stdlib logger: in a user's program the program's
    logging configuration decides (by default warnings and worse reach stderr); the worker and
    the operator route it to their structured log (:func:`route_to_structlog`); the CLI silences
    it, since it prints the one-line outcome itself."""
    logger = logging.getLogger(CLIENT_LOGGER)
    if not any(isinstance(f, FoldRepeats) for f in logger.filters):
        logger.addFilter(FoldRepeats())
    return logger


def client_logging() -> dict[str, Any]:
    """The configuration entries of every Kafka client (consumer, producer, admin) about logs."""
    return {"log_level": CLIENT_LOG_LEVEL, "logger": client_logger()}


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from sluiceway.log import get_logger

        try:
            get_logger(broker="kafka").log(record.levelno, "kafka_client", detail=record.getMessage())
        except Exception:  # a log line must never break the client's poll
            self.handleError(record)


def route_to_structlog() -> None:
    """Send the client logger's lines to the process's structured log (worker, operator), once."""
    logger = client_logger()
    if not any(isinstance(h, _ToStructlog) for h in logger.handlers):
        logger.addHandler(_ToStructlog())
        logger.propagate = False


def silence_client_logs() -> None:
    """The CLI says the outcome in one line; librdkafka's retries would only bury it."""
    client_logger().setLevel(logging.CRITICAL + 1)


def due_header(delay: float, now: float | None = None) -> tuple[str, bytes]:
    due_ms = int(((time.time() if now is None else now) + max(delay, 0.0)) * 1000)
    return HEADER_DUE_MS, str(due_ms).encode()


def header(headers: Any, name: str) -> bytes | None:
    """A header's value from a record's headers (a list of pairs, or None)."""
    for k, v in headers or ():
        if k == name:
            return v.encode() if isinstance(v, str) else v
    return None


# A client that has never reached the cluster learns that every bootstrap broker is down from
# librdkafka's error callback (ERR__ALL_BROKERS_DOWN) within milliseconds of a refused
# connection, while a metadata request waits out its whole timeout (30 s) for a broker that may
# yet come up. A caller that must answer quickly (the publishing CLI and SDK, on their first
# contact) gives up UNREACHABLE_GRACE after that report: the grace lets librdkafka try the
# other addresses of a name (localhost is ::1, then 127.0.0.1) and a broker that is starting.
UNREACHABLE_GRACE: Final = 2.0
METADATA_STEP: Final = 0.25  # the metadata request is cut in steps of this, to read the callback


class Reachability:
    """What librdkafka's error callback said about the brokers, for :func:`ensure_topics`: when
    it first reported them all down, and the last connection error (the one line to show)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.down_since: float | None = None
        self.last_error = ""

    def on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if self.down_since is None:
                self.down_since = self.clock()
        else:
            self.last_error = err.str()

    def unreachable(self) -> bool:
        """True once every broker has been down for UNREACHABLE_GRACE without an answer."""
        return self.down_since is not None and self.clock() - self.down_since >= UNREACHABLE_GRACE

    def error(self) -> Any:
        from confluent_kafka import KafkaError, KafkaException

        why = self.last_error or "no connection"
        return KafkaException(
            KafkaError(KafkaError._ALL_BROKERS_DOWN, f"no broker reachable ({why})", fatal=False)
        )


def cluster_metadata(admin: Any, timeout: float, reachability: Reachability | None = None) -> Any:
    """``admin.list_topics()``; with ``reachability`` (the admin client made with it, see
    :func:`admin_config`), it raises once librdkafka says no broker can be reached instead of
    waiting out ``timeout``. Without it, a broker down is waited for up to ``timeout``: a
    running worker retries an outage, it never fails fast on one."""
    from confluent_kafka import KafkaException

    if reachability is None:
        return admin.list_topics(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.001, min(METADATA_STEP, left)))
        except KafkaException:
            if left <= METADATA_STEP:
                raise
        admin.poll(0)  # serves the error callback
        if reachability.unreachable():
            raise reachability.error()


def ensure_topics(
    admin: Any,
    partitions: Mapping[str, int],
    timeout: float = 30.0,
    reachability: Reachability | None = None,
) -> list[str]:
    """Create the topics that are missing (``-1`` partitions: the broker's default); returns the
    names it created. An existing topic is left as it is, whatever its partition count.
    ``reachability``: fail fast when no broker can be reached (:func:`cluster_metadata`)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.cimpl import NewTopic

    existing = set(cluster_metadata(admin, timeout, reachability).topics)
    missing = [name for name in partitions if name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions[name], replication_factor=-1) for name in missing],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # a racing worker made it
                raise
    return created
