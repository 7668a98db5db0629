"""The RabbitMQ transport, publisher and backlog source against a real RabbitMQ node.

Each test has its own vhost (``rabbitmq_url``). Waits are on observed conditions; timings are
printed as figures, never asserted.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway.transports import rabbitmq_topology as topo
from sluiceway.transports.base import DeadLetter, Delivery, Outcomes, Retry
from sluiceway.transports.rabbitmq import (
    PublishRefusedError,
    RabbitMQSink,
    RabbitMQTransport,
    RabbitMQUnavailableError,
    connection_name,
)
from sluiceway_operator.backlog.rabbitmq import RabbitMQSource
from tests.support.rabbitmq_server import RabbitMQServer
from tests.support.workers import wait_for

# --- pure rules ------------------------------------------------------------------------------------


@given(st.floats(min_value=0.011, max_value=7 * 24 * 3600.0))
def test_delay_buckets_are_close_to_the_asked_delay(seconds: float) -> None:
    ms = topo.delay_bucket_ms(seconds)
    assert abs(ms - seconds * 1000) <= seconds * 1000 * 0.023 + 1


@given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=1e6))
def test_delay_buckets_keep_order(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert topo.delay_bucket_ms(lo) <= topo.delay_bucket_ms(hi)


@pytest.mark.parametrize("seconds", [0.0, -1.0, 0.005, math.nan, math.inf * -1])
def test_tiny_or_invalid_delays_go_straight_back(seconds: float) -> None:
    assert topo.delay_bucket_ms(seconds) == 0


@given(st.integers(min_value=topo.MIN_DELAY_MS, max_value=topo.MAX_DELAY_MS))
def test_a_delay_queue_outlives_every_message_published_before_its_redeclare(ms: int) -> None:
    # Published at most redeclare_after() after the last declare, a message expires before the queue.
    assert topo.redeclare_after(ms) * 1000 + ms < topo.delay_expiry_ms(ms)


def test_redeliveries_from_headers() -> None:
    assert topo.redeliveries({"x-delivery-count": 3}, True) == 3
    assert topo.redeliveries(None, False) == 0
    assert topo.redeliveries(None, True) == 1  # classic queues only flag it
    assert topo.redeliveries({"x-delivery-count": True}, False) == 0


def test_the_pika_internals_the_transport_uses_are_still_there() -> None:
    """The transport cancels its consumers with its own basic.cancel (pika's would requeue the
    deliveries that race the cancel, each a counted redelivery on a quorum queue): it sends it
    with ``Channel._rpc`` and forgets the consumer with ``_cleanup_consumer_ref``, and relies on
    pika still handing a consumer's deliveries to its callback until then. None of that is
    pika's public API: this fails loudly if a pika release moves it."""
    import inspect
    import types

    import pika.callback
    import pika.frame
    from pika.channel import Channel

    assert list(inspect.signature(Channel._rpc).parameters)[:4] == [
        "self",
        "method",
        "callback",
        "acceptable_replies",
    ]
    assert list(inspect.signature(Channel._cleanup_consumer_ref).parameters) == ["self", "consumer_tag"]
    ch = Channel(types.SimpleNamespace(callbacks=pika.callback.CallbackManager()), 1, lambda _ch: None)
    got: list[bytes] = []
    ch._consumers["c1"] = lambda _ch, _method, _props, body: got.append(body)
    deliver = pika.frame.Method(1, pika.spec.Basic.Deliver(consumer_tag="c1", delivery_tag=7))
    header = pika.frame.Header(1, 4, pika.spec.BasicProperties())
    ch._on_deliver(deliver, header, b"kept")  # sent a cancel, no CancelOk yet: still ours
    assert got == [b"kept"]
    ch._cleanup_consumer_ref("c1")
    assert "c1" not in ch._consumers and "c1" not in ch._cancelled
    # The delivery fast path replaces the connection's _on_data_available, which the adapter
    # looks up on the instance for every read, and calls these for the frames it leaves to pika.
    from pika.adapters.base_connection import BaseConnection
    from pika.connection import Connection

    assert "self._on_data_available(data)" in inspect.getsource(BaseConnection._proto_data_received)
    for name in ("_read_frame", "_trim_frame_buffer", "_process_frame"):
        assert callable(getattr(Connection, name))
    assert "self.bytes_received += byte_count" in inspect.getsource(Connection._trim_frame_buffer)
    assert ch._content_assembler._method_frame is None and isinstance(ch._cancelled, set)


