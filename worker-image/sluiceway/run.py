"""Process entry point of a worker: settings, logging, metrics, then the worker loop."""

from __future__ import annotations

import sys
from typing import Any

from sluiceway import wiring
from sluiceway.log import configure, get_logger
from sluiceway.metrics import serve
from sluiceway.results_redis import ResultWriter
from sluiceway.settings import SettingsError, from_env
from sluiceway.transports.base import BrokerUnavailableError
from sluiceway.worker import ExitCode, Worker, load_function


def run_worker(overrides: dict[str, Any]) -> int:
    try:
        settings = from_env(**overrides)
    except SettingsError as exc:
        print(f"sluiceway worker: invalid settings: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    configure(fmt=settings.log_format, level=settings.log_level)
    log = get_logger(queue=settings.queue, worker=settings.effective_worker_id)
    try:
        function = load_function(settings.function)
    except ImportError as exc:
        log.error("cannot load the task function", function=settings.function, error=str(exc))
        return ExitCode.IMPORT
    try:
        side = wiring.worker_side(settings, settings.effective_worker_id)
    except BrokerUnavailableError as exc:
        log.error("broker not available", broker=settings.broker, error=str(exc))
        return ExitCode.USAGE
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
