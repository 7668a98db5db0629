"""Calls and results against a real Redis and real worker processes: values, RemoteError, timeouts,
late awaiters within the TTL, and 10,000 concurrent calls from one process on few connections."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

import sluiceway
from sluiceway import codec, result_record
from sluiceway.contract import REPLY_PREFIX, reply_channel_of, reply_key
from tests.support.workers import SpawnWorker, wait_for_async

TASKS = "tests.support.call_tasks"


def worker(spawn: SpawnWorker, fn: str, *args: str, **env: str) -> None:
    spawn("-f", f"{TASKS}:{fn}", "-q", fn, "--heartbeat", "0.5", "--lease", "3", *args, **env)


# --- pure: the record and the key scheme -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_a_success_record_round_trips_any_json_value(value: Any) -> None:
    key = reply_key("c", "m")
    record = result_record.parse(result_record.success(key, value))
    assert record["key"] == key
    assert result_record.outcome(record) == value


def test_a_value_json_cannot_carry_becomes_a_failure_record() -> None:
    for bad in (object(), float("nan"), {1j: 2}):
        record = result_record.parse(result_record.success("k", bad))
        with pytest.raises(sluiceway.RemoteError) as err:
            result_record.outcome(record)
        assert err.value.reason == "unserialisable_result"


def test_a_failure_record_names_reason_type_and_message() -> None:
    raw = result_record.for_outcome(
        "k", ok=False, value=None, reason="error", error=ValueError("bad \ud800 input"), dead_entry=b""
    )
    with pytest.raises(sluiceway.RemoteError) as err:
        result_record.outcome(result_record.parse(raw))
    assert (err.value.reason, err.value.type) == ("error", "ValueError")
    assert "bad" in err.value.message


def test_only_reply_keys_are_accepted_as_a_reply() -> None:
    assert reply_channel_of(reply_key("c", "m")) is not None
    for bad in ("sluiceway:{default/q}:queue", REPLY_PREFIX, REPLY_PREFIX + "c", "x" * 300):
        assert reply_channel_of(bad) is None
    with pytest.raises(codec.DecodeError, match="reply"):
        codec.decode(b'{"$sluiceway": {"reply": "sluiceway:{default/q}:queue"}}')
    meta = codec.decode(codec.encode({}, codec.Meta(reply=reply_key("c", "m")))).meta
    assert meta.reply == reply_key("c", "m")


# --- against real workers ----------------------------------------------------------------------------


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SLUICEWAY_REDIS_URL", redis_url)
    monkeypatch.delenv("SLUICEWAY_BROKER", raising=False)
    return redis_url


@pytest.mark.redis
def test_call_returns_the_value_and_raises_remote_error(env: str, spawn_worker: SpawnWorker) -> None:
    worker(spawn_worker, "echo")
    worker(spawn_worker, "boom", "--max-attempts", "2", "--backoff", "0.05")
    worker(spawn_worker, "unserialisable")
    value = {"a": [1, 2.5, "ü"], "b": None}
    assert sluiceway.call("echo", {"value": value}, timeout=30) == value
    with pytest.raises(sluiceway.RemoteError) as err:
        sluiceway.call("boom", {"text": "no good"}, timeout=30)
    assert (err.value.reason, err.value.type, err.value.message) == ("error", "ValueError", "no good")
    with pytest.raises(sluiceway.RemoteError) as err:
        sluiceway.call("echo", {"nope": 1}, timeout=30)
    assert err.value.reason == "bad_arguments"
    with pytest.raises(sluiceway.RemoteError) as err:
        sluiceway.call("unserialisable", {}, timeout=30)
    assert err.value.reason == "unserialisable_result"


@pytest.mark.redis
async def test_call_async_values_errors_and_async_functions(env: str, spawn_worker: SpawnWorker) -> None:
    worker(spawn_worker, "echo")
    worker(spawn_worker, "echo_async", "--concurrency-mode", "asyncio")
    worker(spawn_worker, "boom", "--max-attempts", "1")
    got = await asyncio.gather(*(sluiceway.call_async("echo", {"value": i}, timeout=30) for i in range(50)))
    assert got == list(range(50))
    assert await sluiceway.call_async("echo_async", {"value": "x"}, timeout=30) == "x"
    with pytest.raises(sluiceway.RemoteError) as err:
        await sluiceway.call_async("boom", {"text": "async no good"}, timeout=30)
    assert (err.value.type, err.value.message) == ("ValueError", "async no good")


@pytest.mark.redis
async def test_a_timeout_raises_and_a_late_awaiter_still_gets_the_result(
    env: str, r: redis.Redis, spawn_worker: SpawnWorker
) -> None:
    worker(spawn_worker, "slow_echo", SLUICEWAY_RESULT_TTL="120")
    with pytest.raises(TimeoutError):
        await sluiceway.call_async("slow_echo", {"value": 1, "seconds": 1.0}, timeout=0.1)
    with pytest.raises(TimeoutError):
        sluiceway.call("slow_echo", {"value": 1, "seconds": 1.0}, timeout=0.1)
    # Published, not awaited: the result waits in its list, with the TTL, until someone asks.
    handle = await sluiceway.submit_async("slow_echo", {"value": "late", "seconds": 0.1})
    await wait_for_async(lambda: r.exists(handle.key), 30, what="the result to be written")
    assert 0 < r.ttl(handle.key) <= 120
    assert await handle.result_async(timeout=5) == "late"
    sync_handle = sluiceway.submit("slow_echo", {"value": "later", "seconds": 0.1})
    await wait_for_async(lambda: r.exists(sync_handle.key), 30, what="the result to be written")
    assert sync_handle.result(timeout=5) == "later"
    # A handle awaited before its result exists waits for it.
    early = sluiceway.submit("slow_echo", {"value": "early", "seconds": 0.3})
    assert await early.result_async(timeout=30) == "early"


def _my_ports() -> set[int]:
    """Local TCP ports of this process's sockets (from /proc), to pick its own CLIENT LIST lines."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _my_connections(r: redis.Redis) -> int:
    ports = _my_ports()
    return sum(1 for c in r.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports)


