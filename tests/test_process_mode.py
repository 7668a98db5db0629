"""Process mode (``--concurrency-mode process``): real worker processes on a real Redis, whose
children are killed, time out and drain. Every guarantee of thread mode must hold."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

import sluiceway
from sluiceway import fleet
from sluiceway.contract import Keys
from tests.support.starts import start_bound, worst_window
from tests.support.workers import (
    FAST,
    SpawnWorker,
    WorkerProcess,
    alive,
    children,
    counts,
    publish,
    wait_for,
)

pytestmark = pytest.mark.redis

KEYS = Keys("default", "jobs")
PROCESS = ["--concurrency-mode", "process"]


def in_process_mode(spawn_worker: SpawnWorker, function: str, *flags: str) -> WorkerProcess:
    """A process-mode worker of ``function`` on the queue ``jobs``, with the FAST lease flags."""
    return spawn_worker("-f", function, "-q", "jobs", *flags, *PROCESS, *FAST)


def drained(r: redis.Redis) -> bool:
    return fleet.queue_stats(r, KEYS).in_flight + int(r.llen(KEYS.ready)) == 0


def stop(w: WorkerProcess) -> None:
    w.terminate()
    code = w.wait(30)
    assert code == 0, w.output()[-3000:]
    assert not children(w.pid)


def test_kill_9_of_children_mid_burst_loses_nothing(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    total = 600
    publish(redis_url, total, sleep=0.02)
    w = in_process_mode(spawn_worker, "tests.support.proc_tasks:record_pid", "-c", "4", "--worker-id", "pm")
    wait_for(lambda: len(children(w.pid)) == 4, 60, what="4 children")
    first = children(w.pid)
    killed = []
    for threshold in (100, 250, 400):  # three kills, spread over the burst
        wait_for(lambda t=threshold: r.hlen("test:done") >= t, 60, what=f"{threshold} done")
        victim = children(w.pid)[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    wait_for(lambda: r.hlen("test:done") >= total, 120, what="all messages done")
    wait_for(lambda: drained(r), 30, what="the queue to drain")
    done, seen = counts(r, "test:done"), counts(r, "test:seen")
    assert set(done) == set(range(total)), "every message completed at least once"
    duplicates = sum(v - 1 for v in seen.values())
    # A child runs one task at a time: each kill may cost at most the one it was running.
    assert duplicates <= len(killed)
    stats = fleet.queue_stats(r, KEYS)
    assert (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0, 0)
    assert w.proc.poll() is None, "a child's death must not stop the pod"
    now = children(w.pid)
    assert len(now) == 4 and not set(now) & set(killed), "each killed child was replaced"
    pids = {int(p) for p in r.smembers("test:pids")}
    assert set(first) <= pids and pids & set(now), "the replacements ran tasks"
    print(f"\n[figures] process mode kill -9: {len(killed)} children killed, duplicates {duplicates}")
    stop(w)


def test_a_child_that_died_idle_is_replaced_without_blaming_the_next_message(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    w = in_process_mode(spawn_worker, "tests.support.proc_tasks:record_pid", "-c", "1")
    wait_for(lambda: "child processes started" in w.output(), 60, what="the child started")
    (idle,) = children(w.pid)
    os.kill(idle, signal.SIGKILL)
    wait_for(lambda: not alive(idle), 5, what="the child to die")
    publish(redis_url, 1)
    wait_for(lambda: r.hlen("test:done") == 1, 60, what="the message done")
    assert counts(r, "test:seen") == {0: 1} and r.llen(KEYS.redelivered) == 0
    stop(w)


def test_a_message_that_keeps_killing_its_child_is_dead_lettered(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    sluiceway.Publisher(redis_url).publish("jobs", {"n": 1})
    w = in_process_mode(spawn_worker, "tests.support.proc_tasks:die", "-c", "2", "--max-attempts", "3")
    wait_for(lambda: r.llen(KEYS.dead) == 1, 60, what="the dead letter")
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "redelivered"
    assert counts(r, "test:attempts") == {1: 3}, "each death counted as a redelivery"
    assert w.proc.poll() is None
    stop(w)


def test_sigterm_drains_every_child_within_the_grace_period(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    publish(redis_url, 20, sleep=3)
    w = in_process_mode(
        spawn_worker, "tests.support.proc_tasks:record_pid",
        "-c", "4", "--prefetch", "6", "--drain", "30", "--worker-id", "pm",
    )  # fmt: skip
    wait_for(
        lambda: r.hlen("test:seen") == 4 and r.zcard(KEYS.inflight("pm")) == 10,
        60,
        what="4 running, 6 prefetched",
    )
    # Signals are the pod's: a Ctrl-C or SIGTERM reaching a child directly cuts no task short.
    for child in children(w.pid):
        os.kill(child, signal.SIGINT)
        os.kill(child, signal.SIGTERM)
    w.terminate()
    signalled = time.monotonic()
    wait_for(lambda: r.zcard(KEYS.inflight("pm")) <= 4, 2, interval=0.01, what="prefetched returned")
    assert w.wait(30) == 0
    took = time.monotonic() - signalled
    started = set(counts(r, "test:seen"))
    assert len(started) == 4 and len({int(p) for p in r.smembers("test:pids")}) == 4
    assert set(counts(r, "test:done")) == started, "every child finished its task, none was cut short"
    assert r.zcard(KEYS.inflight("pm")) == 0 and r.llen(KEYS.ready) == 16
    assert not children(w.pid)
    print(f"\n[figures] process mode SIGTERM: 4 running tasks of 3 s drained, exit after {took:.2f} s")


def test_sigterm_hands_back_what_outlives_the_grace_period(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    publish(redis_url, 2, sleep=60)
    w = in_process_mode(
        spawn_worker, "tests.support.proc_tasks:record_pid",
        "-c", "2", "--drain", "1", "--worker-id", "pm",
    )  # fmt: skip
    wait_for(lambda: r.hlen("test:seen") == 2, 60, what="both running")
    pids = [int(p) for p in r.smembers("test:pids")]
    w.terminate()
    assert w.wait(15) == 0, w.output()[-3000:]
    assert fleet.queue_stats(r, KEYS).ready == 2 and r.zcard(KEYS.inflight("pm")) == 0
    assert sorted(e.split(b":", 1)[0] for e in r.lrange(KEYS.redelivered, 0, -1)) == [b"1", b"1"]
    # Ended before their messages went back: no other worker can start one while it still runs.
    assert not any(alive(p) for p in pids)


def test_a_cpu_bound_task_past_its_timeout_is_killed_and_others_keep_working(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    pub = sluiceway.Publisher(redis_url)
    pub.publish("jobs", {"n": 0})
    w = in_process_mode(
        spawn_worker, "tests.support.proc_tasks:spin",
        "-c", "2", "--timeout", "2", "--max-attempts", "2", "--backoff", "0.1", "--max-backoff", "0.1",
    )  # fmt: skip
    wait_for(lambda: r.hexists("test:pid", "0"), 60, what="the spinner to start")
    spinner = int(r.hget("test:pid", "0") or 0)
    # Meanwhile the other child keeps working: short spins all finish, elsewhere.
    for i in range(1, 11):
        pub.publish("jobs", {"n": i, "seconds": 0.05})
    wait_for(lambda: r.hlen("test:done") == 10, 30, what="the other child's tasks")
    ran_in = {int(p) for n, p in r.hgetall("test:pid").items() if n != b"0"}
    assert spinner not in ran_in
    wait_for(lambda: r.llen(KEYS.dead) == 1, 60, what="the timed-out message dead-lettered")
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "timeout" and entry["attempts"] == 2 and "timeout" in str(entry["detail"])
    wait_for(lambda: not alive(spinner), 5, what="the spinning child to be gone")
    assert 0 not in counts(r, "test:done")
    wait_for(lambda: len(children(w.pid)) == 2, 30, what="the child replaced")
    stop(w)


def test_failures_in_a_child_settle_as_in_thread_mode(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    pub = sluiceway.Publisher(redis_url)
    pub.publish("jobs", {"n": 1, "unexpected": True})
    pub.publish("jobs", {"n": 2, "mode": "raise"})
    pub.publish("jobs", {"n": 4, "mode": "reject"})
    pub.publish("jobs", {"n": 5, "mode": "flaky"})
    pub.publish("jobs", {"n": 6, "mode": "ok"})
    pub.publish("jobs", {"n": 7, "mode": "retry_never"})  # RetryLater(inf): the usual backoff
    w = in_process_mode(
        spawn_worker, "tests.tasks:misbehave",
        "-c", "2", "--max-attempts", "3", "--backoff", "0.05", "--max-backoff", "0.2",
    )  # fmt: skip
    wait_for(lambda: r.llen(KEYS.dead) == 3 and r.hlen("test:done") == 3, 60, what="all outcomes")
    by_reason = {str(e["reason"]): e for e in fleet.dead_letters(r, KEYS)}
    assert set(by_reason) == {"bad_arguments", "error", "rejected"}
    raised = by_reason["error"]
    assert "ValueError: message 2 always fails" in str(raised["detail"]) and raised["attempts"] == 3
    assert "misbehave" in str(raised["traceback"]), "the child's traceback reaches the dead letter"
    assert "poison" in str(by_reason["rejected"]["detail"])
    assert counts(r, "test:attempts") == {2: 3, 4: 1, 5: 2, 6: 1, 7: 2}
    stop(w)


def test_calls_return_values_and_errors_from_a_child(
    redis_url: str, spawn_worker: SpawnWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEWAY_REDIS_URL", redis_url)
    monkeypatch.delenv("SLUICEWAY_BROKER", raising=False)
    common = ["-c", "1", "--max-attempts", "1", *PROCESS, *FAST]
    workers = [
        spawn_worker("-f", f"tests.support.call_tasks:{fn}", "-q", fn, *common)
        for fn in ("echo", "boom", "unserialisable")
    ]
    value = {"a": [1, 2.5, "\u00fc", "\ud800"], "b": None}  # a lone surrogate crosses the pipe too
    assert sluiceway.call("echo", {"value": value}, timeout=60) == value
    with pytest.raises(sluiceway.RemoteError) as info:
        sluiceway.call("boom", {"text": "no"}, timeout=60)
    assert (info.value.reason, info.value.type, info.value.message) == ("error", "ValueError", "no")
    with pytest.raises(sluiceway.RemoteError) as info:
        sluiceway.call("unserialisable", {}, timeout=60)
    assert info.value.reason == "unserialisable_result" and "object" in info.value.message
    for w in workers:
        stop(w)


def test_one_pod_is_one_worker_with_its_childrens_busy_counts_summed(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    publish(redis_url, 3, sleep=30)
    w = in_process_mode(
        spawn_worker, "tests.support.proc_tasks:record_pid",
        "-c", "3", "--prefetch", "0", "--drain", "0.5", "--worker-id", "pm",
    )  # fmt: skip
    wait_for(lambda: r.hlen("test:seen") == 3, 60, what="3 children busy")
    wait_for(
        lambda: [(h["busy"], h["in_flight"]) for h in fleet.heartbeats(r, KEYS)] == [(3, 3)],
        10,
        what="one heartbeat with 3 busy",
    )
    (hb,) = fleet.heartbeats(r, KEYS)
    assert hb["worker"] == "pm" and hb["concurrency"] == 3
    stop(w)


def test_unimportable_function_in_process_mode_exits_with_the_import_code(
    redis_url: str, spawn_worker: SpawnWorker
) -> None:
    w = spawn_worker("-f", "tests.support.proc_tasks:missing", "-q", "jobs", *PROCESS)
    assert w.wait(60) == 3


def test_a_function_that_imports_in_the_pod_but_not_in_a_child_exits_3(
    redis_url: str, spawn_worker: SpawnWorker
) -> None:
    w = spawn_worker("-f", "tests.support.pod_only:task", "-q", "jobs", "-c", "2", *PROCESS)
    assert w.wait(60) == 3
    assert "only in the pod" in w.output()


def test_a_pod_killed_with_kill_9_takes_its_children_with_it(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    publish(redis_url, 2)
    w = in_process_mode(spawn_worker, "tests.support.proc_tasks:spin", "-c", "2")
    wait_for(lambda: r.hlen("test:pid") == 2, 60, what="both children spinning")
    spinning = [int(p) for p in r.hvals("test:pid")]
    w.kill()
    w.wait()
    wait_for(lambda: not any(alive(p) for p in spinning), 10, what="the orphaned children to exit")


def test_an_async_function_is_refused_in_process_mode(redis_url: str, spawn_worker: SpawnWorker) -> None:
    w = spawn_worker("-f", "tests.tasks:noop_async", "-q", "jobs", *PROCESS)
    assert w.wait(60) == 2
    assert "async def" in w.output()


@pytest.mark.slow
def test_the_fleet_qps_limit_holds_in_process_mode(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    qps, duration = 20, 12
    publish(redis_url, qps * (duration + 120))  # never runs dry while the children start
    args = ["-f", "tests.support.proc_tasks:record_pid", "-q", "jobs", "-c", "3", "--qps", str(qps)]
    fleet_ = [spawn_worker(*args, *PROCESS, *FAST) for _ in range(2)]
    wait_for(lambda: r.llen("test:starts") > 0, 60, what="first start")
    wait_for(lambda: all(len(children(w.pid)) == 3 for w in fleet_), 60, what="every child up")
    t0 = time.time()  # the window opens once both pods run all their children
    while time.time() - t0 < duration + 1:
        time.sleep(0.2)
    assert r.llen(KEYS.ready) > 0, "the queue ran dry: the window measured no limit"
    starts = sorted(float(x) for x in r.lrange("test:starts", 0, -1))
    window = [s for s in starts if t0 <= s < t0 + duration]
    worst = worst_window(window)
    mean = len(window) / duration
    print(f"\n[figures] process mode qps {qps}: mean {mean:.2f}, worst 1-s window {worst}")
    # The limit is the guarantee: the stated allowance is +1 for scheduling jitter (burst 0).
    # The mean is a figure, not a bound here: on a loaded machine a pod with more processes to
    # schedule drops more stale slots (each one an undershoot by design, see docs/worker.md).
    assert worst <= start_bound(qps)
    for w in fleet_:
        stop(w)
