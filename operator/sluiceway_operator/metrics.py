"""Prometheus metrics of the operator, served with /healthz on one port."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY: Final = CollectorRegistry(auto_describe=True)

DECISIONS: Final = Counter(
    "sluiceway_operator_decisions",
    "Scaling decisions that changed the replica count, by the bound that decided",
    ["namespace", "taskqueue", "reason"],
    registry=REGISTRY,
)
DESIRED: Final = Gauge(
    "sluiceway_operator_desired_replicas",
    "Replicas last decided",
    ["namespace", "taskqueue"],
    registry=REGISTRY,
)
CURRENT: Final = Gauge(
    "sluiceway_operator_current_replicas",
    "The worker Deployment's spec.replicas when last observed",
    ["namespace", "taskqueue"],
    registry=REGISTRY,
)
BACKLOG: Final = Gauge(
    "sluiceway_operator_backlog",
    "Messages waiting, as last observed",
    ["namespace", "taskqueue"],
    registry=REGISTRY,
)
LAST_REASON: Final = Gauge(
    "sluiceway_operator_last_decision_info",
    "1 for the reason of the latest decision (changed or not), 0 for the others seen",
    ["namespace", "taskqueue", "reason"],
    registry=REGISTRY,
)
DECISION_LATENCY: Final = Histogram(
    "sluiceway_operator_decision_seconds",
    "One tick: observe Redis, decide, apply and patch status",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
ERRORS: Final = Counter(
    "sluiceway_operator_errors",
    "Failed ticks by reason (SecretMissing, RedisUnreachable, ApiError, ...)",
    ["namespace", "taskqueue", "reason"],
    registry=REGISTRY,
)
REQUEUED: Final = Counter(
    "sluiceway_operator_requeued_messages",
    "Leases of deleted worker pods returned to the queue",
    ["namespace", "taskqueue"],
    registry=REGISTRY,
)
STATUS_WRITES: Final = Counter(
    "sluiceway_operator_status_writes", "Status patches sent", ["namespace", "taskqueue"], registry=REGISTRY
)


def record_reason(namespace: str, taskqueue: str, reason: str, previous: str | None) -> None:
    if previous and previous != reason:
        LAST_REASON.labels(namespace, taskqueue, previous).set(0)
    LAST_REASON.labels(namespace, taskqueue, reason).set(1)


def forget(namespace: str, taskqueue: str) -> None:
    """Drop a deleted TaskQueue's series so 1,000 churned TaskQueues do not leak memory."""
    for metric in (DESIRED, CURRENT, BACKLOG):
        with contextlib.suppress(KeyError):
            metric.remove(namespace, taskqueue)
    for labelled in (DECISIONS, LAST_REASON, ERRORS):
        for labels in list(labelled._metrics):  # prometheus_client has no public "remove matching"
            if labels[:2] == (namespace, taskqueue):
                labelled.remove(*labels)


StatusSource = Callable[[], Iterable[tuple[str, str, Mapping[str, Any]]]]


class StatusCollector(Collector):
    """Each TaskQueue's last written status, at scrape time: what the chart's alerts read.

    ``source`` yields (namespace, name, status); the series follow the status the operator wrote,
    so an alert and ``kubectl get tq`` never disagree.
    """

    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily(
            "sluiceway_taskqueue_live_workers",
            "Workers heartbeating, from the TaskQueue's status.liveWorkers",
            labels=["namespace", "taskqueue"],
        )
        conds = GaugeMetricFamily(
            "sluiceway_taskqueue_condition",
            "1 for each condition in the TaskQueue's status, by type, status and reason",
            labels=["namespace", "taskqueue", "type", "status", "reason"],
        )
        for namespace, name, status in self.source():
            if "liveWorkers" in status:
                live.add_metric([namespace, name], float(status["liveWorkers"]))
            for c in status.get("conditions") or []:
                labels = [
                    namespace,
                    name,
                    str(c.get("type", "")),
                    str(c.get("status", "")),
                    str(c.get("reason", "")),
                ]
                conds.add_metric(labels, 1.0)
        yield live
        yield conds


class HttpServer:
    """``/healthz`` (200 once the operator is up) and ``/metrics``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.healthy = False
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok" if self.healthy else "starting")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