def test_queue_type_is_checked_by_name() -> None:
    with pytest.raises(ValueError, match="queue type 'stream'"):
        topo.work_arguments("q", "stream")


# --- against RabbitMQ ------------------------------------------------------------------------------


def _bodies(n: int, tag: str = "m") -> list[bytes]:
    return [json.dumps({"i": i, "tag": tag}).encode() for i in range(n)]


def _fetch_all(tr: RabbitMQTransport, n: int, timeout: float = 30.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += tr.fetch(n - len(got), 0.2)
    return got


def _declared(url: str, queue: str) -> pika.spec.Queue.DeclareOk:
    """The broker's figures for ``queue`` (a passive declare)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        method: pika.spec.Queue.DeclareOk = conn.channel().queue_declare(queue, passive=True).method
        return method
    finally:
        conn.close()


def _ready(url: str, queue: str) -> int:
    return int(_declared(url, queue).message_count)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_publish_fetch_ack_roundtrip(rabbitmq_url: str, queue_type: str) -> None:
    sink = RabbitMQSink(rabbitmq_url, queue_type=queue_type)
    bodies = _bodies(500)
    started = time.monotonic()
    sink.send("default", "work", bodies)
    publish_s = time.monotonic() - started
    tr = RabbitMQTransport(rabbitmq_url, "work", queue_type=queue_type)
    try:
        got = _fetch_all(tr, 500)
        assert sorted(d.payload for d in got) == sorted(bodies)  # byte for byte
        assert all(d.redeliveries == 0 for d in got)
        assert tr.settle(Outcomes(acks=[d.token for d in got])).gone == 0
        wait_for(lambda: _ready(rabbitmq_url, "work") == 0, 10, what="queue empty")
        assert tr.fetch(10, 0.3) == []
    finally:
        tr.close()
        sink.close()
    print(f"[figures] {queue_type}: published 500 with confirms in {publish_s:.2f} s")


@pytest.mark.rabbitmq
def test_deliveries_skip_pikas_frame_objects_and_keep_their_headers(rabbitmq_url: str) -> None:
    """Deliveries are read by rabbitmq_frames, not by pika's per-frame decoding (which counts
    each frame it processes), and the headers they carry still count."""
    # The window grows from 16 while the 200 arrive, by more consumers on the one channel.
    tr = RabbitMQTransport(rabbitmq_url, "fast", initial_prefetch=16)
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        ch = conn.channel()
        plain = pika.BasicProperties(delivery_mode=2)
        counted = pika.BasicProperties(delivery_mode=2, headers=topo.returned_headers(3))
        for i in range(200):
            ch.basic_publish("", "fast", b'{"i": %d}' % i, counted if i % 2 else plain)
        assert tr.conn is not None
        frames_before = tr.conn._impl.frames_received
        got = _fetch_all(tr, 200)
        assert [d.payload for d in got] == [b'{"i": %d}' % i for i in range(200)]
        assert [d.redeliveries for d in got] == [3 if i % 2 else 0 for i in range(200)]
        assert tr.settle(Outcomes(acks=[d.token for d in got])).gone == 0
        # A consume and a qos answered, heartbeats: a few frames, not three per delivery.
        assert tr.conn._impl.frames_received - frames_before < 50
        wait_for(lambda: _ready(rabbitmq_url, "fast") == 0, 10, what="queue empty")
    finally:
        conn.close()
        tr.close()


@pytest.mark.rabbitmq
def test_a_growing_window_opens_consumers_and_cancels_none(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose window grows from its first 16 to hundreds adds a consumer for each
    difference: cancelling one would let the quorum queue return what it had checked out to it,
    each counted in x-delivery-count (docs/brokers/rabbitmq.md)."""
    # How many growth steps the loop's timing makes is not this test's to fix, and past the cap
    # the window re-subscribes (tests/test_rabbitmq_prefetch.py): here every step adds one.
    monkeypatch.setattr(topo, "MAX_CONSUMERS", 1000)
    sink = RabbitMQSink(rabbitmq_url)
    bodies = [b'{"i": %d}' % i for i in range(600)]
    sink.send("default", "grow", bodies)
    sink.close()
    tr = RabbitMQTransport(rabbitmq_url, "grow", initial_prefetch=16)
    cancels: list[int] = []
    cancel = tr._cancel

    def counting_cancel() -> None:
        cancels.append(len(tr.consumer_tags))
        cancel()

    tr._cancel = counting_cancel  # type: ignore[method-assign]
    try:
        got: list[Delivery] = []
        deadline = time.monotonic() + 30
        # Nothing settled, so each fetch's room adds to what is held: the window keeps growing.
        while len(got) < len(bodies) and time.monotonic() < deadline:
            got += tr.fetch(300, 0.2)
        assert sorted(d.payload for d in got) == sorted(bodies)
        assert [d.redeliveries for d in got] == [0] * len(bodies)
        assert cancels == []
        consumers = len(tr.consumer_tags)
        assert consumers > 1
        assert tr.prefetch >= len(bodies)
        assert int(_declared(rabbitmq_url, "grow").consumer_count) == consumers
        print(f"window {tr.prefetch} over {consumers} consumers")
        assert tr.settle(Outcomes(acks=[d.token for d in got])).gone == 0
        wait_for(lambda: _ready(rabbitmq_url, "grow") == 0, 10, what="queue empty")
    finally:
        tr.close()
    assert int(_declared(rabbitmq_url, "grow").consumer_count) == 0


