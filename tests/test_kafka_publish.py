"""Publishing with a key and with a reply: the key is the Kafka record key (one key, one
partition), refused by name on brokers that have none; ``publish(..., reply=True)`` returns the
same Handle as ``submit``, answered by a real worker on Kafka and on Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer

import sluiceway
from sluiceway.results import Handle
from sluiceway.transports import kafka_common as kc
from tests.support.processes import free_port
from tests.support.workers import SpawnWorker

NS = "default"
TASKS = "tests.support.call_tasks"


def records(kafka_url: str, queue: str, n: int, timeout: float = 60) -> list[tuple[bytes | None, int]]:
    """(key, partition) of the work topic's first ``n`` records."""
    c = Consumer(
        {
            "bootstrap.servers": kc.bootstrap(kafka_url),
            "group.id": f"read-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([kc.topic(NS, queue)])
    out: list[tuple[bytes | None, int]] = []
    try:
        for _ in range(int(timeout / 0.5)):
            if len(out) >= n:
                break
            for m in c.consume(num_messages=n, timeout=0.5):
                if m.error() is None:
                    out.append((m.key(), m.partition() or 0))
    finally:
        c.close()
    return out


def make_topics(kafka_url: str, queue: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kc.bootstrap(kafka_url)})
    kc.ensure_topics(
        admin, {kc.topic(NS, queue): partitions, kc.retry_topic(NS, queue): 1, kc.dead_topic(NS, queue): 1}
    )


def test_keys_reach_kafka_and_one_key_keeps_one_partition(kafka_url: str) -> None:
    queue = f"k{uuid.uuid4().hex[:8]}"
    make_topics(kafka_url, queue, 4)
    pub = sluiceway.Publisher(kafka_url)
    try:
        pub.publish(queue, {"n": 0}, key="user-1")
        pub.publish(queue, {"n": 1}, key=b"user-2")
        pub.publish_batch(
            queue, [{"n": i} for i in range(2, 22)], keys=[f"user-{i % 3}" for i in range(2, 22)]
        )
        pub.publish(queue, {"n": 22})  # no key: still allowed
        with pytest.raises(ValueError, match="keys: 2 keys for 3 messages"):
            pub.publish_batch(queue, [{"n": 0}] * 3, keys=["a", "b"])
    finally:
        pub.close()

    async def from_asyncio() -> None:
        await sluiceway.AsyncPublisher(kafka_url).publish(queue, {"n": 23}, key="user-1")

    asyncio.run(from_asyncio())
    got = records(kafka_url, queue, 24)
    assert len(got) == 24  # and nothing more was sent by the refused batch
    by_key: dict[bytes | None, set[int]] = {}
    for key, partition in got:
        by_key.setdefault(key, set()).add(partition)
    assert set(by_key) == {b"user-0", b"user-1", b"user-2", None}
    assert all(len(ps) == 1 for k, ps in by_key.items() if k is not None), by_key


def test_the_cli_publishes_with_a_key(kafka_url: str) -> None:
    queue = f"c{uuid.uuid4().hex[:8]}"
    make_topics(kafka_url, queue, 2)
    env = {"SLUICEWAY_BROKER": "kafka", "SLUICEWAY_BROKER_URL": kafka_url}
    cmd = [sys.executable, "-m", "sluiceway", "publish", "-q", queue, "--key", "k1", '{"n": 1}', '{"n": 2}']
    done = subprocess.run(cmd, env={**_base_env(), **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = records(kafka_url, queue, 2)
    assert [k for k, _ in got] == [b"k1", b"k1"] and len({p for _, p in got}) == 1


@pytest.mark.redis
def test_a_key_on_a_broker_without_keys_is_refused_by_name(redis_url: str) -> None:
    pub = sluiceway.Publisher(redis_url)
    try:
        with pytest.raises(ValueError, match=r"^key: the redis broker has no message key"):
            pub.publish("q", {"n": 1}, key="a")
        with pytest.raises(ValueError, match=r"^key: the redis broker"):
            pub.publish_batch("q", [{"n": 1}], keys=["a"])
        pub.publish_batch("q", [{"n": 1}], keys=[None])  # no key at all is fine
    finally:
        pub.close()
    cmd = [
        sys.executable,
        "-m",
        "sluiceway",
        "publish",
        "-q",
        "q",
        "--redis-url",
        redis_url,
        "--key",
        "a",
        "{}",
    ]
    done = subprocess.run(cmd, env=_base_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--key: key: the redis broker" in done.stderr, done.stderr


@pytest.mark.redis
def test_publish_with_reply_returns_the_handle_submit_returns(
    redis_url: str, spawn_worker: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEWAY_REDIS_URL", redis_url)
    monkeypatch.delenv("SLUICEWAY_BROKER", raising=False)
    queue = f"echo{uuid.uuid4().hex[:6]}"
    spawn_worker("-f", f"{TASKS}:echo", "-q", queue, "--heartbeat", "0.5", "--lease", "3")
    pub = sluiceway.Publisher(redis_url)
    try:
        handle = pub.publish(queue, {"value": [1, "a"]}, reply=True)
        assert isinstance(handle, Handle)
        assert handle.result(timeout=60) == [1, "a"]
        with pytest.raises(ValueError, match="reply=True"):
            pub.publish(queue, {"value": 1}, reply=True, metadata=False)
    finally:
        pub.close()
    late = sluiceway.publish(queue, {"value": "later"}, reply=True)  # the module-level function
    assert isinstance(sluiceway.submit(queue, {"value": 0}), Handle)

    async def awaited() -> object:
        h = await sluiceway.publish_async(queue, {"value": {"x": 2}}, reply=True)
        return await h.result_async(timeout=60)

    assert asyncio.run(awaited()) == {"x": 2}
    assert late.result(timeout=60) == "later"  # awaited well after it was published


@pytest.mark.redis
@pytest.mark.slow
def test_publish_with_reply_and_key_on_kafka(
    redis_url: str, kafka_url: str, spawn_worker: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEWAY_REDIS_URL", redis_url)
    queue = f"ke{uuid.uuid4().hex[:6]}"
    spawn_worker("-f", f"{TASKS}:echo", "-q", queue, SLUICEWAY_BROKER="kafka", SLUICEWAY_BROKER_URL=kafka_url)
    pub = sluiceway.Publisher(kafka_url)
    try:
        handles = [pub.publish(queue, {"value": i}, key=f"k{i % 2}", reply=True) for i in range(4)]
        assert [h.result(timeout=120) for h in handles] == [0, 1, 2, 3]
    finally:
        pub.close()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_")}


def test_an_unreachable_broker_is_one_line_not_librdkafkas_retries() -> None:
    """librdkafka retries a refused connection every ~50 ms and logged each try (about 680
    lines in 30 s); the CLI says the outcome in one line and exits 5, as on the other brokers."""
    url = f"kafka://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "SLUICEWAY_BROKER": "kafka", "SLUICEWAY_BROKER_URL": url}
    out = subprocess.run(
        [sys.executable, "-m", "sluiceway", "publish", "-q", f"closed-{uuid.uuid4().hex[:6]}", '{"a": 1}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = out.stderr.splitlines()
    assert out.returncode == 5, out.stderr
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {lines[:5]}"
    assert lines[0].startswith(f"sluiceway publish: cannot reach kafka at {url}"), lines
    # librdkafka's "all brokers down" ended it, not the 30-s metadata timeout (_TRANSPORT).
    assert "_ALL_BROKERS_DOWN" in lines[0], lines
    assert "Connection refused" in lines[0], lines


def test_the_sdk_fails_fast_on_a_broker_it_never_reached() -> None:
    from confluent_kafka import KafkaError, KafkaException

    pub = sluiceway.Publisher(f"kafka://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(KafkaException) as caught:
            pub.publish(f"closed-{uuid.uuid4().hex[:6]}", {"a": 1})
    finally:
        pub.close()
    assert caught.value.args[0].code() == KafkaError._ALL_BROKERS_DOWN


def test_one_bootstrap_address_down_does_not_fail_the_publish(kafka_url: str) -> None:
    queue = f"half-{uuid.uuid4().hex[:6]}"
    url = f"kafka://127.0.0.1:{free_port()},{kc.bootstrap(kafka_url)}"  # the first one refuses
    pub = sluiceway.Publisher(url)
    try:
        pub.publish(queue, {"a": 1})
    finally:
        pub.close()
    assert len(records(kafka_url, queue, 1)) == 1


def test_all_brokers_down_is_final_only_after_its_grace() -> None:
    from confluent_kafka import KafkaError

    now = [100.0]
    reach = kc.Reachability(clock=lambda: now[0])
    reach.on_error(KafkaError(KafkaError._TRANSPORT, "b:1/bootstrap: Connect to b:1 failed: refused"))
    assert not reach.unreachable()  # one broker's failure says nothing of the others
    reach.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "0/1 brokers are down"))
    now[0] += kc.UNREACHABLE_GRACE - 0.01
    assert not reach.unreachable()  # another address of the name, or a broker starting
    reach.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "0/1 brokers are down"))  # again: same start
    now[0] += 0.01
    assert reach.unreachable()
    error = reach.error().args[0]
    assert error.code() == KafkaError._ALL_BROKERS_DOWN
    assert "Connect to b:1 failed: refused" in error.str()


def test_without_reachability_a_down_broker_is_waited_for() -> None:
    """The worker's path (no Reachability): its metadata call is one call with the whole
    timeout, so a broker that restarts is waited for, never failed fast."""
    calls: list[float] = []

    class Admin:
        def list_topics(self, timeout: float) -> object:
            calls.append(timeout)
            return "metadata"

        def poll(self, timeout: float) -> int:
            raise AssertionError("no callback is read without a Reachability")

    assert kc.cluster_metadata(Admin(), 30.0) == "metadata"
    assert calls == [30.0]


def test_a_healthy_publish_and_worker_log_nothing_from_the_client(kafka_url: str) -> None:
    queue = f"quiet-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "SLUICEWAY_BROKER": "kafka", "SLUICEWAY_BROKER_URL": kafka_url}
    out = subprocess.run(
        [sys.executable, "-m", "sluiceway", "publish", "-q", queue, '{"a": 1}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_repeated_client_lines_are_folded() -> None:
    import logging

    now = [0.0]
    fold = kc.FoldRepeats(window=60, clock=lambda: now[0])

    def line(text: str) -> logging.LogRecord:
        return logging.LogRecord(
            kc.CLIENT_LOGGER, logging.ERROR, "", 0, "%s [%s] %s", ("FAIL", "p#1", text), None
        )

    refused = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after {}ms)"
    passed = []
    for i in range(600):  # 30 s of retries every 50 ms
        now[0] = i * 0.05
        r = line(refused.format(i % 3))
        if fold.filter(r):
            passed.append(r.getMessage())
    assert len(passed) == 1
    assert fold.filter(line("another error"))  # a different line is not folded into it
    now[0] = 61.0
    r = line(refused.format(7))
    assert fold.filter(r)
    assert "(and 599 more like it in the last 60 s)" in r.getMessage()


def test_keyless_records_spread_evenly_over_the_partitions(kafka_url: str) -> None:
    """A burst without keys lands in equal shares, whether it is one batch or single publishes: a
    group drains no faster than its fullest partition (librdkafka's sticky choice once put 999 of
    1000 on one partition of 6)."""
    queue = f"s{uuid.uuid4().hex[:8]}"
    make_topics(kafka_url, queue, 6)
    pub = sluiceway.Publisher(kafka_url)
    try:
        pub.publish_batch(queue, [{"n": i} for i in range(600)])
        for i in range(600, 612):
            pub.publish(queue, {"n": i})
        pub.publish_batch(queue, [{"n": i} for i in range(612, 624)], keys=["k", None] * 6)
    finally:
        pub.close()
    got = records(kafka_url, queue, 624)
    keyless = [p for key, p in got if key is None]
    assert len(got) == 624 and len(keyless) == 618
    counts = [keyless.count(p) for p in range(6)]
    assert counts == [103] * 6, counts
    assert len({p for key, p in got if key == b"k"}) == 1
