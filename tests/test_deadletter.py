"""Pure tests of the text paths where a payload or an exception meets encoding."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from sluiceway import codec, deadletter


def test_a_lone_surrogate_survives_encoding_exactly() -> None:
    msg = codec.decode(b'{"text":"x\\ud800y"}')
    again = codec.decode(codec.encode(msg.kwargs, codec.next_attempt(msg, "bad \udcff").meta))
    assert again.kwargs == {"text": "x\ud800y"}
    assert again.meta.errors == ("bad \udcff",)


@given(st.binary(max_size=200))
def test_a_dead_letter_record_keeps_any_payload_byte_for_byte(payload: bytes) -> None:
    entry = json.loads(
        deadletter.record(reason="error", detail="d\ud800", payload=payload, errors=["\udfff"])
    )
    assert deadletter.payload_of(entry) == payload
    assert entry["detail"] == "d\\ud800" and entry["errors"] == ["\\udfff"]


@given(st.text())
def test_safe_text_is_always_encodable(text: str) -> None:
    deadletter.safe_text(text).encode("utf-8")
