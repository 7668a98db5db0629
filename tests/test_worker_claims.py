"""Claims of docs/worker.md, each checked against a real Redis and real worker processes.

The workers run as ``python -m sluiceway worker`` through tests/support, so these tests see only
what a user sees: Redis keys, exit codes, logs and metrics, never the worker's internals.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
import redis

import sluiceway
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.ratelimit import max_in_window
from tests.support.redis_server import RedisServer, free_port
from tests.support.starts import start_bound, worst_window
from tests.support.workers import SpawnWorker, WorkerProcess, wait_for

pytestmark = pytest.mark.redis

KEYS = Keys("default", "jobs")
RECORD = ["-f", "tests.tasks:record", "-q", "jobs"]


def publish(url: str, messages: list[dict[str, object]]) -> None:
    pub = sluiceway.Publisher(url)
    pub.publish_batch("jobs", messages)
    pub.close()


def counts(r: redis.Redis, key: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in r.hgetall(key).items()}


def starts(r: redis.Redis) -> list[float]:
    return sorted(float(x) for x in r.lrange("test:starts", 0, -1))


def log_lines(w: WorkerProcess) -> list[dict[str, object]]:
    out = []
    for line in w.output().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def events(w: WorkerProcess, text: str) -> list[dict[str, object]]:
    return [e for e in log_lines(w) if text in str(e.get("event", ""))]


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        body = resp.read().decode()
    return sum(float(x.rsplit(" ", 1)[1]) for x in body.splitlines() if x.startswith(name))


# --- lease expiry and stuck threads ------------------------------------------------------------


def test_each_lease_expiry_counts_as_an_attempt_and_ends_in_redelivered(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """A message that kills every worker that runs it is dead-lettered after max-attempts
    expiries, with reason ``redelivered``, instead of killing workers for ever."""
    publish(redis_url, [{"n": 0, "sleep": 600}])
    short = ["--lease", "1", "--heartbeat", "0.25", "--max-attempts", "2"]
    for run in (1, 2):
        w = spawn_worker(*RECORD, "--worker-id", f"victim-{run}", *short)
        wait_for(lambda run=run: counts(r, "test:seen").get(0) == run, 30, what=f"run {run} started")
        w.kill()
        w.wait()
    reaper = spawn_worker(*RECORD, "--worker-id", "reaper", *short)
    wait_for(lambda: r.llen(KEYS.dead) == 1, 30, what="the dead letter")
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "redelivered", entry
    assert counts(r, "test:seen") == {0: 2}, "not run a third time"
    reaper.terminate()
    assert reaper.wait() == 0


def test_more_stuck_threads_than_concurrency_exit_with_code_4(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    # One long C-level sleep: the injected TaskTimeout cannot interrupt it, so each thread is stuck.
    publish(redis_url, [{"n": i, "sleep": 600} for i in range(3)])
    w = spawn_worker(*RECORD, "-c", "1", "--timeout", "0.5", "--lease", "3", "--heartbeat", "0.5")
    assert w.wait(60) == 4, w.output()[-2000:]
    assert "ignore their timeout" in w.output()
    assert set(counts(r, "test:seen")) >= {0, 1}, "the first thread was replaced, and its successor stuck too"


# --- rate-limit slots --------------------------------------------------------------------------


def test_a_stalled_worker_takes_fresh_slots_instead_of_bunching_late_starts(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """The 10 ms rule: a task more than 10 ms late for its slot (here the whole process was
    stopped) takes a fresh one, so a stall never crowds one window. At 10 QPS a start recorded
    late by a loaded machine's scheduler still lands in its own 100 ms interval."""
    qps = 10
    publish(redis_url, [{"n": i} for i in range(1000)])
    port = free_port()
    stalled = spawn_worker(
        *RECORD, "-c", "4", "--qps", str(qps), "--metrics-port", str(port), SLUICEWAY_METRICS_PORT=str(port)
    )
    other = spawn_worker(*RECORD, "-c", "4", "--qps", str(qps))
    wait_for(lambda: len(starts(r)) > qps, 30, what="a steady rate")
    deadline = time.monotonic() + 60
    # A stop lands while the worker holds a slot it has not reached yet most of the time; repeat
    # until one did, as its own counter shows.
    while metric(port, "sluiceway_reslotted_tasks_total") == 0:
        assert time.monotonic() < deadline, "no stop ever caught a waiting slot"
        stalled.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # the stall itself
        stalled.proc.send_signal(signal.SIGCONT)
        time.sleep(0.3)  # let the resumed process start what it held before asking again
    raw = max_in_window(starts(r), 1.0)
    worst = worst_window(starts(r))
    print(
        f"\n[figures] stalled worker at {qps} QPS: worst 1-s window {raw} recorded, {worst} allowing the record lag (bound {start_bound(qps)})"
    )
    assert worst <= start_bound(qps)
    for w in (stalled, other):
        w.terminate()
        assert w.wait() == 0


