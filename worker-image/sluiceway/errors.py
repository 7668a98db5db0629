"""Exceptions a task function raises to steer what happens to its message. Pure: no I/O imports,
so ``import sluiceway`` stays cheap."""

from __future__ import annotations


class Reject(Exception):  # noqa: N818 - the name reads as an action in user code: raise Reject(...)
    """Raise from a task to dead-letter its message at once, without retries."""


class RetryLater(Exception):  # noqa: N818
    """Raise from a task to retry after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay


class RemoteError(Exception):
    """A called task failed for good (it was dead-lettered), raised by ``sluiceway.call``.

    ``reason`` is the dead-letter reason (``error``, ``timeout``, ``rejected``, ``bad_arguments``,
    ``unserialisable_result``, ...); ``type`` and ``message`` are the exception's, when there was one.
    """

    def __init__(self, reason: str, type_name: str | None, message: str) -> None:
        super().__init__(f"{reason}: {type_name}: {message}" if type_name else f"{reason}: {message}")
        self.reason = reason
        self.type = type_name
        self.message = message
