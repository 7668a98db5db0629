"""Prometheus metrics of one worker process, plus /healthz, on one small HTTP server.

Per-message figures are kept as plain counters and bucket arrays and turned into metric families
only when Prometheus scrapes: prometheus_client's own objects take a lock per update, which cost
more than a fast task itself.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class _Histogram:
    """Bucket counts without a lock: each update is one list item increment under the GIL, and a
    scrape that reads mid-update is off by one observation at most."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=list(labels))
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        fam.add_metric(list(labels.values()), buckets, self.total)
        return fam


_OK = ("ok", "")  # the (outcome, reason) of a message that succeeded


class WorkerMetrics:
    def __init__(self, taskqueue: str, queue: str) -> None:
        self.labels = {"taskqueue": taskqueue, "queue": queue}
        self.outcomes: Tally[tuple[str, str]] = Tally()
        self.duration = _Histogram(DURATION_BUCKETS)
        self.start_lag = _Histogram(LAG_BUCKETS)
        self.busy = 0
        self.in_flight = 0
        self.reslotted = 0
        self.round_trips: Callable[[], int] = lambda: 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def observe(self, duration: float | None, outcome: str, reason: str = "") -> None:
        self.outcomes[(outcome, reason)] += 1
        if duration is not None:
            self.duration.observe(duration)

    def observe_ok(self, durations: list[float]) -> None:
        """``observe(duration, "ok")`` for each of ``durations``: the worker folds its successes
        in once per round trip, since a call per message cost more than the bookkeeping itself."""
        self.outcomes[_OK] += len(durations)
        d = self.duration
        counts, bounds = d.counts, d.bounds
        # Bucketed from the sorted figures, one search per bucket rather than one per figure:
        # the sort is in C, and a loop of bisects per message was a twentieth of a no-op task's
        # CPU. A figure equal to a bound counts in that bound's bucket, as bisect_left places it.
        ordered = sorted(durations)
        below = 0
        for i, bound in enumerate(bounds):
            upto = bisect.bisect_right(ordered, bound)
            counts[i] += upto - below
            below = upto
        counts[len(bounds)] += len(ordered) - below
        d.total += sum(durations)

    def set_state(self, *, busy: int, in_flight: int) -> None:
        self.busy = busy
        self.in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())
        messages = CounterMetricFamily(
            "sluiceway_messages",
            "Messages finished by this worker, by outcome (ok, retried, dead_lettered) and reason.",
            labels=[*names, "outcome", "reason"],
        )
        for (outcome, reason), count in sorted(self.outcomes.items()):
            messages.add_metric([*values, outcome, reason], count)
        yield messages
        yield self.duration.family(
            "sluiceway_task_duration_seconds", "Run time of the task function.", self.labels
        )
        yield self.start_lag.family(
            "sluiceway_start_lag_seconds",
            "How late a task started after its rate-limit slot (scheduling latency; never negative).",
            self.labels,
        )
        reslotted = CounterMetricFamily(
            "sluiceway_reslotted_tasks",
            "Tasks whose rate-limit slot went stale while the process stalled, and took a fresh one.",
            labels=names,
        )
        reslotted.add_metric(values, self.reslotted)
        yield reslotted
        round_trips = CounterMetricFamily(
            "sluiceway_redis_round_trips",
            "Requests this worker sent to Redis, each one round trip, counted at the connection.",
            labels=names,
        )
        round_trips.add_metric(values, self.round_trips())
        yield round_trips
        busy = GaugeMetricFamily("sluiceway_busy_tasks", "Tasks running now.", labels=names)
        busy.add_metric(values, self.busy)
        yield busy
        held = GaugeMetricFamily(
            "sluiceway_in_flight_messages", "Leases held: running plus waiting for their slot.", labels=names
        )
        held.add_metric(values, self.in_flight)
        yield held


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
