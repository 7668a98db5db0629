"""Reads the one frame sequence a consuming worker receives nearly always: a ``basic.deliver``
method frame, its content header and its single body frame, on one channel (AMQP 0-9-1, 4.2).

pika decodes every frame into objects (a frame, a method, a properties object with fourteen
fields) and routes each through its callback manager and content assembler; for a small
message that is most of a consuming worker's CPU. This reads the three frames in place and
returns only what the transport uses. Anything else (another method, a multi-frame body, a
second property-flags word, bytes not yet received) is left to pika, so this is a fast path
and never the only path.

Pure (``struct`` only): the headers table, when there is one, is returned as its raw bytes for
pika's own table decoder.
"""

from __future__ import annotations

import struct
from typing import Final

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_END: Final = 0xCE
BASIC_CLASS: Final = 60
DELIVER_METHOD: Final = (BASIC_CLASS << 16) | 60  # class basic, method deliver
FLAG_CONTENT_TYPE: Final = 1 << 15
FLAG_CONTENT_ENCODING: Final = 1 << 14
FLAG_HEADERS: Final = 1 << 13

# Results that are not a delivery: the bytes at the position are something else (pika reads
# them), or a delivery whose frames have not all arrived yet.
NOT_A_DELIVERY: Final = -1
INCOMPLETE: Final = 0

_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_METHOD = struct.Struct(">BHII")  # the frame header and the method id
_CONTENT = struct.Struct(">BHIHHQH")  # the frame header, class, weight, body size, property flags
_TAG = struct.Struct(">QB")  # delivery tag, redelivered
_U32 = struct.Struct(">I")


# (consumer tag, delivery tag, redelivered, the encoded headers table with its 4-byte length
# first or None, body, the position after its last frame). A plain tuple: a NamedTuple's
# constructor is a Python function call, per message.
Deliver = tuple[str, int, bool, bytes | None, bytes, int]


def parse_delivery(buf: bytes, pos: int, channel: int) -> Deliver | int:
    """The delivery whose method frame starts at ``buf[pos]`` (``pos < len(buf)``) on ``channel``, or
    :data:`NOT_A_DELIVERY`, or :data:`INCOMPLETE` (a delivery, not all of it received yet)."""
    n = len(buf)
    if n - pos < 11:  # a method frame is at least 12 bytes
        return INCOMPLETE if buf[pos] == FRAME_METHOD else NOT_A_DELIVERY
    ftype, ch, size, method = _METHOD.unpack_from(buf, pos)
    if ftype != FRAME_METHOD or ch != channel or method != DELIVER_METHOD:
        return NOT_A_DELIVERY
    end = pos + 7 + size
    if end >= n:
        return INCOMPLETE
    if buf[end] != FRAME_END:
        return NOT_A_DELIVERY  # pika raises on the malformed frame
    p = pos + 11
    tag_len = buf[p]
    consumer_tag = buf[p + 1 : p + 1 + tag_len].decode()
    delivery_tag, redelivered = _TAG.unpack_from(buf, p + 1 + tag_len)

    h = end + 1
    if n - h < 21:
        return INCOMPLETE if n - h < 7 or buf[h] == FRAME_HEADER else NOT_A_DELIVERY
    ftype, ch, size, class_id, _weight, body_size, flags = _CONTENT.unpack_from(buf, h)
    if ftype != FRAME_HEADER or ch != channel or class_id != BASIC_CLASS or flags & 1:
        return NOT_A_DELIVERY  # flags & 1: another flags word follows; pika reads that
    h_end = h + 7 + size
    if h_end >= n:
        return INCOMPLETE
    if buf[h_end] != FRAME_END:
        return NOT_A_DELIVERY
    headers = None
    if flags & FLAG_HEADERS:
        q = h + 21
        if flags & FLAG_CONTENT_TYPE:
            q += 1 + buf[q]
        if flags & FLAG_CONTENT_ENCODING:
            q += 1 + buf[q]
        headers = buf[q : q + 4 + _U32.unpack_from(buf, q)[0]]

    b = h_end + 1
    if body_size == 0:
        return (consumer_tag, delivery_tag, bool(redelivered), headers, b"", b)
    if n - b < 7:
        return INCOMPLETE
    ftype, ch, size = _FRAME.unpack_from(buf, b)
    if ftype != FRAME_BODY or ch != channel or size != body_size:
        return NOT_A_DELIVERY  # a body in several frames: pika assembles it
    b_end = b + 7 + size
    if b_end >= n:
        return INCOMPLETE
    if buf[b_end] != FRAME_END:
        return NOT_A_DELIVERY
    return (consumer_tag, delivery_tag, bool(redelivered), headers, buf[b + 7 : b_end], b_end + 1)