@pytest.mark.rabbitmq
def test_a_consumer_the_broker_cancels_is_replaced(rabbitmq_url: str) -> None:
    """Deleting the queue makes the broker cancel its consumers; once the queue is back, the
    worker consumes from it again instead of holding a window of consumers that are gone."""
    sink = RabbitMQSink(rabbitmq_url)
    sink.send("default", "cancelled", _bodies(5, "before"))
    tr = RabbitMQTransport(rabbitmq_url, "cancelled")
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        got = _fetch_all(tr, 5)
        assert len(got) == 5 and tr.settle(Outcomes(acks=[d.token for d in got])).gone == 0
        wait_for(lambda: _ready(rabbitmq_url, "cancelled") == 0, 10, what="queue empty")
        ch = conn.channel()
        ch.queue_delete("cancelled")
        wait_for(lambda: not tr.consumer_tags, 10, what="the broker's cancel seen")
        ch.queue_declare("cancelled", durable=True, arguments=topo.work_arguments("cancelled", tr.queue_type))
        for body in _bodies(5, "after"):
            ch.basic_publish("", "cancelled", body, pika.BasicProperties(delivery_mode=2))
        again = _fetch_all(tr, 5)
        assert sorted(d.payload for d in again) == sorted(_bodies(5, "after"))
        assert int(_declared(rabbitmq_url, "cancelled").consumer_count) == len(tr.consumer_tags) == 1
        tr.settle(Outcomes(acks=[d.token for d in again]))
    finally:
        conn.close()
        tr.close()
        sink.close()


@pytest.mark.rabbitmq
def test_the_same_queue_declared_with_other_arguments_is_used_as_it_is(rabbitmq_url: str) -> None:
    RabbitMQSink(rabbitmq_url, queue_type="classic").send("default", "mixed", [b"{}"])
    tr = RabbitMQTransport(rabbitmq_url, "mixed", queue_type="quorum")  # inequivalent arg: passive
    try:
        assert len(_fetch_all(tr, 1)) == 1
    finally:
        tr.close()


