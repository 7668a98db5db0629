"""Worker settings: one validated value built from ``SLUICEWAY_*`` variables and command-line flags."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sluiceway import contract as c
from sluiceway.transports import rabbitmq_topology

# One definition each, shared with the operator and the CRD.
QUEUE_NAME = c.QUEUE_RE
FUNCTION_REF = c.FUNCTION_RE
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or invalid. The message names the variable or flag."""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    function: str
    queue: str
    namespace: str = c.DEFAULT_NAMESPACE
    taskqueue: str = ""
    broker: str = "redis"
    broker_url: str = ""
    rabbitmq_queue_type: str = rabbitmq_topology.DEFAULT_QUEUE_TYPE
    redis_url: str = "redis://127.0.0.1:6379/0"
    qps: float = 0.0  # 0 = unlimited
    qps_burst: int = 0
    # How far ahead (seconds) a worker may lease rate-limit slots: longer means fewer round trips,
    # shorter means a message waits less between fetch and start.
    qps_horizon: float = 0.1
    # A task starts at most this long after its slot, or takes a fresh slot: this bounds how many
    # starts a stalled process can bunch into one window (see docs/worker.md).
    qps_slot_tolerance: float = 0.01
    concurrency: int = 8
    concurrency_mode: str = "thread"
    prefetch: int = -1  # < 0 = automatic: about 100 ms of work at the measured rate
    max_attempts: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 300.0
    timeout_seconds: float = 300.0
    max_message_age_seconds: float = 0.0  # 0 = no limit
    lease_seconds: float = 15.0
    heartbeat_seconds: float = 2.0
    drain_seconds: float = -1.0  # < 0 = the task timeout
    worker_id: str = ""
    pod_name: str = ""
    metrics_port: int = c.DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    log_format: str = "json"
    log_level: str = "INFO"
    fetch_batch: int = 256
    result_ttl_seconds: float = c.DEFAULT_RESULT_TTL_SECONDS  # how long a call's result waits

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise SettingsError("; ".join(problems))

    @property
    def effective_drain_seconds(self) -> float:
        return self.timeout_seconds if self.drain_seconds < 0 else self.drain_seconds

    @property
    def effective_worker_id(self) -> str:
        # The pod name is the worker id in Kubernetes, so the operator can return a deleted pod's
        # leases by name, and a restarted container recognizes the leases of its previous life.
        return self.worker_id or self.pod_name or f"{socket.gethostname()}-{os.getpid()}"

    def with_overrides(self, **overrides: Any) -> WorkerSettings:
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update({k: v for k, v in overrides.items() if v is not None})
        return WorkerSettings(**current)


