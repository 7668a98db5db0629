"""What every transport guarantees, checked against its real server with real worker processes.

Parametrised by broker through the ``broker_env`` fixture (see ``conftest.py`` for how a broker
joins). Each scenario prints one ``[figures]`` line: messages, lost, duplicates, dead-lettered by
reason, and, where a worker dies, the time until its messages ran again. The assertions are the
guarantees (none lost, the QPS bound, a reason for every dead letter); timings are reported, and
only bounded where the docs promise a bound.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest
import redis

from sluiceway import codec
from sluiceway.ratelimit import max_in_window
from tests.conformance.conftest import BrokerEnv, Fleet, figures_line
from tests.support.starts import start_bound, worst_window
from tests.support.workers import wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

FAST = ["--lease", "3", "--heartbeat", "0.5"]
WORK = "tests.conformance.tasks:work"


def _counts(r: redis.Redis, key: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in r.hgetall(key).items()}


def _done(r: redis.Redis) -> int:
    return int(r.hlen("c:done"))


def _reasons(broker: BrokerEnv) -> dict[str, int]:
    return dict(Counter(str(e["reason"]) for e in broker.dead_letters()))


def _summary(r: redis.Redis, messages: int) -> dict[str, int]:
    seen, done = _counts(r, "c:seen"), _counts(r, "c:done")
    return {
        "messages": messages,
        "lost": messages - len(set(done) & set(range(messages))),
        "duplicates": sum(seen.values()) - len(seen),
    }


def test_kill_9_loses_nothing(broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis) -> None:
    total = 3000
    broker_env.publish([{"n": i, "sleep": 0.02} for i in range(total)])
    victim = fleet_.spawn(WORK, "-c", "16", *FAST, worker_id="victim")
    others = [fleet_.spawn(WORK, "-c", "8", *FAST, worker_id=f"w{i}") for i in range(2)]
    wait_for(lambda: _done(record) > 500, 90, what="progress before the kill")
    victim.kill()
    killed_at = time.monotonic()
    victim.wait(10)
    seen, done, by = _counts(record, "c:seen"), _counts(record, "c:done"), record.hgetall("c:by")
    # Messages the victim had started and not finished: they must run again.
    held = [
        n for n, k in seen.items() if n not in done and by.get(str(n).encode()) == str(victim.pid).encode()
    ]
    wait_for(
        lambda: all(_counts(record, "c:seen").get(n, 0) >= 2 or n in _counts(record, "c:done") for n in held),
        60,
        what="the victim's messages to run again",
    )
    rerun_after = time.monotonic() - killed_at
    wait_for(lambda: _done(record) >= total, 180, what="every message done")
    s = _summary(record, total)
    print(
        figures_line(
            "kill-9",
            broker_env.name,
            **s,
            dead=_reasons(broker_env),
            victim_held=len(held),
            rerun_after_s=round(rerun_after, 2),
        )
    )
    assert s["lost"] == 0
    assert _reasons(broker_env) == {}
    for w in others:
        w.terminate()
        assert w.wait(30) == 0


def test_sigterm_drains(broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis) -> None:
    total = 40
    broker_env.publish([{"n": i, "sleep": 4} for i in range(total)])
    w = fleet_.spawn(WORK, "-c", "4", "--prefetch", "8", "--drain", "30", *FAST)
    wait_for(lambda: len(_counts(record, "c:seen")) >= 4, 60, what="4 tasks running")
    w.terminate()
    stopped_at = time.monotonic()
    assert w.wait(60) == 0, w.output()
    drain = time.monotonic() - stopped_at
    started = set(_counts(record, "c:seen"))
    assert started <= set(_counts(record, "c:done")), "every task that started finished before exit"
    rest = fleet_.spawn(WORK, "-c", "40", *FAST)
    wait_for(lambda: _done(record) >= total, 90, what="the rest drained by another worker")
    s = _summary(record, total)
    print(figures_line("sigterm", broker_env.name, **s, dead=_reasons(broker_env), drain_s=round(drain, 2)))
    assert s["lost"] == 0 and s["duplicates"] == 0
    rest.terminate()
    assert rest.wait(30) == 0


def test_every_poison_input_is_retried_then_dead_lettered_with_a_reason(
    broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis
) -> None:
    old = codec.encode({"n": 5}, codec.Meta(id="old", published_at=time.time() - 3600))
    broker_env.publish_raw([b'{"n": "\xff"}', b"[1, 2, 3]", b'{"n": 1, "unexpected": 1}', old])
    broker_env.publish([{"n": 100}])  # and one that is fine
    w = fleet_.spawn(WORK, "--max-age", "600", *FAST)
    wait_for(lambda: sum(_reasons(broker_env).values()) == 4 and _done(record) == 1, 60, what="every outcome")
    reasons = _reasons(broker_env)
    assert reasons == {"invalid_encoding": 1, "not_an_object": 1, "bad_arguments": 1, "expired": 1}
    w.terminate()
    assert w.wait(30) == 0
    print(figures_line("poison", broker_env.name, messages=5, lost=0, dead=reasons))


def test_a_raising_function_and_a_hang_are_retried_with_backoff_then_dead_lettered(
    broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis
) -> None:
    broker_env.publish([{"n": 2}])
    f = fleet_.spawn(
        "tests.conformance.tasks:fails",
        "--max-attempts",
        "3",
        "--backoff",
        "0.4",
        "--max-backoff",
        "2",
        *FAST,
    )
    wait_for(lambda: _reasons(broker_env).get("error") == 1, 60, what="the raising function dead-lettered")
    f.terminate()
    assert f.wait(30) == 0
    attempts = [float(x) for x in record.lrange("c:attempt:2", 0, -1)]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 3, "retried up to max attempts, then dead-lettered"
    # Equal jitter: retry k waits at least half of base * 2**(k-1).
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
    broker_env.publish([{"n": 3}])
    h = fleet_.spawn(
        "tests.conformance.tasks:hangs", "--max-attempts", "2", "--timeout", "0.5", "--backoff", "0.1", *FAST
    )
    wait_for(lambda: _reasons(broker_env).get("timeout") == 1, 60, what="the hang dead-lettered")
    h.terminate()
    h.wait(30)
    (err,) = [e for e in broker_env.dead_letters() if e["reason"] == "error"]
    assert "ValueError" in str(err["detail"]) and err["attempts"] == 3
    print(
        figures_line(
            "retry",
            broker_env.name,
            messages=2,
            lost=0,
            dead=_reasons(broker_env),
            backoff_gaps_s=[round(g, 2) for g in gaps],
        )
    )


def test_a_broker_restart_mid_run_loses_nothing(
    broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis
) -> None:
    total = 3000
    broker_env.publish([{"n": i, "sleep": 0.003} for i in range(total)])
    workers = [fleet_.spawn(WORK, "-c", "8", *FAST) for _ in range(2)]
    wait_for(lambda: _done(record) > 300, 90, what="progress")
    broker_env.restart(2.0)
    r2 = redis.Redis.from_url(broker_env.records)
    wait_for(lambda: _done(r2) >= total, 180, what="every message done after the restart")
    s = _summary(r2, total)
    print(figures_line("broker-restart", broker_env.name, **s, dead=_reasons(broker_env)))
    assert s["lost"] == 0
    for w in workers:
        assert w.proc.poll() is None, "an outage must not kill a worker"
        w.terminate()
        assert w.wait(30) == 0


def test_the_fleet_qps_bound_holds_while_workers_join_and_leave(
    broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis
) -> None:
    # 12 s: the join at 4 s and the leave at 8 s each have 4 s of the fleet before and after.
    # It runs four times in CI's serial phase (a broker each), so each second here costs four.
    qps, duration = 20, 12
    broker_env.publish([{"n": i} for i in range(qps * (duration + 10))])
    args = ["-c", "4", "--qps", str(qps), *FAST]
    workers = [fleet_.spawn(WORK, *args) for _ in range(2)]
    wait_for(lambda: record.llen("c:starts") > 0, 60, what="the first start")
    t0 = time.monotonic()
    joined = left = False
    while time.monotonic() - t0 < duration:
        elapsed = time.monotonic() - t0
        if elapsed > duration / 3 and not joined:
            workers += [fleet_.spawn(WORK, *args) for _ in range(2)]
            joined = True
        if elapsed > 2 * duration / 3 and not left:
            workers[0].terminate()
            workers[1].kill()
            left = True
        time.sleep(0.2)
    starts = sorted(float(x) for x in record.lrange("c:starts", 0, -1))
    window = [t for t in starts if t < starts[0] + duration]
    raw = max_in_window(window, 1.0)
    worst = worst_window(window)
    print(
        figures_line(
            "qps-bound",
            broker_env.name,
            qps=qps,
            mean=round(len(window) / duration, 2),
            worst_1s=worst,
            worst_1s_recorded=raw,
            bound=start_bound(qps),
            dead=_reasons(broker_env),
        )
    )
    assert worst <= start_bound(qps)


def test_identical_payloads_each_run_including_after_a_worker_dies(
    broker_env: BrokerEnv, fleet_: Fleet, record: redis.Redis
) -> None:
    copies = 30
    broker_env.publish_raw([b'{"n":1,"sleep":20}'] * copies + [b'{"n":2}'] * copies)
    victim = fleet_.spawn(WORK, "-c", str(copies), "--prefetch", "0", *FAST, worker_id="victim")
    wait_for(lambda: _counts(record, "c:seen").get(1) == copies, 60, what="every slow copy running")
    victim.kill()
    killed_at = time.monotonic()
    record.hdel("c:seen", "1")
    w = fleet_.spawn(WORK, "-c", str(2 * copies), "--max-attempts", "2", *FAST)
    wait_for(lambda: _counts(record, "c:seen").get(1) == copies, 60, what="every slow copy running again")
    rerun_after = time.monotonic() - killed_at
    wait_for(lambda: _counts(record, "c:done").get(2, 0) >= copies, 60, what="the fast copies")
    wait_for(lambda: _counts(record, "c:done").get(1, 0) >= copies, 60, what="the slow copies")
    dead = _reasons(broker_env)
    print(
        figures_line(
            "identical-payloads",
            broker_env.name,
            messages=2 * copies,
            lost=0,
            dead=dead,
            rerun_after_s=round(rerun_after, 2),
        )
    )
    assert dead == {}
    w.terminate()
    assert w.wait(30) == 0
