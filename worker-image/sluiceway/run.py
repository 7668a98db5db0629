"""Process entry point of a worker: settings, logging, metrics, then the worker loop."""

from __future__ import annotations

import faulthandler
import random
import signal
import sys
import threading
from types import FrameType
from typing import Any

from sluiceway import wiring
from sluiceway.log import configure, get_logger
from sluiceway.metrics import serve
from sluiceway.results_redis import ResultWriter
from sluiceway.settings import SettingsError, from_env
from sluiceway.transports import registry
from sluiceway.transports.base import BrokerUnavailableError, WorkerSide
from sluiceway.worker import ExitCode, Worker, load_function, outage_backoff

# The warning each failed start logs; tests and operators' log searches look for it.
START_RETRY_EVENT = "broker or Redis unreachable at start; retrying"


def run_worker(overrides: dict[str, Any]) -> int:
    try:
        settings = from_env(**overrides)
    except SettingsError as exc:
        print(f"sluiceway worker: invalid settings: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    configure(fmt=settings.log_format, level=settings.log_level)
    log = get_logger(queue=settings.queue, worker=settings.effective_worker_id)
    # `kill -USR1` prints every thread's stack to stderr (the pod's log) and the worker goes on:
    # what a worker that does not stop, or does not progress, waits on. A C-level handler, so it
    # answers while a stuck client call holds the GIL, where a Python handler could not run.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        function = load_function(settings.function)
    except ImportError as exc:
        log.error("cannot load the task function", function=settings.function, error=str(exc))
        return ExitCode.IMPORT
    try:
        side = _open_side(settings, log)
    except BrokerUnavailableError as exc:
        log.error("broker not available", broker=settings.broker, error=str(exc))
        return ExitCode.USAGE
    if side is None:
        return ExitCode.OK
    try:
        worker = Worker(
            settings,
            function,
            side,
            results=ResultWriter(settings.redis_url, settings.result_ttl_seconds),
        )
    except ValueError as exc:
        side.close()
        log.error("invalid worker configuration", error=str(exc))
        return ExitCode.USAGE
    if settings.metrics_port:
        try:
            serve(
                worker.metrics.registry,
                settings.metrics_host,
                settings.metrics_port,
                lambda: worker.fatal is None,
            )
        except OSError as exc:
            log.error("cannot serve metrics", port=settings.metrics_port, error=str(exc))
            side.close()
            return ExitCode.USAGE
    try:
        return int(worker.run())
    finally:
        side.close()


def _open_side(settings: Any, log: Any) -> WorkerSide | None:
    """The worker's side, once its broker answers; ``None`` if a stop signal came first.

    A pod may start while its broker is down or still starting (a RabbitMQ node restarting, a
    Kafka broker electing its coordinator). That is an outage, retried here with the back-off the
    running worker uses, not a crash: a crash would put the pod in CrashLoopBackOff, whose delay
    grows to minutes after the broker is back. A wrong scheme or a missing client library is not
    an outage and still fails at once (:class:`BrokerUnavailableError`)."""
    mod = registry.module(settings.broker)
    outages = (*getattr(mod, "outage_errors", ()), *registry.module("redis").outage_errors)
    stopping = threading.Event()
    restore: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            restore[sig] = signal.signal(sig, on_signal)
    try:
        failures = 0
        while True:
            try:
                side = wiring.worker_side(settings, settings.effective_worker_id)
            except outages as exc:
                failures += 1
                delay = outage_backoff(failures, draw=random.random())
                log.warning(
                    START_RETRY_EVENT,
                    broker=settings.broker,
                    error=f"{type(exc).__name__}: {exc}",
                    attempt=failures,
                    retry_in=round(delay, 2),
                )
                if stopping.wait(delay):
                    log.info("stopped before the broker answered", broker=settings.broker, attempts=failures)
                    return None
                continue
            if stopping.is_set():
                side.close()
                return None
            if failures:
                log.info(
                    "the broker is reachable; starting", broker=settings.broker, failed_attempts=failures
                )
            return side
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
