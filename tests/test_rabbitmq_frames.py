"""The consuming fast path's frame reader, against frames pika itself encodes (pure; no broker)."""

from __future__ import annotations

import struct

import pika
import pika.data
import pika.frame
import pika.spec
from hypothesis import given
from hypothesis import strategies as st

from sluiceway.transports import rabbitmq_frames as frames

short = st.text(max_size=40).filter(lambda s: len(s.encode()) < 256)
header_values = st.one_of(st.integers(min_value=0, max_value=2**31 - 1), short, st.booleans())
props = st.builds(
    pika.BasicProperties,
    content_type=st.none() | short,
    content_encoding=st.none() | short,
    headers=st.none() | st.dictionaries(short, header_values, max_size=4),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(min_value=0, max_value=9),
    message_id=st.none() | short,
    app_id=st.none() | short,
)


def deliver_frames(
    channel: int, consumer_tag: str, tag: int, redelivered: bool, p: pika.BasicProperties, body: bytes
) -> bytes:
    method = pika.spec.Basic.Deliver(consumer_tag, tag, redelivered, "", "jobs")
    out = pika.frame.Method(channel, method).marshal() + pika.frame.Header(channel, len(body), p).marshal()
    return out + (pika.frame.Body(channel, body).marshal() if body else b"")


@given(
    st.integers(min_value=1, max_value=65535),
    short,
    st.integers(min_value=1, max_value=2**63 - 1),
    st.booleans(),
    props,
    st.binary(max_size=2000),
    st.binary(max_size=30),
)
def test_a_delivery_reads_as_pika_reads_it(
    channel: int,
    consumer_tag: str,
    tag: int,
    redelivered: bool,
    p: pika.BasicProperties,
    body: bytes,
    before: bytes,
) -> None:
    raw = deliver_frames(channel, consumer_tag, tag, redelivered, p, body)
    got = frames.parse_delivery(before + raw + b"\x08", len(before), channel)
    assert isinstance(got, tuple)
    got_consumer, got_tag, got_redelivered, table, got_body, end = got
    assert (got_consumer, got_tag, got_redelivered, got_body) == (consumer_tag, tag, redelivered, body)
    assert end == len(before) + len(raw)
    # The headers table, decoded by pika, is what pika's own decoding of the header frame has.
    header = pika.frame.decode_frame(raw[8 + struct.unpack_from(">I", raw, 3)[0] :])
    pika_headers = header[1].properties.headers  # type: ignore[union-attr]
    assert (None if table is None else pika.data.decode_table(table, 0)[0]) == pika_headers


@given(props, st.binary(max_size=500), st.data())
def test_any_cut_of_a_delivery_waits_for_the_rest(
    p: pika.BasicProperties, body: bytes, data: st.DataObject
) -> None:
    raw = deliver_frames(1, "ctag", 7, False, p, body)
    cut = data.draw(st.integers(min_value=1, max_value=len(raw) - 1))
    assert frames.parse_delivery(raw[:cut], 0, 1) == frames.INCOMPLETE


def test_other_frames_are_left_to_pika() -> None:
    p = pika.BasicProperties(delivery_mode=2)
    heartbeat = pika.frame.Heartbeat().marshal()
    assert frames.parse_delivery(heartbeat, 0, 1) == frames.NOT_A_DELIVERY
    ack = pika.frame.Method(1, pika.spec.Basic.Ack(5, multiple=True)).marshal()
    assert frames.parse_delivery(ack, 0, 1) == frames.NOT_A_DELIVERY
    get_ok = pika.frame.Method(1, pika.spec.Basic.GetOk(3, False, "", "q", 0)).marshal()
    assert frames.parse_delivery(get_ok + pika.frame.Header(1, 0, p).marshal(), 0, 1) == frames.NOT_A_DELIVERY
    # Another channel's delivery belongs to pika's dispatch.
    assert frames.parse_delivery(deliver_frames(2, "c", 1, False, p, b"x"), 0, 1) == frames.NOT_A_DELIVERY
    # A body in two frames (larger than frame_max) is assembled by pika.
    method = pika.frame.Method(1, pika.spec.Basic.Deliver("c", 1, False, "", "q")).marshal()
    split = method + pika.frame.Header(1, 4, p).marshal() + pika.frame.Body(1, b"ab").marshal()
    assert frames.parse_delivery(split + pika.frame.Body(1, b"cd").marshal(), 0, 1) == frames.NOT_A_DELIVERY


def test_an_empty_body_has_no_body_frame() -> None:
    raw = deliver_frames(1, "c", 9, True, pika.BasicProperties(), b"")
    got = frames.parse_delivery(raw + pika.frame.Heartbeat().marshal(), 0, 1)
    assert isinstance(got, tuple)
    assert (got[4], got[5], got[2]) == (b"", len(raw), True)