def test_sigterm_hands_an_unused_slot_back_to_the_limiter(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """A worker stopped while it waits for its next slot gives that slot back: the limiter's next
    free slot is then one interval after the last start, not two."""
    qps = 5
    interval = 1 / qps
    publish(redis_url, [{"n": i} for i in range(1000)])

    def waiting_for_a_slot() -> bool:
        # A slot granted in the future (the limiter's next free slot is more than one interval
        # ahead of the Redis clock) is one the worker holds and has not reached: stop it now.
        tat = r.get(KEYS.ratelimit)
        secs, micros = r.time()
        return tat is not None and float(tat) / 1e6 - interval > secs + micros / 1e6 + 0.02

    for attempt in range(10):
        w = spawn_worker(*RECORD, "-c", "1", "--qps", str(qps), "--worker-id", f"w{attempt}")
        wait_for(lambda: len(starts(r)) > 0, 30, what="the first start")
        wait_for(waiting_for_a_slot, 10, interval=0.002, what="a granted slot not reached yet")
        w.terminate()
        assert w.wait() == 0
        if events(w, "handed messages back"):
            break  # the stop landed before the slot: the case under test
    else:
        pytest.fail("no SIGTERM caught the worker waiting for a slot")
    tat_us = float(r.get(KEYS.ratelimit) or 0)
    last_start = starts(r)[-1]
    gap = tat_us / 1e6 - last_start
    print(
        f"\n[figures] next free slot {gap * 1000:.0f} ms after the last start (interval {interval * 1000:.0f} ms)"
    )
    assert gap < 1.5 * interval, "the unused slot was not handed back"


def test_burst_allows_extra_starts_after_idling_then_holds_the_rate(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    qps, burst = 5, 10
    publish(redis_url, [{"n": i} for i in range(35)])
    w = spawn_worker(*RECORD, "-c", "20", "--qps", str(qps), "--qps-burst", str(burst))
    wait_for(lambda: len(starts(r)) == 35, 30, what="every start")
    s = starts(r)
    first_second = sum(1 for t in s if t < s[0] + 1.0)
    worst = max_in_window(s, 1.0)
    print(f"\n[figures] qps {qps} burst {burst}: first second {first_second} starts, worst window {worst}")
    assert first_second > qps + 1, "the burst allowance was not used"
    assert worst <= start_bound(qps, burst)
    # After the burst the rate is the limit: 35 starts need at least (35 - burst - qps - 1) / qps s.
    assert s[-1] - s[0] >= (35 - start_bound(qps, burst)) / qps - 0.05
    w.terminate()
    assert w.wait() == 0


# --- restarts, drains, delays, outages ---------------------------------------------------------


def test_a_restarted_container_returns_its_own_leases_at_once(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """Same worker id (the pod name), new process: it returns what its previous life held at
    start-up. The lease is 120 s, so only this adoption explains a quick return."""
    publish(redis_url, [{"n": i, "sleep": 600} for i in range(3)])
    long = ["--worker-id", "pod-a", "-c", "3", "--lease", "120", "--heartbeat", "1"]
    first = spawn_worker(*RECORD, *long)
    wait_for(lambda: len(counts(r, "test:seen")) == 3, 30, what="3 running")
    first.kill()
    first.wait()
    assert r.zcard(KEYS.inflight("pod-a")) == 3
    again = spawn_worker(*RECORD, *long)
    wait_for(lambda: counts(r, "test:seen") == {0: 2, 1: 2, 2: 2}, 30, what="all 3 running again")
    (adopted,) = events(again, "returned leases left by a previous process")
    assert adopted["count"] == 3
    again.kill()


def test_sigterm_drains_in_asyncio_mode(r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker) -> None:
    publish(redis_url, [{"n": i, "sleep": 6} for i in range(40)])
    w = spawn_worker(
        "-f", "tests.tasks:record_async", "-q", "jobs", "-c", "4", "--prefetch", "20", "--worker-id", "aw"
    )
    wait_for(
        lambda: r.hlen("test:seen") == 4 and r.zcard(KEYS.inflight("aw")) == 24, 15, what="4 running, 20 held"
    )
    w.terminate()
    wait_for(lambda: r.zcard(KEYS.inflight("aw")) <= 4, 3, interval=0.01, what="held messages returned")
    started = set(counts(r, "test:seen"))
    assert len(started) == 4 and r.llen(KEYS.ready) == 40 - 4
    assert w.wait(20) == 0
    assert set(counts(r, "test:done")) == started, "running coroutines finished, none was cancelled"
    assert r.zcard(KEYS.inflight("aw")) == 0


def test_a_delayed_publish_runs_when_due_and_not_before(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    pub = sluiceway.Publisher(redis_url)
    sent = time.time()
    pub.publish("jobs", {"n": 7}, delay=2)
    pub.close()
    w = spawn_worker(*RECORD, "--heartbeat", "0.5", "--lease", "3")
    assert r.zcard(KEYS.delayed) == 1
    wait_for(lambda: counts(r, "test:done") == {7: 1}, 30, what="the delayed message to run")
    (started,) = starts(r)
    # Both clocks are this machine's: Redis TIME and time.time().
    assert started >= sent + 2 - 0.01, f"ran {sent + 2 - started:.3f} s early"
    w.terminate()
    assert w.wait() == 0


def test_after_an_outage_the_worker_says_redis_is_back_and_retries_at_least_every_second(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """A worker started while its Redis is down keeps trying (never fatal), never waits more than
    1 s between tries, so it is back within about a second of Redis, and logs when it is."""
    server = RedisServer()  # not started yet: the worker's Redis is down
    try:
        w = spawn_worker(*RECORD, "--heartbeat", "0.5", "--lease", "3", SLUICEWAY_REDIS_URL=server.url)
        # Enough failures for an uncapped doubling back-off to pass 1 s (0.1 + 0.2 + 0.4 + 0.8 ...).
        wait_for(lambda: len(events(w, "failed; retrying")) >= 6, 30, what="six failed tries")
        server.start()
        wait_for(lambda: events(w, "is reachable again"), 10, what="the reconnect line")
        waits = [float(str(e["retry_in"])) for e in events(w, "failed; retrying")]
        assert max(waits) <= 1.0, waits
        sluiceway.Publisher(server.url).publish("jobs", {"n": 1})
        wait_for(lambda: counts(r, "test:done") == {1: 1}, 20, what="work after the outage")
        assert w.proc.poll() is None
        w.terminate()
        assert w.wait() == 0
    finally:
        server.close()
