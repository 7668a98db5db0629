"""Sluiceway: run Python functions as queue workers with an exact fleet-wide QPS limit.

Public API::

    import sluiceway
    sluiceway.publish("thumbnails", {"path": "a.png"})            # sync
    await sluiceway.publish_async("thumbnails", {"path": "a.png"})  # asyncio
    sluiceway.publish_batch("thumbnails", [{"path": "a.png"}, ...])
    size = sluiceway.call("thumbnails", {"path": "a.png"}, timeout=30)          # wait for the result
    size = await sluiceway.call_async("thumbnails", {"path": "a.png"}, timeout=30)
    handle = sluiceway.submit("thumbnails", {"path": "a.png"})  # publish now, ask for the result later

    def make_thumbnail(path: str) -> None:
        if not path.endswith(".png"):
            raise sluiceway.Reject("not a PNG")  # dead-letter at once, no retries

Importing this package is cheap: a publisher loads its broker's client library when it is first
built, and the worker engine never loads here. The import-linter
contracts in ``pyproject.toml`` keep it so.
"""

from __future__ import annotations

__version__ = "0.1.0"

from sluiceway.errors import Reject, RemoteError, RetryLater
from sluiceway.publish import AsyncPublisher, Publisher, publish, publish_async, publish_batch
from sluiceway.results import Handle, call, call_async, submit, submit_async

__all__ = [
    "AsyncPublisher",
    "Handle",
    "Publisher",
    "Reject",
    "RemoteError",
    "RetryLater",
    "__version__",
    "call",
    "call_async",
    "publish",
    "publish_async",
    "publish_batch",
    "submit",
    "submit_async",
]
