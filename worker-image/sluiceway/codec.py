"""Message codec: pure functions between wire bytes and a decoded message.

On the wire a message is a JSON object of the function's keyword arguments, so any language can
publish one. Optional metadata travels under :data:`sluiceway.contract.META_KEY`. A plain kwargs
object with no metadata is always valid.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import orjson

from sluiceway.contract import META_KEY, REPLY_PREFIX, reply_channel_of


class DecodeError(ValueError):
    """The payload is not a Sluiceway message; ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Meta:
    """Message metadata. ``attempt`` counts the executions already tried (0 for a new message)."""

    id: str | None = None
    published_at: float | None = None  # unix seconds, set by the publisher
    attempt: int = 0
    trace: str | None = None
    # Reasons of earlier failed attempts, newest last, so the dead-letter entry tells the story.
    errors: tuple[str, ...] = ()
    # The reply key of a call (see ``contract.reply_key``): the worker writes the outcome there.
    reply: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    kwargs: dict[str, Any]
    meta: Meta = field(default_factory=Meta)


MAX_ERRORS_KEPT = 5

# The deepest nesting a message may have, counting its own object as level 1, the same at decode
# and encode. The stdlib's encoder recurses once per level and gives out below ~1,000 levels when
# the caller's stack is already deep (950 failed on an xdist worker): it needs a frame of the
# recursion limit (1,000 by default) per level. 512 fails from a stack 500 frames deep; at 256 a
# decoded message is encoded again for its retry from a stack of half the limit with room left.
MAX_DEPTH = 256


def new_id() -> str:
    return uuid.uuid4().hex


