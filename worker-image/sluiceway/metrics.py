"""Prometheus metrics of one worker process, plus /healthz, on one small HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    def __init__(self, taskqueue: str, queue: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"taskqueue": taskqueue, "queue": queue}
        self.messages = Counter(
            "sluiceway_messages",
            "Messages finished by this worker, by outcome (ok, retried, dead_lettered) and reason.",
            ["taskqueue", "queue", "outcome", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sluiceway_task_duration_seconds",
            "Run time of the task function.",
            ["taskqueue", "queue"],
            buckets=_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.busy = Gauge(
            "sluiceway_busy_tasks", "Tasks running now.", ["taskqueue", "queue"], registry=self.registry
        ).labels(**labels)
        self.in_flight = Gauge(
            "sluiceway_in_flight_messages",
            "Leases held: running plus waiting for their rate-limit slot.",
            ["taskqueue", "queue"],
            registry=self.registry,
        ).labels(**labels)
        self.start_lag = Histogram(
            "sluiceway_start_lag_seconds",
            "How late a task started after its rate-limit slot (scheduling latency; never negative).",
            ["taskqueue", "queue"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=self.registry,
        ).labels(**labels)
        self._ok = self.messages.labels(taskqueue=taskqueue, queue=queue, outcome="ok", reason="")
        self._labels = labels

    def observe(self, duration: float | None, outcome: str, reason: str = "") -> None:
        if outcome == "ok":
            self._ok.inc()
        else:
            self.messages.labels(**self._labels, outcome=outcome, reason=reason).inc()
        if duration is not None:
            self.duration.observe(duration)

    def set_state(self, *, busy: int, in_flight: int) -> None:
        self.busy.set(busy)
        self.in_flight.set(in_flight)


def serve(
    registry: CollectorRegistry, host: str, port: int, healthy: Callable[[], bool]
) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz in a daemon thread; returns the server (``server_port`` is bound)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                ok = healthy()
                body, status, ctype = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the structured log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sluiceway-metrics", daemon=True).start()
    return server
