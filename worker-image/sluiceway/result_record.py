"""The result record of a call: what a worker writes to a reply key, and how a caller reads it.
Pure: no I/O.

A record is one JSON object, the same for every broker::

    {"key": "<reply key>", "ok": true, "value": <the function's return value>}
    {"key": "<reply key>", "ok": false, "reason": "error", "type": "ValueError", "message": "..."}

It names its reply key, so one pub/sub channel can carry the results of many calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from sluiceway.deadletter import safe_text
from sluiceway.errors import RemoteError


class ResultSink(Protocol):
    """Where a worker writes the records of settled calls: ``(reply key, record)`` pairs, in one
    batch per round trip; raises the coordination Redis's outage errors."""

    def write(self, records: Sequence[tuple[str, bytes]]) -> None: ...

    def close(self) -> None: ...


MAX_MESSAGE_CHARS = 2000  # an exception's text in a record; a traceback stays in the dead letter


def success(key: str, value: Any) -> bytes:
    """The record of a returned value; a value JSON cannot carry becomes a failure record
    (reason ``unserialisable_result``), never an error in the worker."""
    try:
        return _dump({"key": key, "ok": True, "value": value})
    except (TypeError, ValueError, RecursionError) as exc:
        return failure(key, "unserialisable_result", type(exc).__name__, f"the return value: {exc}")


def failure(key: str, reason: str, type_name: str | None, message: str) -> bytes:
    body: dict[str, Any] = {
        "key": key,
        "ok": False,
        "reason": reason,
        "type": type_name,
        "message": safe_text(message)[:MAX_MESSAGE_CHARS],
    }
    return _dump(body)


def parse(raw: bytes | str) -> dict[str, Any]:
    """Decode a record; raises ``ValueError`` when it is not one."""
    body = json.loads(raw)
    if not isinstance(body, dict) or not isinstance(body.get("key"), str) or "ok" not in body:
        raise ValueError("not a result record")
    return body


def outcome(record: dict[str, Any]) -> Any:
    """The value of a parsed record, or raise :class:`RemoteError` for a failure record."""
    if record["ok"] is True:
        return record.get("value")
    raise RemoteError(
        str(record.get("reason") or "error"),
        record.get("type") if isinstance(record.get("type"), str) else None,
        str(record.get("message") or ""),
    )


def _dump(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate in a returned string travels as a \u escape
        return json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def for_outcome(
    key: str, *, ok: bool, value: Any, reason: str, error: BaseException | None, dead_entry: bytes
) -> bytes:
    """The record a worker writes when a call's message settles for good: acked (``ok``) or
    dead-lettered with ``reason``. The message is the exception's, else the dead letter's detail
    (a message refused before it ran: bad arguments, expired, redelivered too often)."""
    if ok:
        return success(key, value)
    if error is not None:
        try:
            text = str(error)
        except Exception:
            text = "<the exception could not be shown>"
        return failure(key, reason, type(error).__name__, text)
    try:
        detail = json.loads(dead_entry).get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    return failure(key, reason, None, str(detail))
