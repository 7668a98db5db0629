from __future__ import annotations

import json
import sys
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway import codec
from sluiceway.contract import META_KEY

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
kwargs_st = st.dictionaries(st.text(max_size=12).filter(lambda k: k != META_KEY), json_values, max_size=6)
meta_st = st.builds(
    codec.Meta,
    id=st.none() | st.text(max_size=20),
    published_at=st.none() | st.floats(min_value=0, max_value=4e9),
    attempt=st.integers(min_value=0, max_value=1000),
    trace=st.none() | st.text(max_size=20),
    errors=st.lists(st.text(max_size=30), max_size=5).map(tuple),
)


@given(kwargs_st, st.none() | meta_st)
def test_round_trip(kwargs: dict[str, Any], meta: codec.Meta | None) -> None:
    decoded = codec.decode(codec.encode(kwargs, meta))
    assert decoded.kwargs == kwargs
    assert decoded.meta == (meta or codec.Meta())


@given(kwargs_st)
def test_plain_kwargs_object_is_a_valid_message(kwargs: dict[str, Any]) -> None:
    """Any language can publish: a bare JSON object with no metadata decodes."""
    msg = codec.decode(json.dumps(kwargs))
    assert msg.kwargs == kwargs
    assert msg.meta == codec.Meta()


@given(
    kwargs_st,
    st.booleans(),
    st.sampled_from(["", " ", "\n", "\t "]),
    st.sampled_from(["", " ", "\r\n", " x", "}", "{}", ","]),
)
def test_decoding_agrees_with_json_whatever_surrounds_the_object(
    kwargs: dict[str, Any], ascii_only: bool, before: str, after: str
) -> None:
    """The decoder scans a bare object itself and leaves everything else to json's decode();
    either way the value, or the error's words, are json's."""
    text = before + json.dumps(kwargs, ensure_ascii=ascii_only) + after
    try:
        expected = json.loads(text)
    except ValueError as exc:
        with pytest.raises(codec.DecodeError) as info:
            codec.decode(text.encode())
        assert (info.value.reason, info.value.detail) == ("invalid_json", str(exc))
    else:
        assert codec.decode(text.encode()).kwargs == expected


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_fail_with_a_reason(raw: bytes) -> None:
    try:
        codec.decode(raw)
    except codec.DecodeError as exc:
        assert exc.reason in {"invalid_json", "invalid_encoding", "not_an_object", "invalid_metadata"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"\xff\xfe", "invalid_encoding"),
        (b'{"a": NaN}', "invalid_json"),
        (b'{"$sluiceway": 5}', "invalid_metadata"),
        (b'{"$sluiceway": {"attempt": -1}}', "invalid_metadata"),
        (b'{"$sluiceway": {"attempt": true}}', "invalid_metadata"),
        (b'{"$sluiceway": {"id": 7}}', "invalid_metadata"),
        (b'{"$sluiceway": {"ts": "yesterday"}}', "invalid_metadata"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else str(v),
)
def test_bad_payloads_name_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(codec.DecodeError) as info:
        codec.decode(payload)
    assert info.value.reason == reason


def test_encode_refuses_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError, match="reserved"):
        codec.encode({META_KEY: 1})
    with pytest.raises(ValueError, match="Out of range"):
        codec.encode({"x": float("nan")})
    with pytest.raises(TypeError):
        codec.encode({"x": object()})
    with pytest.raises(TypeError, match="dict"):
        codec.encode([1, 2])  # type: ignore[arg-type]
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        codec.encode({"x": loop})


@given(kwargs_st, st.lists(st.text(max_size=600), min_size=1, max_size=10))
def test_next_attempt_counts_up_and_keeps_recent_errors(kwargs: dict[str, Any], errors: list[str]) -> None:
    msg = codec.Message(kwargs)
    for e in errors:
        msg = codec.next_attempt(msg, e)
    assert msg.meta.attempt == len(errors)
    assert msg.meta.id  # a retried message always has an id, so the logs can follow it
    assert len(msg.meta.errors) == min(len(errors), codec.MAX_ERRORS_KEPT)
    assert msg.meta.errors[-1] == errors[-1][:500]
    assert codec.decode(codec.encode(msg.kwargs, msg.meta)) == msg


# --- orjson's fast path agrees with the stdlib's decode -------------------------------------------

