"""What a process-mode child sends back to its pod for one task. Pure: no I/O.

The pod sends a child the message's payload as it came from the broker (the child decodes it
with :mod:`sluiceway.codec`); the child answers with one JSON object::

    {"ok": true, "value": <the return value, only when the message is a call>}
    {"ok": true, "unencodable": "Widget"}  (a call's value JSON cannot carry: its type's name)
    {"ok": false, "kind": "error" | "reject" | "retry_later", "type": "ValueError",
     "message": "...", "traceback": "...", "delay": 2.5}

The pod turns a reply back into what a thread-mode task would have given: the value, or an
exception whose type name, text and steering class (:class:`Reject`, :class:`RetryLater`) are
the original's, so retries, dead letters and call results read the same in every mode.
"""

from __future__ import annotations

import json
import math
import traceback
from typing import Any, Final

from sluiceway.errors import Reject, RetryLater

READY: Final = b'{"ready":true}'  # a child's first words: the function is imported
MAX_TRACEBACK_CHARS = 4000  # what the dead letter keeps of a traceback, as in thread mode


# The attribute of a rebuilt exception that holds the child's traceback, for the dead letter.
CHILD_TRACEBACK: Final = "child_traceback"


class ChildError(Exception):
    """An exception raised by the function in a child, rebuilt in the pod under its type name."""


_named: dict[str, type[ChildError]] = {}
_NAMED_MAX = 1000  # classes kept for reuse; a function raising ever new type names costs no memory


def ok_reply(value: Any, *, keep_value: bool) -> bytes:
    """The reply for a function that returned ``value``; only a call's value travels."""
    if not keep_value:
        return _dump({"ok": True})
    try:
        return _dump({"ok": True, "value": value})
    except (TypeError, ValueError, RecursionError):
        return _dump({"ok": True, "unencodable": type(value).__name__})


def error_reply(exc: BaseException) -> bytes:
    """The reply for a function that raised ``exc``; never raises."""
    kind = "reject" if isinstance(exc, Reject) else "retry_later" if isinstance(exc, RetryLater) else "error"
    body: dict[str, Any] = {
        "ok": False,
        "kind": kind,
        "type": type(exc).__name__,
        "message": _text(exc),
        "traceback": _traceback(exc),
    }
    if isinstance(exc, RetryLater):
        delay = exc.delay
        # A delay that is not a finite number gets the usual backoff in the pod, as in thread mode.
        ok_number = isinstance(delay, int | float) and not isinstance(delay, bool) and math.isfinite(delay)
        body["delay"] = float(delay) if ok_number else None
    return _dump(body)


def parse_reply(raw: bytes) -> tuple[Any, BaseException | None]:
    """``(value, None)`` or ``(None, exception)``; raises ``ValueError`` for a malformed reply."""
    body = json.loads(raw)
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        raise ValueError("a child's reply must be an object with a boolean 'ok'")
    if body["ok"]:
        if "unencodable" in body:
            # An instance of a class of the same name: the result record's encoder then fails on
            # it exactly as it fails on the original in thread mode (unserialisable_result).
            return type(str(body["unencodable"]), (), {})(), None
        return body.get("value"), None
    message = str(body.get("message", ""))
    kind = body.get("kind")
    error: Exception
    if kind == "reject":
        error = Reject(message)
    elif kind == "retry_later":
        delay = body.get("delay")
        error = RetryLater(delay if isinstance(delay, int | float) else math.nan, message)
    else:
        error = rebuilt(str(body.get("type") or "Exception"), message)
    setattr(error, CHILD_TRACEBACK, str(body.get("traceback", "")))
    return None, error


def rebuilt(type_name: str, message: str) -> ChildError:
    """A :class:`ChildError` whose class is named ``type_name``, carrying ``message``."""
    cls = _named.get(type_name)
    if cls is None:
        cls = type(type_name, (ChildError,), {})
        if len(_named) < _NAMED_MAX:
            _named[type_name] = cls
    return cls(message)


def _dump(body: dict[str, Any]) -> bytes:
    # ASCII escapes: a lone surrogate in a value or a message crosses the pipe exactly.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<the exception could not be shown>"


def _traceback(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc)[-8:])[-MAX_TRACEBACK_CHARS:]
    except Exception:
        return ""