@pytest.mark.rabbitmq
def test_publishing_to_a_queue_that_cannot_route_raises(rabbitmq_url: str) -> None:
    sink = RabbitMQSink(rabbitmq_url)
    sink.send("default", "exists", [b"{}"])
    assert sink.channel is not None
    sink.declared["gone"] = time.monotonic()  # pretend it was declared, then it vanished
    sink.declared[topo.dead_queue("gone")] = time.monotonic()
    with pytest.raises(PublishRefusedError, match="'gone'"):
        sink.send("default", "gone", [b"{}"])
    sink.close()


@pytest.mark.rabbitmq
def test_retry_waits_in_a_delay_queue_then_returns(rabbitmq_url: str) -> None:
    sink = RabbitMQSink(rabbitmq_url)
    sink.send("default", "r", [b'{"a": 1}'])
    tr = RabbitMQTransport(rabbitmq_url, "r")
    try:
        (d,) = _fetch_all(tr, 1)
        sent = time.monotonic()
        tr.settle(Outcomes(retries=[Retry(d.token, b'{"a": 1, "attempt": 2}', 0.8)]))
        (again,) = _fetch_all(tr, 1)
        waited = time.monotonic() - sent
        assert again.payload == b'{"a": 1, "attempt": 2}'
        assert waited >= 0.7  # it waited in the broker, at least about its delay
        tr.settle(Outcomes(acks=[again.token]))
    finally:
        tr.close()
    print(f"[figures] retry after 0.8 s came back after {waited:.2f} s")


@pytest.mark.rabbitmq
def test_a_retry_survives_its_workers_death(rabbitmq_url: str) -> None:
    RabbitMQSink(rabbitmq_url).send("default", "r2", [b'{"a": 1}'])
    tr = RabbitMQTransport(rabbitmq_url, "r2")
    (d,) = _fetch_all(tr, 1)
    tr.settle(Outcomes(retries=[Retry(d.token, b'{"a": 2}', 1.0)]))
    tr.close()  # the worker is gone; the retry waits in the broker
    tr2 = RabbitMQTransport(rabbitmq_url, "r2")
    try:
        (again,) = _fetch_all(tr2, 1)
        assert again.payload == b'{"a": 2}'
        tr2.settle(Outcomes(acks=[again.token]))
    finally:
        tr2.close()


@pytest.mark.rabbitmq
def test_dead_letters_carry_their_reason_in_headers(rabbitmq_url: str) -> None:
    raw = b"\xff\xfe not utf-8"
    RabbitMQSink(rabbitmq_url).send("default", "d", [raw])
    tr = RabbitMQTransport(rabbitmq_url, "d")
    try:
        (d,) = _fetch_all(tr, 1)
        record = {"reason": "invalid_utf8", "detail": "not UTF-8", "payload_base64": "//4=", "attempts": 0}
        tr.settle(Outcomes(deads=[DeadLetter(d.token, json.dumps(record).encode(), "invalid_utf8")]))
    finally:
        tr.close()
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        method, props, body = conn.channel().basic_get("d.dead", auto_ack=True)
    finally:
        conn.close()
    assert method is not None
    assert body == raw  # the original bytes, for a replay
    assert props.headers[topo.HEADER_REASON] == "invalid_utf8"
    assert props.headers[topo.HEADER_DETAIL] == "not UTF-8"
    assert json.loads(props.headers[topo.HEADER_RECORD])["attempts"] == 0
    assert props.delivery_mode == 2


@pytest.mark.rabbitmq
def test_give_back_returns_at_once_and_counts_only_a_running_hand_back(rabbitmq_url: str) -> None:
    RabbitMQSink(rabbitmq_url).send("default", "g", _bodies(3))
    tr = RabbitMQTransport(rabbitmq_url, "g")
    try:
        got = _fetch_all(tr, 3)
        # Unstarted: republished with its count, so the hand-back costs it nothing.
        assert tr.give_back([d.token for d in got]) == 3
        again = _fetch_all(tr, 3)
        assert sorted(d.payload for d in again) == sorted(d.payload for d in got)
        assert all(d.redeliveries == 0 for d in again)
        # Running when its worker had to stop: a nack, which a quorum queue counts.
        assert tr.give_back([d.token for d in again], redelivered=True) == 3
        third = _fetch_all(tr, 3)
        assert all(d.redeliveries == 1 for d in third)
        # And the count so far survives a later unstarted hand-back.
        assert tr.give_back([d.token for d in third]) == 3
        fourth = _fetch_all(tr, 3)
        assert all(d.redeliveries == 1 for d in fourth)
        assert tr.settle(Outcomes(acks=[d.token for d in fourth])).gone == 0
        wait_for(lambda: _ready(rabbitmq_url, "g") == 0, 10, what="queue empty")
    finally:
        tr.close()