@pytest.mark.redis
@pytest.mark.slow
async def test_ten_thousand_concurrent_calls_share_a_few_connections(
    env: str, r: redis.Redis, spawn_worker: SpawnWorker
) -> None:
    for _ in range(2):
        worker(spawn_worker, "echo", "-c", "8")
    total = 10_000
    # Earlier tests' event loops may have left their sockets open in this process; count ours.
    baseline = _my_connections(r)
    peak = 0
    started = time.monotonic()
    calls = [
        asyncio.ensure_future(sluiceway.call_async("echo", {"value": i}, timeout=300)) for i in range(total)
    ]

    async def sample() -> None:
        nonlocal peak
        while not all(c.done() for c in calls):
            peak = max(peak, _my_connections(r) - baseline)
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    got = await asyncio.gather(*calls)
    await sampler
    elapsed = time.monotonic() - started
    assert got == list(range(total))
    print(
        f"[figures] {total} concurrent call_async: {elapsed:.2f} s, {total / elapsed:.0f} calls/s, "
        f"Redis connections this process opened for them {peak}"
    )
    # The subscription, one command connection, one publishing connection.
    assert 0 < peak <= 4
    # Delivered results are removed: nothing piles up for the TTL.
    # Polled without blocking the loop: the unlinker is one of this loop's tasks.
    await wait_for_async(
        lambda: not list(r.scan_iter(match=REPLY_PREFIX + "*", count=1000)), 10, what="keys unlinked"
    )


# --- the operator: spec.results.ttlSeconds reaches the workers as SLUICEWAY_RESULT_TTL -----------------


def test_spec_results_ttl_reaches_the_worker_env_and_bad_values_name_the_field() -> None:
    from pathlib import Path

    import yaml

    from sluiceway import contract
    from sluiceway_operator.spec import SpecError
    from tests.operator.test_manifests import deployment, env, spec

    assert env(deployment())[contract.ENV_RESULT_TTL]["value"] == str(contract.DEFAULT_RESULT_TTL_SECONDS)
    assert env(deployment(spec(results={"ttlSeconds": 60})))[contract.ENV_RESULT_TTL]["value"] == "60"
    with pytest.raises(SpecError, match=r"spec\.results\.ttlSeconds"):
        spec(results={"ttlSeconds": 0})
    crd = yaml.safe_load((Path(__file__).parents[1] / "crds" / "taskqueue.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["results"]["properties"]["ttlSeconds"]["default"] == contract.DEFAULT_RESULT_TTL_SECONDS
