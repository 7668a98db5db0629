"""Operator-wide configuration: command-line flags, each with an environment variable fallback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from sluiceway import contract

from .manifests import OperatorSettings
from .spec import SecretKeyRef

ENV_PREFIX = "SLUICEWAY_OPERATOR_"
# How often a TaskQueue's loop re-reads the Secrets it uses (the coordination URL, and the
# resourceVersions that roll the pods when a Secret changes): a rotation rolls within this.
SECRET_REFRESH_INTERVAL = 60.0
# How long a backlog may have no live worker before the TaskQueue turns Degraded (NoLiveWorkers):
# new pods must pull their image and start first. Clusters whose images start in seconds can
# shorten it; a TaskQueue whose liveness window is longer gets that instead.
NO_LIVE_WORKERS_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    namespaces: tuple[str, ...] = ()  # empty = all namespaces
    default_secret: SecretKeyRef | None = field(
        default_factory=lambda: SecretKeyRef("sluiceway-redis", "url")
    )
    min_poll_interval: float = 0.5  # a floor under spec.scaling.pollIntervalSeconds, to protect the API
    max_backoff: float = 60.0  # cap of a failing TaskQueue's retry delay
    http_port: int = 8080  # /healthz and /metrics; 0 = off
    worker_metrics_port: int = contract.DEFAULT_METRICS_PORT
    log_format: str = "json"
    log_level: str = "INFO"
    finalizer_timeout: float = 60.0  # after this, deletion proceeds without the Redis cleanup
    secret_refresh_interval: float = SECRET_REFRESH_INTERVAL
    no_live_workers_grace: float = NO_LIVE_WORKERS_GRACE

    def operator_settings(self) -> OperatorSettings:
        return OperatorSettings(
            default_coordination_secret=self.default_secret,
            metrics_port=self.worker_metrics_port,
            log_format=self.log_format,
            log_level=self.log_level,
        )


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _secret(value: str) -> SecretKeyRef | None:
    if not value:
        return None
    name, _, key = value.partition(":")
    return SecretKeyRef(name=name, key=key or "url")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="sluiceway-operator",
        description="The Sluiceway operator: TaskQueue -> worker Deployment, QPS-aware autoscaling.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help=f"watch this namespace (repeatable; globs allowed) [{ENV_PREFIX}NAMESPACES, comma-separated]",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    p.add_argument(
        "--default-redis-secret",
        default=_env("DEFAULT_REDIS_SECRET", "sluiceway-redis:url"),
        help="NAME[:KEY] of the Secret, in each TaskQueue's namespace, with the coordination Redis URL "
        "for TaskQueues that name none; '' = none [%(default)s]",
    )
    p.add_argument(
        "--min-poll-interval",
        type=float,
        default=float(_env("MIN_POLL_INTERVAL", "0.5")),
        help="floor under spec.scaling.pollIntervalSeconds, seconds [%(default)s]",
    )
    p.add_argument("--max-backoff", type=float, default=float(_env("MAX_BACKOFF", "60")))
    p.add_argument(
        "--http-port",
        type=int,
        default=int(_env("HTTP_PORT", "8080")),
        help="port of /healthz and /metrics; 0 = off [%(default)s]",
    )
    p.add_argument(
        "--worker-metrics-port",
        type=int,
        default=int(_env("WORKER_METRICS_PORT", str(contract.DEFAULT_METRICS_PORT))),
        help="the workers' metrics and readiness port; 0 = no endpoint and no readiness probe "
        "(for a host-network test cluster) [%(default)s]",
    )
    p.add_argument("--log-format", choices=("json", "console"), default=_env("LOG_FORMAT", "json"))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    p.add_argument("--finalizer-timeout", type=float, default=float(_env("FINALIZER_TIMEOUT", "60")))
    p.add_argument(
        "--secret-refresh-interval",
        type=float,
        default=float(_env("SECRET_REFRESH_INTERVAL", str(SECRET_REFRESH_INTERVAL))),
        help="re-read the Secrets a TaskQueue uses this often, seconds; a changed one rolls "
        "the pods within it [%(default)s]",
    )
    p.add_argument(
        "--no-live-workers-grace",
        type=float,
        default=float(_env("NO_LIVE_WORKERS_GRACE", str(NO_LIVE_WORKERS_GRACE))),
        help="a backlog with no live worker for this long turns the TaskQueue Degraded "
        "(NoLiveWorkers), seconds; at least 3 missed heartbeats [%(default)s]",
    )
    a = p.parse_args(argv)
    if a.no_live_workers_grace < 0:
        p.error(f"--no-live-workers-grace must be >= 0, got {a.no_live_workers_grace:g}")
    if a.secret_refresh_interval <= 0:
        p.error(f"--secret-refresh-interval must be > 0, got {a.secret_refresh_interval:g}")
    namespaces: tuple[str, ...] = ()
    if a.namespace:
        namespaces = tuple(a.namespace)
    elif not a.all_namespaces and _env("NAMESPACES", ""):
        namespaces = tuple(n.strip() for n in _env("NAMESPACES", "").split(",") if n.strip())
    return Config(
        namespaces=namespaces,
        default_secret=_secret(a.default_redis_secret),
        min_poll_interval=a.min_poll_interval,
        max_backoff=a.max_backoff,
        http_port=a.http_port,
        worker_metrics_port=a.worker_metrics_port,
        log_format=a.log_format,
        log_level=a.log_level,
        finalizer_timeout=a.finalizer_timeout,
        secret_refresh_interval=a.secret_refresh_interval,
        no_live_workers_grace=a.no_live_workers_grace,
    )