@pytest.mark.rabbitmq
def test_rate_limited_mode_takes_exactly_what_it_asks(rabbitmq_url: str) -> None:
    RabbitMQSink(rabbitmq_url).send("default", "lim", _bodies(10))
    tr = RabbitMQTransport(rabbitmq_url, "lim", consume=False)
    try:
        first = tr.fetch(3, 0.1)
        assert len(first) == 3
        # Nothing else left the queue: the worker holds only what it had slots for, and the
        # consumer is gone, so acking these sends no unslotted message after them.
        tr.settle(Outcomes(acks=[d.token for d in first]))
        wait_for(lambda: _ready(rabbitmq_url, "lim") == 7, 10, what="7 ready")
        time.sleep(0.3)  # a delivery pushed after the acks would show as 6 ready by now
        assert _ready(rabbitmq_url, "lim") == 7
        tr._call(lambda: tr._drive(0.05))
        assert not tr.buffer  # nor did one reach this transport
        two = tr.fetch(2, 0.1)  # one or two slots: basic_get, not a consumer
        assert len(two) == 2
        wait_for(lambda: _ready(rabbitmq_url, "lim") == 5, 10, what="5 ready")
        rest = two + _fetch_all(tr, 5)
        assert sorted(d.payload for d in first + rest) == sorted(_bodies(10))
        assert all(d.redeliveries == 0 for d in first + rest)  # nothing went back and forth
        tr.settle(Outcomes(acks=[d.token for d in rest]))
        assert tr.fetch(5, 0.1) == []
    finally:
        tr.close()


def _as_the_link_fetches(tr: RabbitMQTransport, wanted: int, timeout: float) -> list[Delivery]:
    """What the rate-limited link does (transports/gated.py): slots only for what is available."""
    n = tr.available(0.02)
    return tr.fetch(min(wanted, n), timeout) if n > 0 else []


@pytest.mark.rabbitmq
def test_a_rate_limited_fetch_opens_no_consumer_on_an_idle_queue_and_one_it_can_fill(
    rabbitmq_url: str,
) -> None:
    """A consumer cancelled before it filled is where a quorum queue can return a delivery it
    had checked out, counted: so an idle queue opens no consumer, a queue with fewer messages
    than slots opens one for what is ready, and only a grant filled from a queue that held more
    lets the next fetch skip the count."""
    sink = RabbitMQSink(rabbitmq_url)
    tr = RabbitMQTransport(rabbitmq_url, "idle", consume=False)  # declares the queue
    opened: list[int] = []
    counts: list[int] = []
    subscribe, ready_count = tr._subscribe, tr._ready_count

    def counting_subscribe(prefetch: int) -> None:
        opened.append(prefetch)
        subscribe(prefetch)

    def counting_ready_count() -> int:
        counts.append(ready := ready_count())
        return ready

    tr._subscribe = counting_subscribe  # type: ignore[method-assign]
    tr._ready_count = counting_ready_count  # type: ignore[method-assign]

    def publish(n: int, tag: str) -> list[bytes]:
        sink.send("default", "idle", _bodies(n, tag))
        wait_for(lambda: _ready(rabbitmq_url, "idle") == n, 10, what=f"{n} ready")
        return _bodies(n, tag)

    try:
        for _ in range(5):
            assert _as_the_link_fetches(tr, 10, 0.2) == []
        assert opened == [] and counts == [0] * 5  # idle polls: a declare each, no consume
        sent = publish(4, "a")
        got = _as_the_link_fetches(tr, 10, 5.0)
        assert opened == [4] and counts[5:] == [4]  # sized to what was ready; one count read
        # It emptied the queue: the next poll reads the count again instead of opening a
        # consumer on nothing.
        assert _as_the_link_fetches(tr, 10, 0.2) == []
        assert opened == [4] and counts[6:] == [0]
        sent += publish(2, "b")
        got += _as_the_link_fetches(tr, 10, 5.0)
        assert opened == [4] and counts[7:] == [2]  # two ready: basic_get, as for a grant of two
        # A backlog: a grant filled from a queue that held more skips the next count, until a
        # grant comes back short.
        sent += publish(25, "c")
        for _ in range(3):
            got += _as_the_link_fetches(tr, 10, 0.5)
        assert opened == [4, 10, 10, 10] and counts[8:] == [25]
        assert _as_the_link_fetches(tr, 10, 0.2) == [] and counts[9:] == [0]
        assert sorted(d.payload for d in got) == sorted(sent)
        assert all(d.redeliveries == 0 for d in got)
        tr.settle(Outcomes(acks=[d.token for d in got]))
        wait_for(lambda: _ready(rabbitmq_url, "idle") == 0, 10, what="queue empty")
    finally:
        tr.close()
        sink.close()


