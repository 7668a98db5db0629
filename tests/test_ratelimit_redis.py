"""The Lua rate limiter against its pure model (``sluiceway.ratelimit.gcra``), on a real Redis.

The scripts read the server clock themselves, so each reply is checked against the model run at
the "now" the reply implies (``start - first_offset``), and that now must lie between two TIME
readings taken around the call. With no other writer, the model then predicts the count, the
offsets, the new limiter state and the retry-after exactly (to the scripts' 3 decimals).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluiceway import connection
from sluiceway.contract import Keys
from sluiceway.ratelimit import gcra
from sluiceway.ratelimit.redis import RedisLimiter
from sluiceway.transports.base import Outcomes
from sluiceway.transports.redis import RedisTransport

pytestmark = pytest.mark.redis
KEYS = Keys("default", "rl")


def _now_us(r: redis.Redis) -> float:
    s, us = r.time()
    return s * 1_000_000 + us


def _tat(r: redis.Redis) -> float | None:
    raw = r.get(KEYS.ratelimit)
    return float(raw) if raw is not None else None


def _check(
    tat: float | None,
    t0: float,
    t1: float,
    reply: dict[str, Any],
    *,
    qps: float,
    burst: int,
    horizon_us: int,
    wanted: int,
) -> None:
    step = gcra.interval_us(qps)
    assert reply["interval_us"] == pytest.approx(step, abs=1e-3)
    if wanted == 0:
        assert reply["count"] == 0
        return
    if reply["count"]:
        start = reply["new_tat"] - reply["count"] * step
    else:
        assert tat is not None, "nothing granted means a limiter state in the future"
        start = max(tat, 0.0)
    now = start - reply["first_offset_us"]
    assert t0 - 1 <= now <= t1 + 1, "the implied now lies within the call"
    g = gcra.grant(tat_us=tat, now_us=now, qps=qps, burst=burst, horizon_us=horizon_us, wanted=wanted)
    assert g.count == reply["count"]
    assert g.first_offset_us == pytest.approx(reply["first_offset_us"], abs=0.01)
    if g.count:
        assert g.new_tat_us == pytest.approx(reply["new_tat"], abs=0.01)
    else:
        assert g.retry_after_us == pytest.approx(reply["retry_after_us"], abs=0.01)


requests = st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=12)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    qps=st.sampled_from([1.0, 7.5, 100.0, 1000.0, 25_000.0]),
    burst=st.integers(0, 5),
    horizon_ms=st.sampled_from([1, 10, 100, 1000]),
    wanted=requests,
)
def test_acquire_lua_is_the_model(
    redis_url: str, qps: float, burst: int, horizon_ms: int, wanted: list[int]
) -> None:
    r = redis.Redis.from_url(redis_url)
    r.delete(KEYS.ratelimit)
    limiter = RedisLimiter(r, KEYS.ratelimit, qps=qps, burst=burst, horizon_seconds=horizon_ms / 1000)
    for n in wanted:
        tat = _tat(r)
        t0 = _now_us(r)
        slots = limiter.acquire(n)
        t1 = _now_us(r)
        reply = {
            "count": slots.count,
            "first_offset_us": slots.first_offset_us,
            "interval_us": slots.interval_us,
            "retry_after_us": slots.retry_after_us,
            "new_tat": float(slots.lease.tat) if slots.lease else 0.0,
        }
        _check(tat, t0, t1, reply, qps=qps, burst=burst, horizon_us=horizon_ms * 1000, wanted=n)
        if n == 0:
            assert _tat(r) == tat, "asking for nothing changes nothing"
    r.close()


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(qps=st.sampled_from([2.0, 50.0, 900.0]), taken=st.integers(1, 30), back=st.integers(0, 40))
def test_release_lua_is_the_model(redis_url: str, qps: float, taken: int, back: int) -> None:
    r = redis.Redis.from_url(redis_url)
    r.delete(KEYS.ratelimit)
    limiter = RedisLimiter(r, KEYS.ratelimit, qps=qps, horizon_seconds=10)
    slots = limiter.acquire(taken)
    assert slots.lease is not None
    expected = gcra.release(
        tat_us=float(slots.lease.tat), expected_tat_us=float(slots.lease.tat), qps=qps, count=back
    )
    assert limiter.release(slots.lease, back) is (back > 0)
    assert _tat(r) == pytest.approx(expected, abs=0.01)
    # Once someone leased after us, a hand-back changes nothing (it could overlap their slots).
    r.delete(KEYS.ratelimit)
    ours = limiter.acquire(1)
    later = limiter.acquire(1)
    assert ours.lease is not None and later.count == 1
    before = _tat(r)
    assert limiter.release(ours.lease, 1) is False
    assert _tat(r) == before
    r.close()


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    qps=st.sampled_from([5.0, 200.0, 5000.0]),
    burst=st.integers(0, 3),
    depth=st.integers(0, 40),
    wanted=requests,
)
def test_the_fused_fetch_takes_slots_as_the_model_does(
    redis_url: str, qps: float, burst: int, depth: int, wanted: list[int]
) -> None:
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    if depth:
        r.lpush(KEYS.ready, *[f'{{"n":{i}}}' for i in range(depth)])
    transport = RedisTransport(
        connection.client(redis_url), KEYS, "w", lease_seconds=30, qps=qps, burst=burst, horizon_seconds=0.1
    )
    left = depth
    for n in wanted:
        tat = _tat(r)
        t0 = _now_us(r)
        batch = transport.begin_exchange(Outcomes(), n).result().batch if n else None
        t1 = _now_us(r)
        if batch is None:
            continue
        want = min(n, left)  # the script only takes slots for messages it can hand out
        if want == 0:
            assert batch.deliveries == [] and _tat(r) == tat
            continue
        count = len(batch.deliveries)
        left -= count
        if count:
            assert batch.slots is not None
            step = batch.slots.interval_us
            first = batch.deliveries[0].start_after * 1e6
            new_tat = float(batch.slots.tat)
            start = new_tat - count * step
            now = start - first if first > 0 else None
            g_now = now if now is not None else t1
            g = gcra.grant(tat_us=tat, now_us=g_now, qps=qps, burst=burst, horizon_us=100_000, wanted=want)
            if now is not None:
                assert t0 - 1 <= now <= t1 + 1
                assert g.count == count and g.new_tat_us == pytest.approx(new_tat, abs=0.01)
            else:  # the first slot starts at once: the model grants at least as many at t1
                assert (
                    count
                    <= gcra.grant(
                        tat_us=tat, now_us=t1, qps=qps, burst=burst, horizon_us=100_000, wanted=want
                    ).count
                )
            for a, b in zip(batch.deliveries, batch.deliveries[1:], strict=False):
                assert b.start_after >= a.start_after
        else:
            assert batch.retry_after > 0
    transport.client.close()
    r.close()


def test_slots_are_dated_on_the_servers_clock_not_when_their_reply_is_read(redis_url: str) -> None:
    """A fetch's reply that waits 50 ms before it is read (a busy or descheduled worker) still
    places its slots where the server granted them: before ratelimit.clock every one of them
    started 50 ms late, bunched against the slots other workers started on time. Redis runs on
    this host, so its TIME and time.time() read the same clock and the placement can be checked
    exactly."""
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.lpush(KEYS.ready, *[f'{{"n":{i}}}' for i in range(40)])
    transport = RedisTransport(
        connection.client(redis_url), KEYS, "w", lease_seconds=30, qps=100, burst=0, horizon_seconds=0.1
    )
    for _ in range(10):  # fetches read at once: what pins the clocks' offset
        transport.begin_exchange(Outcomes(), 1).result()
    time.sleep(0.2)  # past the slots those took, so the next grant starts at the server's now
    pending = transport.begin_exchange(Outcomes(), 10)
    time.sleep(0.05)
    batch = pending.result().batch
    read_wall = time.time()
    width = transport.clock.width(time.monotonic())
    assert width < 0.02, f"no quick round trip to date slots by (width {width * 1000:.1f} ms)"
    assert batch.slots is not None and len(batch.deliveries) == 10
    step, tat = batch.slots.interval_us, float(batch.slots.tat)
    for i, d in enumerate(batch.deliveries):
        granted = (tat - (10 - i) * step) / 1e6  # slot i on the server's clock
        placed = read_wall + d.start_after
        # Never early (beyond the two clock reads' own distance), late by at most the width.
        assert placed >= granted - 0.001, f"slot {i} placed {1000 * (granted - placed):.1f} ms early"
        assert placed - granted <= width + 0.002, f"slot {i} placed {1000 * (placed - granted):.1f} ms late"
    transport.client.close()
    r.close()