# What orjson might read differently: integers of any size (orjson turns those past 64 bits into
# floats), floats with extreme exponents, lone surrogate escapes, duplicate keys, odd spacing.
wide_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 3, max_value=2**64 + 3)
    | st.integers(min_value=-(2**64) - 3, max_value=-(2**63) + 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from(["\ud800", "a\udfff", "9" * 19, "1" * 25])
)
wide_values = st.recursive(
    wide_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
raw_numbers = st.sampled_from(["1e400", "-1e400", "1E-400", "-0", "-0.0", "0.1e1", "18446744073709551616"])


def _typed(value: Any) -> Any:
    """``value`` with every number tagged by its type: 1 and 1.0 compare equal, and must not."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, repr(value))


def _refuse(payload: bytes) -> Any:
    raise orjson.JSONDecodeError("refused by the test", "", 0)


def _stdlib_outcome(payload: bytes) -> Any:
    """What decode() says with orjson refusing everything: the stdlib's decode alone."""
    with mock.patch.object(codec, "_orjson_loads", _refuse):
        return _outcome(payload)


def _outcome(payload: bytes) -> Any:
    try:
        msg = codec.decode(payload)
    except codec.DecodeError as exc:
        return (exc.reason, exc.detail)
    return _typed(msg.kwargs)


@given(
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != META_KEY), wide_values, max_size=6),
    st.booleans(),
    st.sampled_from(["", " ", "\n", "\r\n\t"]),
    st.sampled_from(["", " ", "\n", " x", ","]),
    st.none() | raw_numbers,
)
def test_the_fast_path_decodes_what_the_stdlib_decodes(
    kwargs: dict[str, Any], ascii_only: bool, before: str, after: str, raw: str | None
) -> None:
    text = json.dumps(kwargs, ensure_ascii=ascii_only)
    if raw is not None:  # a number literal json.dumps never writes, as the last argument
        text = text[:-1] + ("," if kwargs else "") + f'"raw":{raw}}}'
    payload = (before + text + after).encode("utf-8", "surrogatepass")
    assert _outcome(payload) == _stdlib_outcome(payload)


@given(st.binary(max_size=64))
def test_the_fast_path_fails_as_the_stdlib_does(raw: bytes) -> None:
    assert _outcome(raw) == _stdlib_outcome(raw)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"n": 123456789012345678901234567890}', 123456789012345678901234567890),
        (b'{"n": 18446744073709551615}', 2**64 - 1),
        (b'{"n": -9223372036854775808}', -(2**63)),
        (b'{"n": 1e400}', float("inf")),
        (b'{"n": "\\ud800"}', "\ud800"),
        (b'{"n": 1, "n": 2}', 2),  # the last one wins, as in json
    ],
    ids=lambda v: repr(v)[:30],
)
def test_values_orjson_alone_would_read_otherwise(payload: bytes, expected: Any) -> None:
    got = codec.decode(payload).kwargs["n"]
    assert (type(got), got) == (type(expected), expected)


@pytest.mark.parametrize("depth", [1000, 1020])
def test_nesting_past_what_the_stdlib_reads_is_invalid_json_as_before_orjson(depth: int) -> None:
    """orjson would read up to 1,024 levels; such a message could not be encoded again for a
    retry (RecursionError), so it is refused at decode as it was before orjson."""
    payload = b'{"n": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(codec.DecodeError) as err:
        codec.decode(payload)
    assert err.value.reason == "invalid_json"


def test_every_decoded_nesting_encodes_again_for_its_retry() -> None:
    for depth in (100, codec.MAX_DEPTH - 1):  # with its object, MAX_DEPTH levels: the bound
        message = codec.decode(b'{"n": ' + b"[" * depth + b"]" * depth + b"}")
        assert codec.decode(codec.encode(message.kwargs, message.meta)) == message


# --- one nesting bound, at decode and at encode ---------------------------------------------------


def _nested(levels: int) -> dict[str, Any]:
    """A kwargs object ``levels`` deep, counting itself as level 1, built without recursion."""
    value: Any = []
    for _ in range(levels - 2):
        value = [value]
    return {"n": value}


@pytest.mark.parametrize("levels", [codec.MAX_DEPTH - 1, codec.MAX_DEPTH])
def test_nesting_up_to_the_bound_decodes_and_encodes(levels: int) -> None:
    payload = json.dumps(_nested(levels)).encode()
    assert codec.decode(payload).kwargs == _nested(levels)
    assert codec.decode(codec.encode(_nested(levels))).kwargs == _nested(levels)


def test_nesting_past_the_bound_is_refused_at_decode_and_encode() -> None:
    levels = codec.MAX_DEPTH + 1
    for payload in (json.dumps(_nested(levels)).encode(), json.dumps(_nested(levels))):
        with pytest.raises(codec.DecodeError) as err:
            codec.decode(payload)
        assert err.value.reason == "invalid_json"
        assert "nesting depth limit" in err.value.detail and str(codec.MAX_DEPTH) in err.value.detail
    with pytest.raises(ValueError, match=f"nesting depth limit.*{codec.MAX_DEPTH}"):
        codec.encode(_nested(levels))


@given(st.integers(min_value=0, max_value=3 * codec.MAX_DEPTH), st.sampled_from(['\\"', "\\\\", "x"]))
def test_brackets_inside_strings_do_not_count(brackets: int, escape: str) -> None:
    kwargs = {"s": ("[{" + escape) * brackets, "n": [[1]]}
    assert codec.decode(json.dumps(kwargs).encode()).kwargs == kwargs