@pytest.mark.rabbitmq
def test_a_filled_grant_acked_at_once_lets_nothing_else_through(rabbitmq_url: str) -> None:
    """Grant after grant, acked as soon as the fetch returns: no delivery beyond the granted
    count reaches the transport (the consumer is gone before the acks free its credit)."""
    RabbitMQSink(rabbitmq_url).send("default", "lim2", _bodies(200))
    tr = RabbitMQTransport(rabbitmq_url, "lim2", consume=False)
    try:
        for round_ in range(20):
            got = tr.fetch(5, 1.0)
            assert len(got) == 5
            tr.settle(Outcomes(acks=[d.token for d in got]))
            tr._call(lambda: tr._drive(0.02))
            assert not tr.buffer, f"a delivery without a slot arrived in round {round_}"
        wait_for(lambda: _ready(rabbitmq_url, "lim2") == 100, 10, what="100 ready")
    finally:
        tr.close()


def _drop_connections(server: RabbitMQServer, vhost: str, name: str) -> int:
    """Close the vhost's connections that carry ``name``: only those, so that a connection the
    management API has not listed yet cannot go unnoticed behind another one that it has."""
    conns = server._http("GET", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}/connections")
    assert isinstance(conns, list)
    mine = [c for c in conns if c.get("user_provided_name") == name]
    for c in mine:
        server._http("DELETE", f"/api/connections/{urllib.parse.quote(c['name'], safe='')}")
    return len(mine)


