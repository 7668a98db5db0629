"""The contract between the operator, the workers and publishers.

Everything that crosses a process boundary is named here and only here: the ``SLUICEWAY_*``
environment variables the operator sets on worker pods, the Redis key scheme, the reserved
metadata key of a message, and the shape of a worker heartbeat. The operator imports this module;
it never imports the runtime's internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, TypedDict

# --- Environment variables: the operator configures workers through these and the pod spec only.
ENV_FUNCTION: Final = "SLUICEWAY_FUNCTION"  # module:callable
ENV_NAMESPACE: Final = "SLUICEWAY_NAMESPACE"  # the TaskQueue's namespace; scopes the Redis keys
ENV_QUEUE: Final = "SLUICEWAY_QUEUE"  # the broker queue (Redis list, RabbitMQ queue, Kafka topic)
ENV_TASKQUEUE: Final = "SLUICEWAY_TASKQUEUE"  # the TaskQueue's name, for logs and metrics only
ENV_BROKER: Final = "SLUICEWAY_BROKER"  # redis | rabbitmq | kafka
ENV_BROKER_URL: Final = "SLUICEWAY_BROKER_URL"
ENV_RABBITMQ_QUEUE_TYPE: Final = "SLUICEWAY_RABBITMQ_QUEUE_TYPE"  # quorum (default) | classic
ENV_REDIS_URL: Final = "SLUICEWAY_REDIS_URL"  # coordination: rate limit, heartbeats, leases
ENV_QPS: Final = "SLUICEWAY_QPS"  # fleet-wide; unset or 0 = unlimited
ENV_QPS_BURST: Final = "SLUICEWAY_QPS_BURST"
ENV_CONCURRENCY: Final = "SLUICEWAY_CONCURRENCY"  # tasks at once per worker process
ENV_CONCURRENCY_MODE: Final = "SLUICEWAY_CONCURRENCY_MODE"  # one of CONCURRENCY_MODES
# How a worker runs tasks: threads, one event loop, or child processes (one per task at once).
# The CRD enum, the operator's spec reader and the worker's settings all say these.
CONCURRENCY_MODES: Final = ("thread", "asyncio", "process")
ENV_PREFETCH: Final = "SLUICEWAY_PREFETCH"
ENV_MAX_ATTEMPTS: Final = "SLUICEWAY_MAX_ATTEMPTS"
ENV_BACKOFF_SECONDS: Final = "SLUICEWAY_BACKOFF_SECONDS"
ENV_MAX_BACKOFF_SECONDS: Final = "SLUICEWAY_MAX_BACKOFF_SECONDS"
ENV_TIMEOUT_SECONDS: Final = "SLUICEWAY_TIMEOUT_SECONDS"
ENV_MAX_MESSAGE_AGE_SECONDS: Final = "SLUICEWAY_MAX_MESSAGE_AGE_SECONDS"
ENV_LEASE_SECONDS: Final = "SLUICEWAY_LEASE_SECONDS"
ENV_HEARTBEAT_SECONDS: Final = "SLUICEWAY_HEARTBEAT_SECONDS"
ENV_DRAIN_SECONDS: Final = "SLUICEWAY_DRAIN_SECONDS"
ENV_WORKER_ID: Final = "SLUICEWAY_WORKER_ID"
ENV_POD_NAME: Final = "SLUICEWAY_POD_NAME"
ENV_METRICS_PORT: Final = "SLUICEWAY_METRICS_PORT"  # 0 disables the Prometheus endpoint
ENV_LOG_FORMAT: Final = "SLUICEWAY_LOG_FORMAT"  # json | console
ENV_LOG_LEVEL: Final = "SLUICEWAY_LOG_LEVEL"
ENV_ORDERING: Final = "SLUICEWAY_ORDERING"  # Kafka: unset/none = any order | key
ENV_RESULT_TTL: Final = "SLUICEWAY_RESULT_TTL"  # seconds a call's result waits in Redis

DEFAULT_NAMESPACE: Final = "default"
DEFAULT_METRICS_PORT: Final = 9464
DEFAULT_RESULT_TTL_SECONDS: Final = 3600

# --- Rules both sides check: the operator (spec.py), the worker (settings.py) and the CRD's CEL rules,
# which embed these patterns verbatim (tests/operator/test_validation_agreement.py holds them to it).
# No backslashes in the patterns, so they read the same in Python, in YAML and in a CEL string.
FUNCTION_PATTERN: Final = "^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
# The one charset that is safe as a Redis hash tag, a RabbitMQ queue and a Kafka topic.
QUEUE_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
FUNCTION_RE: Final = re.compile(FUNCTION_PATTERN)
QUEUE_RE: Final = re.compile(QUEUE_PATTERN)
FUNCTION_PROBLEM: Final = "must look like 'package.module:callable'"
QUEUE_PROBLEM: Final = (
    "must be 1-200 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
)
# A lease must survive one missed renewal, or a slow heartbeat requeues live work.
MIN_LEASE_HEARTBEATS: Final = 2


def lease_too_short(lease_seconds: float, heartbeat_seconds: float) -> bool:
    """True when a lease could expire between two heartbeats that renew it."""
    return lease_seconds < MIN_LEASE_HEARTBEATS * heartbeat_seconds


# --- Messages: a JSON object of keyword arguments. Metadata, when present, sits under this key;
# it can never collide with a Python keyword argument because "$" is not valid in an identifier.
META_KEY: Final = "$sluiceway"


@dataclass(frozen=True, slots=True)
class Keys:
    """Redis keys of one queue scope.

    Every key shares the hash tag ``{namespace/queue}`` so a Lua script may touch all of them in a
    Redis Cluster, and two queues never share a key.
    """

    namespace: str
    queue: str

    @property
    def prefix(self) -> str:
        return f"sluiceway:{{{self.namespace}/{self.queue}}}:"

    @property
    def ready(self) -> str:
        """LIST of ready messages, each exactly as published: publishers LPUSH, workers take from
        the right."""
        return self.prefix + "queue"

    @property
    def delayed(self) -> str:
        """ZSET of messages waiting for a retry, scored by the server time (ms) they become ready."""
        return self.prefix + "delayed"

    @property
    def dead(self) -> str:
        """LIST of dead-letter entries (JSON with the reason and the original payload)."""
        return self.prefix + "dlq"

    @property
    def leased_workers(self) -> str:
        """SET of worker ids that may hold leases; the reaper walks it."""
        return self.prefix + "leased-workers"

    def inflight(self, worker_id: str) -> str:
        """ZSET of one worker's leased messages, scored by lease deadline (server ms)."""
        return self.prefix + "inflight:" + worker_id

    @property
    def workers(self) -> str:
        """ZSET of worker ids scored by their last heartbeat (server ms)."""
        return self.prefix + "workers"

    def heartbeat(self, worker_id: str) -> str:
        """STRING holding one worker's latest heartbeat JSON, with a TTL."""
        return self.prefix + "worker:" + worker_id

    @property
    def ratelimit(self) -> str:
        """STRING: the theoretical arrival time (server µs) of the next rate-limit slot."""
        return self.prefix + "ratelimit"

    @property
    def sequence(self) -> str:
        """Counter that makes every lease unique, even for identical payloads."""
        return self.prefix + "seq"

    @property
    def redelivered(self) -> str:
        """LIST of messages that went back to the queue unsettled (a worker died, hung or was
        stopped mid-task), as ``<count>:<payload>``: the count bounds messages that kill workers.
        Workers take from it before ``ready``."""
        return self.prefix + "redelivered"

    @property
    def stats(self) -> str:
        """HASH of fleet-wide counters (acked, retried, dead, requeued)."""
        return self.prefix + "stats"

    def schedule_fire(self, schedule: str, wall: str) -> str:
        """STRING with a TTL: one schedule's scheduled wall time was published; set with NX."""
        return self.prefix + f"schedule:{schedule}:{wall}"

    def all_static(self) -> list[str]:
        return [
            self.ready,
            self.delayed,
            self.dead,
            self.leased_workers,
            self.workers,
            self.ratelimit,
            self.sequence,
            self.redelivered,
            self.stats,
        ]


