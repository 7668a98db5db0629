"""Sluiceway: run Python functions as queue workers with an exact fleet-wide QPS limit.

Public API::

    import sluiceway
    sluiceway.publish("thumbnails", {"path": "a.png"})            # sync
    await sluiceway.publish_async("thumbnails", {"path": "a.png"})  # asyncio
    sluiceway.publish_batch("thumbnails", [{"path": "a.png"}, ...])

    def make_thumbnail(path: str) -> None:
        if not path.endswith(".png"):
            raise sluiceway.Reject("not a PNG")  # dead-letter at once, no retries

Importing this package is cheap: a publisher loads its broker's client library when it is first
built, and the worker engine never loads here. The import-linter
contracts in ``pyproject.toml`` keep it so.
"""

from __future__ import annotations

__version__ = "0.1.0"

from sluiceway.errors import Reject, RetryLater
from sluiceway.publish import AsyncPublisher, Publisher, publish, publish_async, publish_batch

__all__ = [
    "AsyncPublisher",
    "Publisher",
    "Reject",
    "RetryLater",
    "__version__",
    "publish",
    "publish_async",
    "publish_batch",
]