def encode(kwargs: dict[str, Any], meta: Meta | None = None) -> bytes:
    """Serialize a message. Raises ``TypeError``/``ValueError`` for what JSON cannot carry."""
    if not isinstance(kwargs, dict):
        raise TypeError(f"a message is a dict of keyword arguments, not {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise TypeError(f"keyword argument names must be strings, got {bad!r}")
    if META_KEY in kwargs:
        raise ValueError(f"{META_KEY!r} is reserved for metadata")
    body: dict[str, Any] = dict(kwargs)
    if meta is not None:
        body[META_KEY] = _meta_to_json(meta)
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and other languages' decoders would reject them.
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        # json recurses once per level, so far past the bound it fails by the caller's stack
        # depth; there the bound is what refuses. Within it, the stack really is too deep.
        if _too_deep(body):
            raise ValueError(_DEPTH_LIMIT) from None
        raise
    try:
        data = text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (a "\ud800" escape in the input, or in an exception's text) has no
        # UTF-8 form; as a JSON \u escape it travels exactly and decodes to the same string.
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    # The bound is checked on the bytes decode() reads, by decode()'s own test, so what is encoded
    # decodes again, and an ordinary message pays a length comparison instead of a walk of every
    # value (the walk cost the publish path a few hundred ns a message).
    if _past_bound(data):
        raise ValueError(_DEPTH_LIMIT)
    return data


def decode(payload: bytes | str) -> Message:
    """Parse wire bytes into a :class:`Message` or raise :class:`DecodeError` with the reason."""
    # orjson first, for the bytes a broker delivers: it parses a message in a third of the
    # stdlib's time or less, and what it accepts the stdlib decodes to the same value, except
    # integers past 64 bits, which orjson turns into floats: a payload with a run of 19 digits
    # (such an integer, or a long digit string) goes to the stdlib. So does whatever orjson
    # refuses: the stdlib decodes what it can (1e400 as inf, a lone surrogate escape) and
    # words every error as it always did. Nesting past MAX_DEPTH is refused before either parser
    # runs, so neither one's own limit (orjson 1,024, the stdlib's by the stack) decides.
    if type(payload) is bytes:
        if len(payload) < _DIGIT_RUN:
            fast = True
        else:
            # One translate pass for both guards: counting the brackets on their own cost a
            # text-heavy payload half again its decode. Digits become "0" for the digit-run
            # search and opening brackets are deleted, so the bytes lost count them, strings
            # included: an upper bound of the depth, and only past MAX_DEPTH does the exact,
            # string-aware count run. Nesting MAX_DEPTH deep also takes twice as many bytes.
            # A deleted bracket joins two digit runs only inside a string (or in what is not
            # JSON), which sends the payload to the stdlib: slower, the same outcome.
            marked = payload.translate(_DIGITS, _OPENERS)
            if _past_bound(payload, openers=len(payload) - len(marked)):
                raise DecodeError("invalid_json", _DEPTH_LIMIT)
            fast = _RUN not in marked
        if fast:
            try:
                body = _orjson_loads(payload)
            except _OrjsonError:
                body = _decode_stdlib(payload)
        else:
            body = _decode_stdlib(payload)
    else:
        if _past_bound(payload):
            raise DecodeError("invalid_json", _DEPTH_LIMIT)
        body = _decode_stdlib(payload)
    if type(body) is not dict:
        raise DecodeError(
            "not_an_object", f"expected a JSON object of keyword arguments, got {type(body).__name__}"
        )
    raw_meta = body.pop(META_KEY, None)
    return _new_message(body, _meta_from_json(raw_meta) if raw_meta is not None else _NO_META)


def _decode_stdlib(payload: bytes | str) -> Any:
    """The stdlib's parse of ``payload``, or DecodeError with the reason and json's words."""
    if type(payload) is bytes or isinstance(payload, bytes | bytearray):
        # JSON on the wire is UTF-8 (RFC 8259); json.loads would guess UTF-16/32 from the bytes.
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid_encoding", f"payload is not UTF-8: {exc}") from None
    # The scanner itself when nothing surrounds the object (what every publisher sends): json's
    # decode() adds two frames and two whitespace matches per message. Anything else, and every
    # error, goes through _decode_json, which words the error.
    body: Any = None
    end = -1
    if payload[:1] == "{":
        try:
            body, end = _SCAN(payload, 0)
        except (StopIteration, ValueError, RecursionError):
            end = -1
    if end != len(payload):
        body = _decode_json(payload)
    return body


def _decode_json(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except ValueError as exc:
        raise DecodeError("invalid_json", str(exc)) from None
    except RecursionError:
        # Arrays nested thousands deep: without this, one such message would crash every
        # worker that leased it, instead of going to the dead-letter queue.
        raise DecodeError("invalid_json", "nested too deeply to decode") from None


def next_attempt(message: Message, error: str, *, assign_id: bool = True) -> Message:
    """The message as it is re-queued after a failed attempt."""
    errors = (*message.meta.errors, error[:500])[-MAX_ERRORS_KEPT:]
    meta = replace(
        message.meta,
        attempt=message.meta.attempt + 1,
        errors=errors,
        id=message.meta.id or (new_id() if assign_id else None),
    )
    return replace(message, meta=meta)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_orjson_loads = orjson.loads
_OrjsonError = orjson.JSONDecodeError
# orjson keeps integers from -2**63 to 2**64 - 1 exact: 18 digits always fit, 19 may not
# (-9223372036854775809, found by the codec's tests). The check is translate + a substring
# search, both in C: a regular expression for a digit run took 9 µs on a 1-KB payload, more
# than the parse it guards.
_DIGIT_RUN = 19
_DIGITS = bytes(ord("0") if ord("0") <= i <= ord("9") else ord(" ") for i in range(256))
_RUN = b"0" * _DIGIT_RUN


# A JSON string, escapes included: brackets inside one are not nesting.
_STRING_B = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_STRING_S = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(i for i in range(256) if i not in b"[]{}")
_OPENERS = b"[{"


_DEPTH_LIMIT = f"nesting depth limit: the message is nested deeper than {MAX_DEPTH} levels"


def _past_bound(payload: bytes | str, openers: int | None = None) -> bool:
    """Whether ``payload`` nests deeper than MAX_DEPTH, cheapest test first: nesting that deep
    takes twice as many bytes, and as many opening brackets (strings included, so a count of
    them is an upper bound; ``openers`` when the caller counted them already). Only then the
    exact, string-aware walk."""
    if len(payload) < 2 * MAX_DEPTH:
        return False
    if openers is None:
        if isinstance(payload, str):
            openers = payload.count("[") + payload.count("{")
        else:
            openers = payload.count(b"[") + payload.count(b"{")
    return openers > MAX_DEPTH and _depth_of(payload) > MAX_DEPTH


def _depth_of(payload: bytes | bytearray | str) -> int:
    """The deepest bracket nesting of ``payload``, brackets inside strings not counted."""
    if isinstance(payload, str):
        brackets = _STRING_S.sub("", payload).encode("utf-8", "surrogatepass")
    else:
        brackets = _STRING_B.sub(b"", payload)
    # Only the brackets are left to walk, in C up to here; a mismatch is the parser's to word.
    level = deepest = 0
    for c in brackets.translate(None, _NOT_BRACKET):
        if c == 91 or c == 123:  # [ {
            level += 1
            if level > deepest:
                deepest = level
        else:
            level -= 1
    return deepest


def _too_deep(body: dict[str, Any]) -> bool:
    """Whether ``body`` nests deeper than MAX_DEPTH, counting itself as level 1; iterative, so it
    holds at any stack depth (encode() asks only when json's recursion gave out)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, level = stack.pop()
        if level > MAX_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, level + 1))
    return False


# One decoder for every message: json.loads with options builds a new decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _meta_to_json(meta: Meta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if meta.id is not None:
        out["id"] = meta.id
    if meta.published_at is not None:
        out["ts"] = meta.published_at
    if meta.attempt:
        out["attempt"] = meta.attempt
    if meta.trace is not None:
        out["trace"] = meta.trace
    if meta.errors:
        out["errors"] = list(meta.errors)
    if meta.reply is not None:
        out["reply"] = meta.reply
    return out


def _meta_from_json(raw: Any) -> Meta:
    if not isinstance(raw, dict):
        raise DecodeError("invalid_metadata", f"{META_KEY} must be an object, got {type(raw).__name__}")
    msg_id = raw.get("id")
    ts = raw.get("ts")
    attempt = raw.get("attempt", 0)
    trace = raw.get("trace")
    errors = raw.get("errors")
    reply = raw.get("reply")
    # Type checks by exact class first: this runs for every message.
    if msg_id is not None and type(msg_id) is not str:
        raise DecodeError("invalid_metadata", f"{META_KEY}.id must be a string")
    if ts is not None and (type(ts) not in (int, float) or not math.isfinite(ts)):
        raise DecodeError("invalid_metadata", f"{META_KEY}.ts must be a number of unix seconds")
    if type(attempt) is not int or attempt < 0:
        raise DecodeError("invalid_metadata", f"{META_KEY}.attempt must be a non-negative integer")
    if trace is not None and type(trace) is not str:
        raise DecodeError("invalid_metadata", f"{META_KEY}.trace must be a string")
    if errors is not None and (type(errors) is not list or not all(type(e) is str for e in errors)):
        raise DecodeError("invalid_metadata", f"{META_KEY}.errors must be a list of strings")
    if reply is not None and (type(reply) is not str or reply_channel_of(reply) is None):
        raise DecodeError("invalid_metadata", f"{META_KEY}.reply must be a reply key ({REPLY_PREFIX}...)")
    return _new_meta(
        msg_id,
        float(ts) if ts is not None else None,
        attempt,
        trace,
        tuple(errors) if errors else (),
        reply,
    )


# Decoding builds a Meta and a Message per message. A frozen dataclass's __init__ sets each field
# through object.__setattr__, which costs about twice as much as the slots' own setters; these
# build the very same objects that way (every field, in declaration order).
_NO_META = Meta()  # frozen, so every message without metadata can share it
_new = object.__new__
_m_id, _m_ts, _m_attempt, _m_trace, _m_errors, _m_reply = (
    getattr(Meta, f.name).__set__ for f in fields(Meta)
)
_msg_kwargs, _msg_meta = (getattr(Message, f.name).__set__ for f in fields(Message))


def _new_meta(
    msg_id: str | None,
    published_at: float | None,
    attempt: int,
    trace: str | None,
    errors: tuple[str, ...],
    reply: str | None,
) -> Meta:
    meta: Meta = _new(Meta)
    _m_id(meta, msg_id)
    _m_ts(meta, published_at)
    _m_attempt(meta, attempt)
    _m_trace(meta, trace)
    _m_errors(meta, errors)
    _m_reply(meta, reply)
    return meta


def _new_message(kwargs: dict[str, Any], meta: Meta) -> Message:
    msg: Message = _new(Message)
    _msg_kwargs(msg, kwargs)
    _msg_meta(msg, meta)
    return msg