# --- Results of calls (``sluiceway.call``): on the coordination Redis for every broker. A caller
# process has a client id; each call a unique reply key under it. The worker pushes the outcome to
# the reply key (a LIST, so a late caller still finds it within the TTL) and publishes it on the
# client's channel, which the caller's one listener multiplexes over all its calls.
REPLY_PREFIX: Final = "sluiceway:reply:"
REPLY_CHANNEL_PREFIX: Final = "sluiceway:replies:"


def reply_key(client_id: str, call_id: str) -> str:
    """LIST holding one call's result record (at most one entry), with a TTL."""
    return f"{REPLY_PREFIX}{client_id}:{call_id}"


def reply_channel(client_id: str) -> str:
    """Pub/sub channel on which the worker announces every result for one caller process."""
    return REPLY_CHANNEL_PREFIX + client_id


def reply_channel_of(key: str) -> str | None:
    """The channel for a reply key, or ``None`` when ``key`` is not a reply key: a message can
    make a worker write only under :data:`REPLY_PREFIX`, never to a queue's keys."""
    if not key.startswith(REPLY_PREFIX):
        return None
    client_id, sep, call_id = key[len(REPLY_PREFIX) :].partition(":")
    if not (client_id and sep and call_id) or len(key) > 200:
        return None
    return reply_channel(client_id)


class Heartbeat(TypedDict):
    """What a worker writes to ``Keys.heartbeat`` every heartbeat interval."""

    worker: str
    pod: str
    state: str  # "running" | "draining"
    started: float  # unix seconds
    time: float  # unix seconds of this heartbeat
    interval: float  # seconds between heartbeats
    concurrency: int
    busy: int  # tasks running now
    in_flight: int  # leases held: running plus prefetched
    processed: int  # succeeded since start
    failed: int  # failed attempts since start (retried or dead-lettered)
    dead_lettered: int
    rate: float  # completions per second over the recent window
    latency_p50: float  # seconds, recent window
    latency_p95: float
    latency_p99: float
    version: str
