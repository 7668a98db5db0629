"""The worker against a real Redis and real worker processes: the guarantees users rely on."""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis

import sluiceway
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.ratelimit import max_in_window
from tests.support.redis_server import RedisServer, free_port
from tests.support.starts import start_bound, worst_window
from tests.support.workers import FAST, SpawnWorker, counts, publish, wait_for

pytestmark = pytest.mark.redis

KEYS = Keys("default", "jobs")


def all_done(r: redis.Redis, n: int) -> bool:
    return int(r.hlen("test:done")) >= n


def test_worker_killed_mid_run_loses_nothing_and_its_messages_return_within_a_lease(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    total = 10_000
    publish(redis_url, total, sleep=0.002)
    victim = spawn_worker(
        "-f", "tests.tasks:record", "-q", "jobs", "-c", "16", "--worker-id", "victim", *FAST
    )
    others = [
        spawn_worker("-f", "tests.tasks:record", "-q", "jobs", "-c", "8", "--worker-id", f"w{i}", *FAST)
        for i in range(2)
    ]
    wait_for(lambda: r.hlen("test:done") > 1500, 60, what="progress before the kill")
    held = r.zcard(KEYS.inflight("victim"))
    assert held > 0, "the victim should hold leases when it is killed"
    victim.kill()
    killed_at = time.monotonic()
    wait_for(
        lambda: r.zcard(KEYS.inflight("victim")) == 0, 10, interval=0.02, what="the victim's leases to return"
    )
    recovered_after = time.monotonic() - killed_at
    # The leases were renewed at most one heartbeat before the kill; a reaper runs every heartbeat.
    assert recovered_after <= 3.0 + 0.5 + 0.5  # lease + one reaper tick + slack for the poll
    wait_for(lambda: all_done(r, total), 120, what="all messages done")
    seen = counts(r, "test:seen")
    done = counts(r, "test:done")
    assert set(done) == set(range(total)), "every message completed at least once"
    # Messages the victim finished but never acked run a second time, possibly after the last
    # first run: wait for the queue to drain before counting them.
    wait_for(
        lambda: fleet.queue_stats(r, KEYS).in_flight + r.llen(KEYS.ready) == 0, 30, what="the queue to drain"
    )
    seen = counts(r, "test:seen")
    duplicates = sum(v - 1 for v in seen.values())
    assert duplicates <= held  # only what the victim held may run twice
    stats = fleet.queue_stats(r, KEYS)
    assert (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0, 0)
    print(
        f"\n[figures] kill -9: victim held {held}, returned in {recovered_after:.2f} s, duplicates {duplicates}"
    )
    for w in others:
        w.terminate()
        assert w.wait() == 0


def test_sigterm_finishes_running_tasks_and_returns_prefetched_at_once(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    # Long tasks, so the state "4 running, 20 prefetched" lasts long enough to be seen on a busy
    # machine.
    publish(redis_url, 60, sleep=6)
    w = spawn_worker(
        "-f", "tests.tasks:record", "-q", "jobs", "-c", "4", "--prefetch", "20", "--worker-id", "w", *FAST
    )
    wait_for(
        lambda: r.hlen("test:seen") == 4 and r.zcard(KEYS.inflight("w")) == 24,
        15,
        what="4 running, 20 prefetched",
    )
    w.terminate()
    # Prefetched messages go back at once, long before the running tasks finish.
    wait_for(
        lambda: r.zcard(KEYS.inflight("w")) <= 4, 1.0, interval=0.01, what="prefetched messages returned"
    )
    started = set(counts(r, "test:seen"))
    assert len(started) == 4
    # (ready counts redelivered messages too: on a loaded machine a lease may lapse meanwhile)
    assert fleet.queue_stats(r, KEYS).ready == 60 - 4
    assert w.wait(20) == 0
    assert set(counts(r, "test:done")) == started, "running tasks finished, none was interrupted"
    assert r.zcard(KEYS.inflight("w")) == 0
    # Nothing lost: another worker drains the rest.
    w2 = spawn_worker("-f", "tests.tasks:record", "-q", "jobs", "-c", "60", *FAST)
    wait_for(lambda: all_done(r, 60), 30, what="the rest drained")
    assert max(counts(r, "test:seen").values()) == 1
    w2.terminate()
    assert w2.wait() == 0


def test_sigterm_returns_unfinished_tasks_after_the_grace_period(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    publish(redis_url, 2, sleep=30)
    w = spawn_worker(
        "-f", "tests.tasks:record", "-q", "jobs", "-c", "2", "--drain", "1", "--worker-id", "w", *FAST
    )
    wait_for(lambda: r.hlen("test:seen") == 2, 15, what="both running")
    w.terminate()
    assert w.wait(10) == 0
    assert fleet.queue_stats(r, KEYS).ready == 2, "tasks still running at the end of the grace period go back"
    assert r.zcard(KEYS.inflight("w")) == 0
    # Handed back while running: a redelivery, so a message that keeps workers from stopping in
    # time is dead-lettered in the end.
    assert sorted(e.split(b":", 1)[0] for e in r.lrange(KEYS.redelivered, 0, -1)) == [b"1", b"1"]


@pytest.mark.slow
def test_fleet_wide_qps_is_exact_while_workers_join_and_leave(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    qps, duration = 20, 30
    publish(redis_url, qps * (duration + 10))
    args = ["-f", "tests.tasks:record", "-q", "jobs", "-c", "4", "--qps", str(qps), *FAST]
    fleet_ = [spawn_worker(*args) for _ in range(2)]
    wait_for(lambda: r.llen("test:starts") > 0, 15, what="first start")
    t0 = time.monotonic()
    joined = left = False
    while time.monotonic() - t0 < duration + 1:
        elapsed = time.monotonic() - t0
        if elapsed > 8 and not joined:
            fleet_ += [spawn_worker(*args) for _ in range(2)]  # join mid-run
            joined = True
        if elapsed > 18 and not left:
            fleet_[0].terminate()  # leave gracefully mid-run
            fleet_[1].kill()  # and one dies
            left = True
        time.sleep(0.2)
    starts = sorted(float(x) for x in r.lrange("test:starts", 0, -1))
    first = starts[0]
    window = [s for s in starts if s < first + duration]
    raw = max_in_window(window, 1.0)
    worst = worst_window(window)
    mean = len(window) / duration
    print(
        f"\n[figures] qps {qps}: mean {mean:.2f} ({mean / qps:.4f} of target), worst 1-s window {raw} (recorded), {worst} (allowing the record lag)"
    )
    assert worst <= start_bound(qps)
    # The bound above is the guarantee; the mean is a precision figure, which `make bench`
    # measures (docs/benchmarks.md). It falls short by design when a worker dies holding slots,
    # or is starved past a slot's 10 ms tolerance and drops it (the bound wins over throughput):
    # 0.3-3 % in most runs here, 12 % in one CI run with the e2e phase on the same two cores.
    # What this test asserts of it is that the fleet keeps going through the joins and leaves.
    assert mean >= 0.75 * qps


def test_bad_input_and_failing_functions_end_in_retry_or_dead_letter(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    pub = sluiceway.Publisher(redis_url)
    r.lpush(KEYS.ready, b"{malformed json")
    r.lpush(KEYS.ready, b"[1, 2, 3]")
    r.lpush(KEYS.ready, b'{"n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")  # would blow the stack
    pub.publish("jobs", {"n": 1, "unexpected": True})
    pub.publish("jobs", {"n": 2, "mode": "raise"})
    pub.publish("jobs", {"n": 3, "mode": "hang"})
    pub.publish("jobs", {"n": 4, "mode": "reject"})
    pub.publish("jobs", {"n": 5, "mode": "flaky"})
    pub.publish("jobs", {"n": 6, "mode": "ok"})
    pub.publish("jobs", {"n": 7, "mode": "retry_never"})  # RetryLater(inf): the usual backoff
    w = spawn_worker(
        "-f", "tests.tasks:misbehave", "-q", "jobs", "-c", "4", "--max-attempts", "3",
        "--backoff", "0.05", "--max-backoff", "0.2", "--timeout", "0.5", *FAST,
    )  # fmt: skip
    wait_for(lambda: r.llen(KEYS.dead) == 7 and r.hlen("test:done") == 3, 30, what="all outcomes")
    by_reason: dict[str, list[dict[str, object]]] = {}
    for e in fleet.dead_letters(r, KEYS):
        by_reason.setdefault(str(e["reason"]), []).append(e)
    assert {k: len(v) for k, v in by_reason.items()} == {
        "invalid_json": 2,
        "not_an_object": 1,
        "bad_arguments": 1,
        "error": 1,
        "timeout": 1,
        "rejected": 1,
    }
    raised = by_reason["error"][0]
    assert "ValueError" in str(raised["detail"]) and "after 3 attempts" in str(raised["detail"])
    assert raised["attempts"] == 3
    assert "unexpected" in str(by_reason["bad_arguments"][0]["detail"])
    assert "timeout" in str(by_reason["timeout"][0]["detail"])
    attempts = counts(r, "test:attempts")
    assert attempts[2] == 3 and attempts[3] == 3 and attempts[4] == 1 and attempts[5] == 2
    assert counts(r, "test:done") == {5: 1, 6: 1, 7: 1}
    w.terminate()
    assert w.wait(15) == 0


def test_reject_dead_letters_without_retry(r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker) -> None:
    sluiceway.Publisher(redis_url).publish("jobs", {"n": 4, "mode": "reject"})
    w = spawn_worker("-f", "tests.tasks:misbehave", "-q", "jobs", "--max-attempts", "5", *FAST)
    wait_for(lambda: r.llen(KEYS.dead) == 1, 15, what="dead letter")
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "rejected" and "poison" in str(entry["detail"])
    assert counts(r, "test:attempts") == {4: 1}
    w.terminate()
    w.wait()


def test_redis_restart_mid_run_loses_nothing(
    r: redis.Redis, redis_server: RedisServer, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    total, n_workers, concurrency, prefetch = 3000, 2, 8, 16
    publish(redis_url, total, sleep=0.003)
    args = ["-f", "tests.tasks:record", "-q", "jobs", "-c", str(concurrency), "--prefetch", str(prefetch)]
    workers = [spawn_worker(*args, *FAST) for _ in range(n_workers)]
    wait_for(lambda: r.hlen("test:done") > 300, 30, what="progress")
    redis_server.restart(down_for=2.0)
    r2 = redis.Redis.from_url(redis_url)
    wait_for(lambda: all_done(r2, total), 120, what="all done after the restart")
    assert set(counts(r2, "test:done")) == set(range(total))
    wait_for(
        lambda: fleet.queue_stats(r2, KEYS).in_flight + r2.llen(KEYS.ready) == 0,
        30,
        what="the queue to drain",
    )
    # Only a message a worker held when Redis went down can run twice (a task cut off mid-way
    # by the outage, or a lease that expired while Redis was away), and each at most once more:
    # the fleet holds at most concurrency + prefetch per worker.
    duplicates = sum(v - 1 for v in counts(r2, "test:seen").values())
    print(f"\n[figures] Redis restart (2 s down): {duplicates} duplicates of {total}")
    assert duplicates <= n_workers * (concurrency + prefetch)
    for w in workers:
        assert w.proc.poll() is None, "an outage must not kill a worker"
        w.terminate()
        assert w.wait(15) == 0
    assert "retrying" in workers[0].output() + workers[1].output()


def test_sigterm_stops_a_worker_that_never_reached_redis(spawn_worker: SpawnWorker) -> None:
    """Started while Redis is down, the worker retries its start-up; SIGTERM still ends it with 0
    (it holds nothing yet) instead of retrying for ever."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    w = spawn_worker("-f", "tests.tasks:noop", "-q", "jobs", *FAST, SLUICEWAY_REDIS_URL=down)
    wait_for(lambda: "failed; retrying" in w.output(), 30, what="a failed start-up attempt")
    w.terminate()
    assert w.wait(15) == 0, w.output()


def test_a_thread_the_function_left_running_does_not_keep_the_worker_from_exiting(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """The interpreter waits at exit for every non-daemon thread; a worker whose function left
    one behind would never exit, and its pod would stay Terminating until SIGKILL."""
    w = spawn_worker("-f", "tests.tasks:leaves_a_thread", "-q", "jobs", *FAST)
    publish(redis_url, 2)
    wait_for(lambda: all_done(r, 2), 30, what="both messages")
    w.terminate()
    assert w.wait(15) == 0
    assert "worker stopped" in w.output()


def test_sigusr1_prints_every_thread_and_the_worker_goes_on(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    """docs/worker.md, "A worker that will not stop": `kill -USR1` writes each thread's stack to
    the log, before the broker answers and while the worker runs, and stops nothing."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    early = spawn_worker("-f", "tests.tasks:noop", "-q", "jobs", *FAST, SLUICEWAY_REDIS_URL=down)
    wait_for(lambda: "failed; retrying" in early.output(), 30, what="a failed start-up attempt")
    early.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "most recent call first" in early.output(), 30, what="the stacks before start-up")
    assert early.proc.poll() is None
    early.terminate()
    assert early.wait(15) == 0, early.output()
    w = spawn_worker("-f", "tests.tasks:record", "-q", "jobs", *FAST)
    publish(redis_url, 1)
    wait_for(lambda: all_done(r, 1), 30, what="the first message")
    w.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: " in _executor_loop" in w.output(), 30, what="the stacks")
    publish(redis_url, 1, start=1)
    wait_for(lambda: all_done(r, 2), 30, what="a message after the dump")
    w.terminate()
    assert w.wait(15) == 0


def test_long_task_keeps_its_lease(r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker) -> None:
    """A task running for several lease periods is never redelivered to another worker."""
    publish(redis_url, 1, sleep=5)
    ws = [
        spawn_worker("-f", "tests.tasks:record", "-q", "jobs", "--lease", "1", "--heartbeat", "0.25")
        for _ in range(2)
    ]
    wait_for(lambda: all_done(r, 1), 20, what="the long task")
    assert counts(r, "test:seen") == {0: 1}
    for w in ws:
        w.terminate()
        w.wait()


def test_heartbeats_describe_each_worker(r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker) -> None:
    publish(redis_url, 200, sleep=0.01)
    w = spawn_worker("-f", "tests.tasks:record", "-q", "jobs", "-c", "4", "--worker-id", "hb", *FAST)
    wait_for(lambda: all_done(r, 200), 30, what="work done")
    # The next heartbeat after the last ack carries the final figures.
    wait_for(
        lambda: [h["processed"] for h in fleet.heartbeats(r, KEYS)] == [200],
        10,
        what="a heartbeat after the work",
    )
    (hb,) = fleet.heartbeats(r, KEYS)
    assert hb["worker"] == "hb" and hb["state"] == "running" and hb["concurrency"] == 4
    assert hb["processed"] == 200 and hb["busy"] == 0
    assert 0.01 <= hb["latency_p50"] < 0.5 and hb["latency_p99"] >= hb["latency_p50"]
    assert hb["rate"] > 0
    assert r.pttl(KEYS.heartbeat("hb")) > 0, "a heartbeat expires if the worker stops writing it"
    w.terminate()
    assert w.wait() == 0
    assert fleet.heartbeats(r, KEYS) == [], "a clean exit removes the heartbeat at once"


def test_async_functions_run_on_an_event_loop(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    publish(redis_url, 100, sleep=5)
    w = spawn_worker("-f", "tests.tasks:record_async", "-q", "jobs", "-c", "100", *FAST)
    # Concurrency, observed rather than timed: every coroutine started before the first finished.
    wait_for(lambda: r.llen("test:starts") == 100, 20, what="100 coroutines started")
    assert r.hlen("test:done") == 0, "100 sleeping coroutines run concurrently"
    wait_for(lambda: all_done(r, 100), 20, what="async tasks")
    w.terminate()
    assert w.wait() == 0


def test_retries_draw_from_the_rate_limit(r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker) -> None:
    sluiceway.Publisher(redis_url).publish_batch("jobs", ({"n": i, "mode": "flaky"} for i in range(20)))
    w = spawn_worker(
        "-f",
        "tests.tasks:misbehave",
        "-q",
        "jobs",
        "--qps",
        "10",
        "--backoff",
        "0",
        "--max-backoff",
        "0",
        *FAST,
    )
    wait_for(lambda: r.hlen("test:done") == 20, 30, what="flaky messages done")
    starts = sorted(float(x) for x in r.lrange("test:starts", 0, -1))
    assert len(starts) == 40  # each message failed once: 40 starts, all under one budget
    # The task records its own start, up to RECORD_LAG after the worker's (tests/support/starts.py).
    assert worst_window(starts) <= 11, f"recorded {max_in_window(starts, 1.0)}"
    w.terminate()
    w.wait()


def test_unimportable_function_exits_with_a_clear_code(redis_url: str, spawn_worker: SpawnWorker) -> None:
    w = spawn_worker("-f", "tests.nowhere:nothing", "-q", "jobs")
    assert w.wait(15) == 3
    assert "cannot import module 'tests.nowhere'" in w.output()


def test_invalid_settings_exit_2_naming_the_problem(redis_url: str, spawn_worker: SpawnWorker) -> None:
    w = spawn_worker("-f", "not a ref", "-q", "jobs", "--concurrency", "0")
    assert w.wait(15) == 2
    out = w.output()
    assert "function 'not a ref' must look like" in out and "concurrency must be >= 1" in out


def test_dead_letters_can_be_replayed(r: redis.Redis, redis_url: str) -> None:
    r.lpush(KEYS.dead, json.dumps({"reason": "error", "payload": '{"n":1}'}))
    assert fleet.replay_dead_letters(r, KEYS, 5) == 1
    assert r.lrange(KEYS.ready, 0, -1) == [b'{"n":1}']


def test_messages_older_than_the_max_age_are_dead_lettered_unrun(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    from sluiceway import codec

    r.lpush(KEYS.ready, codec.encode({"n": 1}, codec.Meta(id="old", published_at=time.time() - 120)))
    r.lpush(KEYS.ready, codec.encode({"n": 2}, codec.Meta(id="fresh", published_at=time.time())))
    w = spawn_worker("-f", "tests.tasks:record", "-q", "jobs", "--max-age", "60", *FAST)
    wait_for(lambda: r.llen(KEYS.dead) == 1 and r.hlen("test:done") == 1, 15, what="outcomes")
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "expired"
    assert entry["message_id"] == "old"
    assert counts(r, "test:seen") == {2: 1}
    w.terminate()
    assert w.wait() == 0


def test_orphaned_workers_are_those_without_pod_and_heartbeat(r: redis.Redis) -> None:
    for w in ("live-pod", "dead-pod", "local-worker"):
        r.sadd(KEYS.leased_workers, w)
        r.zadd(KEYS.inflight(w), {f"1:{w}": 0})  # a lease as every version writes it
    r.set(KEYS.heartbeat("local-worker"), "{}", px=10_000)
    assert fleet.orphaned_workers(r, KEYS, known={"live-pod"}) == ["dead-pod"]
    assert fleet.requeue_worker(r, KEYS, "dead-pod") == 1
    assert r.lrange(KEYS.redelivered, 0, -1) == [b"1:dead-pod"], (
        "a deleted pod's lease counts as a redelivery"
    )


# --- Issue 9, defects 1 and 2: each publish is its own message; text that is not valid Unicode


def test_identical_payloads_each_run_again_after_their_worker_dies(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    copies = 40
    r.lpush(KEYS.ready, *([b'{"n":7,"sleep":30}'] * copies))  # byte-identical, no metadata
    victim = spawn_worker(
        "-f", "tests.tasks:record", "-q", "jobs", "-c", str(copies), "--worker-id", "v", *FAST
    )
    wait_for(lambda: counts(r, "test:seen").get(7) == copies, 60, what="every copy running")
    victim.kill()
    r.delete("test:seen")
    r.lpush(KEYS.ready, *([b'{"n":8}'] * copies))  # and fresh identical copies beside them
    w = spawn_worker(
        "-f", "tests.tasks:record", "-q", "jobs", "-c", str(2 * copies), "--max-attempts", "2", *FAST
    )
    wait_for(lambda: counts(r, "test:seen").get(7) == copies, 60, what="every copy running again")
    wait_for(lambda: counts(r, "test:done").get(8) == copies, 60, what="the fresh copies done")
    assert r.llen(KEYS.dead) == 0, fleet.dead_letters(r, KEYS)
    w.kill()


@pytest.mark.parametrize("mode", ["thread", "asyncio"])
@pytest.mark.parametrize("surrogate_in", ["payload", "exception"])
def test_text_that_is_not_valid_unicode_is_retried_like_any_other(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker, mode: str, surrogate_in: str
) -> None:
    if surrogate_in == "payload":
        r.lpush(KEYS.ready, b'{"n":1,"text":"x\\ud800y"}')  # valid JSON, not valid Unicode
    else:
        r.lpush(KEYS.ready, b'{"n":1,"surrogate_error":true}')
    fn = "tests.support.poison:flaky_text" + ("_async" if mode == "asyncio" else "")
    w = spawn_worker(
        "-f", fn, "-q", "jobs", "--concurrency-mode", mode, "--backoff", "0.05", "--max-backoff", "0.1", *FAST
    )
    wait_for(lambda: counts(r, "test:done") == {1: 1}, 20, what="the retry to succeed")
    assert counts(r, "test:attempts") == {1: 2}
    if surrogate_in == "payload":
        assert r.hget("test:text", "1") == b"'x\\ud800y'", "the retry carries the same string"
    w.terminate()
    assert w.wait(15) == 0, w.output()
    assert "internal thread crashed" not in w.output()


def test_a_surrogate_in_the_error_text_still_reaches_the_dead_letter_queue(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    r.lpush(KEYS.ready, b'{"n":3}')
    w = spawn_worker(
        "-f", "tests.support.poison:always_fails_with_surrogate", "-q", "jobs", "--max-attempts", "2",
        "--backoff", "0.05", "--max-backoff", "0.1", *FAST,
    )  # fmt: skip
    wait_for(lambda: r.llen(KEYS.dead) == 1, 20, what="the dead letter")
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "error" and "never" in entry["detail"] and "\\udcff" in entry["detail"]
    w.terminate()
    assert w.wait(15) == 0, w.output()


def test_the_dead_letter_queue_keeps_a_payload_byte_for_byte_and_replays_it(
    r: redis.Redis, redis_url: str, spawn_worker: SpawnWorker
) -> None:
    raw = b'{"n": "\xff\xfe", "x": 1}'  # not UTF-8
    r.lpush(KEYS.ready, raw)
    w = spawn_worker("-f", "tests.tasks:record", "-q", "jobs", *FAST)
    wait_for(lambda: r.llen(KEYS.dead) == 1, 15, what="the dead letter")
    w.terminate()
    assert w.wait(15) == 0
    (entry,) = fleet.dead_letters(r, KEYS)
    assert entry["reason"] == "invalid_encoding"
    assert "payload" not in entry and entry["payload_b64"]
    assert fleet.replay_dead_letters(r, KEYS, 1) == 1
    assert r.lrange(KEYS.ready, 0, -1) == [raw], "a replay runs the very same bytes"