_ENV_FIELDS: dict[str, tuple[str, type]] = {
    c.ENV_FUNCTION: ("function", str),
    c.ENV_QUEUE: ("queue", str),
    c.ENV_NAMESPACE: ("namespace", str),
    c.ENV_TASKQUEUE: ("taskqueue", str),
    c.ENV_BROKER: ("broker", str),
    c.ENV_BROKER_URL: ("broker_url", str),
    c.ENV_RABBITMQ_QUEUE_TYPE: ("rabbitmq_queue_type", str),
    c.ENV_REDIS_URL: ("redis_url", str),
    c.ENV_QPS: ("qps", float),
    c.ENV_QPS_BURST: ("qps_burst", int),
    c.ENV_CONCURRENCY: ("concurrency", int),
    c.ENV_CONCURRENCY_MODE: ("concurrency_mode", str),
    c.ENV_PREFETCH: ("prefetch", int),
    c.ENV_MAX_ATTEMPTS: ("max_attempts", int),
    c.ENV_BACKOFF_SECONDS: ("backoff_seconds", float),
    c.ENV_MAX_BACKOFF_SECONDS: ("max_backoff_seconds", float),
    c.ENV_TIMEOUT_SECONDS: ("timeout_seconds", float),
    c.ENV_MAX_MESSAGE_AGE_SECONDS: ("max_message_age_seconds", float),
    c.ENV_LEASE_SECONDS: ("lease_seconds", float),
    c.ENV_HEARTBEAT_SECONDS: ("heartbeat_seconds", float),
    c.ENV_DRAIN_SECONDS: ("drain_seconds", float),
    c.ENV_WORKER_ID: ("worker_id", str),
    c.ENV_POD_NAME: ("pod_name", str),
    c.ENV_METRICS_PORT: ("metrics_port", int),
    c.ENV_LOG_FORMAT: ("log_format", str),
    c.ENV_LOG_LEVEL: ("log_level", str),
    c.ENV_RESULT_TTL: ("result_ttl_seconds", float),
}


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Typed values of the ``SLUICEWAY_*`` variables that are set, keyed by field name."""
    values: dict[str, Any] = {}
    for var, (name, kind) in _ENV_FIELDS.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            values[name] = kind(raw)
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
    return values


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
    """Settings from the environment, then flags (``overrides``; ``None`` means "not given")."""
    values = env_values(os.environ if environ is None else environ)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for required, var in (("function", c.ENV_FUNCTION), ("queue", c.ENV_QUEUE)):
        if not values.get(required):
            raise SettingsError(f"{required} is required: pass --{required} or set {var}")
    return WorkerSettings(**values)


def _problems(s: WorkerSettings) -> list[str]:
    out: list[str] = []
    if not FUNCTION_REF.match(s.function):
        out.append(f"function {s.function!r} {c.FUNCTION_PROBLEM}")
    if not QUEUE_NAME.match(s.queue):
        out.append(f"queue {s.queue!r} {c.QUEUE_PROBLEM}")
    if not s.namespace or "}" in s.namespace or "{" in s.namespace:
        out.append(f"namespace {s.namespace!r} must be non-empty and free of braces")
    if s.broker not in ("redis", "rabbitmq", "kafka"):
        out.append(f"broker {s.broker!r} must be redis, rabbitmq or kafka")
    if s.broker != "redis" and not s.broker_url:
        out.append(f"broker {s.broker} needs a broker URL ({c.ENV_BROKER_URL})")
    if s.rabbitmq_queue_type not in rabbitmq_topology.QUEUE_TYPES:
        out.append(
            f"rabbitmq queue type {s.rabbitmq_queue_type!r} ({c.ENV_RABBITMQ_QUEUE_TYPE}) must be one of "
            + ", ".join(rabbitmq_topology.QUEUE_TYPES)
        )
    if not (s.qps >= 0 and math.isfinite(s.qps)):
        out.append(f"qps must be >= 0 (0 = unlimited), got {s.qps}")
    if s.qps_burst < 0:
        out.append("qps burst must be >= 0")
    if not 0 < s.qps_slot_tolerance <= 1:
        out.append("qps slot tolerance must be between 0 and 1 second")
    if not 0.001 <= s.qps_horizon <= 10:
        out.append("qps horizon must be between 0.001 and 10 seconds")
    if s.concurrency < 1:
        out.append("concurrency must be >= 1")
    if s.concurrency_mode not in c.CONCURRENCY_MODES:
        out.append(
            f"concurrency mode {s.concurrency_mode!r} ({c.ENV_CONCURRENCY_MODE}) must be one of "
            + ", ".join(c.CONCURRENCY_MODES)
        )
    if s.max_attempts < 1:
        out.append("max attempts must be >= 1")
    if s.backoff_seconds < 0 or s.max_backoff_seconds < s.backoff_seconds:
        out.append("backoff must be >= 0 and max backoff >= backoff")
    if s.timeout_seconds <= 0:
        out.append("timeout must be > 0")
    if s.max_message_age_seconds < 0:
        out.append("max message age must be >= 0 (0 = no limit)")
    if s.heartbeat_seconds <= 0:
        out.append("heartbeat interval must be > 0")
    if c.lease_too_short(s.lease_seconds, s.heartbeat_seconds):
        out.append("lease must be at least twice the heartbeat interval, so a renewal can miss once")
    if not 0 <= s.metrics_port <= 65535:
        out.append("metrics port must be 0-65535 (0 disables)")
    if s.log_format not in ("json", "console"):
        out.append("log format must be json or console")
    if s.log_level.upper() not in LOG_LEVELS:
        out.append(f"log level {s.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    if s.fetch_batch < 1:
        out.append("fetch batch must be >= 1")
    if not (1 <= s.result_ttl_seconds <= 7 * 86400):
        out.append(f"result TTL ({c.ENV_RESULT_TTL}) must be 1 s to 7 days, got {s.result_ttl_seconds}")
    return out