@pytest.mark.rabbitmq
def test_reconnects_after_a_connection_drop_and_forgets_old_tags(
    rabbitmq_server: RabbitMQServer, rabbitmq_url: str
) -> None:
    vhost = urllib.parse.unquote(rabbitmq_url.rsplit("/", 1)[1])
    RabbitMQSink(rabbitmq_url).send("default", "rc", _bodies(20))
    tr = RabbitMQTransport(rabbitmq_url, "rc")
    try:
        held = _fetch_all(tr, 20)
        # The management API lists a connection a moment after it opens, by the name the worker
        # gives it (its role, queue, host and pid), which is what tells it from the sink's.
        name = connection_name("worker", "rc")
        assert str(os.getpid()) in name
        wait_for(
            lambda: _drop_connections(rabbitmq_server, vhost, name) > 0, 30, what="the worker's connection"
        )
        dropped = time.monotonic()
        # Settling tags of the dropped channel is harmless: the acks are lost (or count as gone
        # once the drop is noticed), and the messages come back.
        settled = None
        while settled is None:
            try:
                settled = tr.settle(Outcomes(acks=[d.token for d in held]))
            except RabbitMQUnavailableError:
                time.sleep(0.05)
        again: list[Delivery] = []
        deadline = time.monotonic() + 60
        while len(again) < 20 and time.monotonic() < deadline:
            try:
                again += tr.fetch(20 - len(again), 0.2)
            except RabbitMQUnavailableError:
                time.sleep(0.05)
        back_after = time.monotonic() - dropped
        assert sorted(d.payload for d in again) == sorted(d.payload for d in held)
        assert all(d.redeliveries >= 1 for d in again)
        assert tr.settle(Outcomes(acks=[d.token for d in again])).gone == 0
        assert tr.reconnects >= 1
    finally:
        tr.close()
    print(f"[figures] after a connection drop, 20 held messages ran again after {back_after:.2f} s")


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_survives_a_broker_restart_with_nothing_lost(
    rabbitmq_server: RabbitMQServer, rabbitmq_url: str
) -> None:
    sink = RabbitMQSink(rabbitmq_url)
    sink.send("default", "br", _bodies(200))
    tr = RabbitMQTransport(rabbitmq_url, "br")
    try:
        first = _fetch_all(tr, 50)
        tr.settle(Outcomes(acks=[d.token for d in first]))
        down = time.monotonic()
        rabbitmq_server.restart()
        restart_s = time.monotonic() - down
        seen = {d.payload for d in first}
        deadline = time.monotonic() + 120
        while len(seen) < 200 and time.monotonic() < deadline:
            try:
                batch = tr.fetch(100, 0.3)
                tr.settle(Outcomes(acks=[d.token for d in batch]))
            except RabbitMQUnavailableError:
                time.sleep(0.1)
                continue
            seen |= {d.payload for d in batch}
        assert seen == set(_bodies(200))
    finally:
        tr.close()
        sink.close()
    print(f"[figures] broker restart took {restart_s:.1f} s; all 200 messages processed after it")


@pytest.mark.rabbitmq
def test_backlog_is_ready_only_from_a_passive_declare(rabbitmq_url: str) -> None:
    src = RabbitMQSource(rabbitmq_url, "bk")
    try:
        assert src.backlog().ready == 0  # the source declared the queue: it exists before any worker
        RabbitMQSink(rabbitmq_url).send("default", "bk", _bodies(10))
        tr = RabbitMQTransport(rabbitmq_url, "bk", consume=False)
        held = tr.fetch(3, 0.1)
        assert len(held) == 3
        b = src.backlog()
        assert (b.ready, b.in_flight, b.dead) == (7, None, 0)  # unacked come from heartbeats
        tr.close()
        wait_for(lambda: src.backlog().ready == 10, 10, what="held messages back on close")
        assert src.describe()["ready"] == 10
        assert src.purge() == 2
        assert src.describe()["ready"] is None  # gone
    finally:
        src.close()


@pytest.mark.rabbitmq
async def test_the_sdk_and_the_cli_publish_to_rabbitmq(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import subprocess
    import sys

    from sluiceway import codec
    from sluiceway.publish import AsyncPublisher, Publisher, publish_async
    from tests.support.workers import REPO, worker_env

    pub = Publisher(rabbitmq_url)  # the amqp:// scheme picks the broker
    ids = pub.publish_batch("sdk", [{"i": i} for i in range(3)])
    pub.publish("sdk", {"i": 3})
    pub.close()
    apub = AsyncPublisher(rabbitmq_url)
    await apub.publish("sdk", {"i": 4})
    await apub.aclose()
    monkeypatch.setenv("SLUICEWAY_BROKER", "rabbitmq")
    monkeypatch.setenv("SLUICEWAY_BROKER_URL", rabbitmq_url)
    await publish_async("sdk", {"i": 5})
    env = worker_env("redis://127.0.0.1:1/0", SLUICEWAY_BROKER="rabbitmq", SLUICEWAY_BROKER_URL=rabbitmq_url)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sluiceway", "publish", "-q", "sdk", '{"i": 6}'],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "published 1 message" in out.stdout
    tr = RabbitMQTransport(rabbitmq_url, "sdk")
    try:
        got = _fetch_all(tr, 7)
        tr.settle(Outcomes(acks=[d.token for d in got]))
    finally:
        tr.close()
    messages = [codec.decode(d.payload) for d in got]
    assert sorted(m.kwargs["i"] for m in messages) == list(range(7))  # plain JSON keyword arguments
    assert set(ids) <= {m.meta.id for m in messages}