def test_a_message_at_the_bound_is_encoded_again_for_its_retry_from_a_deep_stack() -> None:
    message = codec.decode(json.dumps(_nested(codec.MAX_DEPTH)).encode())

    def retry_at(depth: int) -> bytes:
        if depth:
            return retry_at(depth - 1)
        nxt = codec.next_attempt(message, "boom")
        return codec.encode(nxt.kwargs, nxt.meta)

    payload = retry_at(sys.getrecursionlimit() // 2)
    assert codec.decode(payload).kwargs == message.kwargs


# --- the bound's fast checks agree with an exact count --------------------------------------------


def _reference_depth(text: str) -> int:
    """The nesting of JSON ``text`` by a scan that follows its strings character by character."""
    level = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            deepest = max(deepest, level)
        elif ch in "]}":
            level -= 1
    return deepest


# Strings full of what could fool a bracket count: brackets, escaped quotes, backslashes.
tricky_text = st.text(alphabet='[]{}"\\x0:,é', max_size=12)


@st.composite
def nested_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    """kwargs nested near the bound (counting the object as level 1), brackets in their strings."""
    levels = draw(
        st.sampled_from([1, 2, 50])
        | st.integers(min_value=codec.MAX_DEPTH - 3, max_value=codec.MAX_DEPTH + 3)
    )
    kinds = draw(st.lists(st.sampled_from(["list", "dict", "pair"]), min_size=1, max_size=8))
    texts = draw(st.lists(tricky_text, min_size=1, max_size=4))
    # KBs of brackets inside strings: the opening-bracket count alone is past the bound.
    filler = draw(st.sampled_from(["", "[{" * codec.MAX_DEPTH, '\\"[' * 3 * codec.MAX_DEPTH]))
    value: Any = draw(st.sampled_from([[], {}, 7, "leaf", filler]))
    for i in range(levels - 1):
        kind, text = kinds[i % len(kinds)], texts[i % len(texts)]
        if kind == "list":
            value = [value]
        elif kind == "dict":
            value = {text: value}
        else:
            value = [text, value, {"]": text}]
    if levels == 1:
        return {"s": filler}
    return {"n": value, "s": filler} if isinstance(value, list) else value | {"s": filler}


@given(nested_kwargs(), st.sampled_from([(",", ":"), (", ", ": ")]), st.booleans())
def test_the_fast_checks_agree_with_the_exact_count(
    kwargs: dict[str, Any], separators: tuple[str, str], ascii_only: bool
) -> None:
    text = json.dumps(kwargs, separators=separators, ensure_ascii=ascii_only)
    depth = _reference_depth(text)
    payload = text.encode()
    assert codec._depth_of(payload) == codec._depth_of(text) == depth
    for raw in (payload, text):
        if depth > codec.MAX_DEPTH:
            with pytest.raises(codec.DecodeError, match="nesting depth limit"):
                codec.decode(raw)
        else:
            assert codec.decode(raw).kwargs == json.loads(text)
    # encode() checks its output by decode()'s test; the walk of the value is the reference,
    # and it agrees with the text: what decodes encodes again and the other way round.
    assert codec._too_deep(kwargs) == (depth > codec.MAX_DEPTH)
    if depth > codec.MAX_DEPTH:
        with pytest.raises(ValueError, match="nesting depth limit"):
            codec.encode(kwargs)
    else:
        assert codec.decode(codec.encode(kwargs)).kwargs == kwargs


def test_openers_only_inside_strings_do_not_refuse_a_shallow_message() -> None:
    for s in ("[" * (codec.MAX_DEPTH + 1), '\\"{' * 2 * codec.MAX_DEPTH, "\\\\[" * 2 * codec.MAX_DEPTH):
        payload = b'{"s": "' + s.encode() + b'", "n": [[1]]}'
        assert codec.decode(payload).kwargs == json.loads(payload)


def test_a_digit_run_joined_by_a_deleted_bracket_decodes_as_the_stdlib_does() -> None:
    """The guard's translate deletes opening brackets, so "123456789[0123456789" reads as a
    19-digit run: the payload goes to the stdlib, which decodes it to the same value."""
    payload = b'{"s": "123456789[0123456789", "t": "1{2", "n": 5}'
    assert _outcome(payload) == _stdlib_outcome(payload) == _typed(json.loads(payload))


def test_encode_refuses_nesting_far_past_what_json_recurses_into() -> None:
    value: Any = []
    for _ in range(20 * sys.getrecursionlimit()):
        value = [value]
    with pytest.raises(ValueError, match="nesting depth limit"):
        codec.encode({"n": value})


def test_encode_refuses_a_message_nested_past_the_bound_by_its_metadata_too() -> None:
    """The check reads the encoded bytes, metadata included, as decode() will."""
    kwargs = _nested(codec.MAX_DEPTH)
    assert codec.decode(codec.encode(kwargs, codec.Meta(errors=("boom",)))).kwargs == kwargs
    with pytest.raises(ValueError, match="nesting depth limit"):
        codec.encode(_nested(codec.MAX_DEPTH + 1), codec.Meta(id="x"))
