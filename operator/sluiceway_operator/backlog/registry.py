"""The one switch from a broker type to its backlog source. Each broker's module
(``sluiceway_operator.backlog.<type>``) is imported when first used and provides::

    def source(*, namespace: str, queue: str, coordination: redis.Redis, broker_url: str) -> BacklogSource

``coordination`` is the coordination Redis client (heartbeats, the rate limiter, Redis queues);
``broker_url`` is the broker's own URL (the coordination URL for Redis).
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from .base import BacklogSource

BROKERS: Final = ("redis", "rabbitmq", "kafka")


class SourceUnavailableError(RuntimeError):
    """No backlog source for this broker in this build, or its client library is missing."""


def source(broker: str, *, namespace: str, queue: str, coordination: Any, broker_url: str) -> BacklogSource:
    if broker not in BROKERS:
        raise SourceUnavailableError(f"broker {broker!r} must be one of {', '.join(BROKERS)}")
    name = f"{__package__}.{broker}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise SourceUnavailableError(
                f"the operator has no {broker} backlog source in this version"
            ) from None
        raise SourceUnavailableError(f"the {broker} backlog source needs {exc.name}: {exc}") from None
    result: BacklogSource = mod.source(
        namespace=namespace, queue=queue, coordination=coordination, broker_url=broker_url
    )
    return result
