"""The dead-letter record: one JSON object per dead message, the same on every broker. Pure.

It keeps the payload byte for byte, so a replay runs the same message: as text under
``payload`` when the bytes are valid UTF-8, else base64 under ``payload_b64``. Every other text
(details, errors, tracebacks) is made valid Unicode first: a lone surrogate in an exception's
message must never stop a message from reaching the dead-letter queue.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any


def safe_text(text: str) -> str:
    """``text`` with lone surrogates spelled as ``\\udXXX`` escapes: always encodable."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def payload_fields(payload: bytes) -> dict[str, str]:
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_b64": base64.b64encode(payload).decode("ascii")}


def record(*, reason: str, detail: str, payload: bytes, **context: Any) -> bytes:
    """The record's bytes. ``context`` holds the rest (queue, worker, attempts, errors, ...);
    strings in it, and in lists of it, are made safe."""
    body: dict[str, Any] = {"reason": reason, "detail": safe_text(detail)}
    for k, v in context.items():
        if isinstance(v, str):
            v = safe_text(v)
        elif isinstance(v, list | tuple):
            v = [safe_text(x) if isinstance(x, str) else x for x in v]
        body[k] = v
    body.update(payload_fields(payload))
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def payload_of(entry: Mapping[str, Any]) -> bytes:
    """The original payload of a decoded record; raises ``ValueError`` when it has none."""
    if isinstance(entry.get("payload_b64"), str):
        try:
            return base64.b64decode(entry["payload_b64"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"payload_b64 is not base64: {exc}") from None
    if isinstance(entry.get("payload"), str):
        return str(entry["payload"]).encode("utf-8")
    raise ValueError("the record has no payload")
