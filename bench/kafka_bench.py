"""Kafka benchmarks, on a broker this run starts (tests/support/kafka_server.py). Every figure is a
ratio to a reference measured in the same run, on the same broker.

- throughput: the transport's no-op at-least-once loop (fetch up to 1000, ack each record, the
  transport commits the finished prefix) against a bare confluent-kafka loop
  (``consume(num_messages=1000)`` then one ``commit(asynchronous=False)`` per batch);
- rebalance cost: records redone and the longest time without progress while consumers scale
  1 -> 3 -> 1 during a burst;
- QPS precision: the transport behind the fleet limiter (``Gated`` + ``RedisLimiter``, what the
  worker runs on), achieved / target and the worst 1-second window, at 10/100/1000 QPS with 1 and
  4 consumer processes.

``python -m bench.kafka_bench [--messages N] [--skip-qps]``
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402
from tests.support.kafka_server import KafkaServer  # noqa: E402

from sluiceway.transports import kafka_common as kc  # noqa: E402
from sluiceway.transports.base import Outcomes  # noqa: E402
from sluiceway.transports.kafka import KafkaTransport  # noqa: E402

NS = "bench"
TOLERANCE = 0.01  # the worker's default qps slot tolerance


def _fill(url: str, queue: str, n: int, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": kc.bootstrap(url)})
    kc.ensure_topics(
        admin,
        {kc.topic(NS, queue): partitions, kc.retry_topic(NS, queue): 1, kc.dead_topic(NS, queue): 1},
    )
    p = Producer({**kc.producer_config(url), "linger.ms": 20, "batch.num.messages": 10000})
    topic = kc.topic(NS, queue)
    for i in range(n):
        while True:
            try:
                p.produce(topic, b'{"i": %d}' % i, key=b"%d" % i)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(120) == 0


def bare_loop(url: str, queue: str, n: int) -> float:
    c = Consumer(
        {
            "bootstrap.servers": kc.bootstrap(url),
            "group.id": kc.group(NS, queue),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([kc.topic(NS, queue)])
    got = 0
    start = 0.0
    while got < n:
        msgs = c.consume(num_messages=1000, timeout=1.0)
        if msgs and not start:
            start = time.perf_counter()
        got += sum(1 for m in msgs if m.error() is None)
        if msgs:
            c.commit(asynchronous=False)
    elapsed = time.perf_counter() - start
    c.close()
    return n / elapsed


def transport_loop(url: str, queue: str, n: int) -> float:
    t = KafkaTransport(url, NS, queue, "bench", create_topics=False)
    got = 0
    start = 0.0
    while got < n:
        batch = t.fetch(1000, 1.0)
        if batch and not start:
            start = time.perf_counter()
        got += len(batch)
        if batch:
            t.settle(Outcomes(acks=[d.token for d in batch]))
    elapsed = time.perf_counter() - start
    t.close()
    return n / elapsed


def throughput(url: str, n: int, rounds: int) -> None:
    ratios = []
    for r in range(rounds):
        q1, q2 = f"bare{uuid.uuid4().hex[:6]}", f"tr{uuid.uuid4().hex[:6]}"
        _fill(url, q1, n, 1)
        _fill(url, q2, n, 1)
        # Alternate which goes first: the machine's load drifts within a run.
        if r % 2:
            tr = transport_loop(url, q2, n)
            bare = bare_loop(url, q1, n)
        else:
            bare = bare_loop(url, q1, n)
            tr = transport_loop(url, q2, n)
        ratios.append(tr / bare)
        print(
            f"round {r + 1}: bare confluent-kafka loop {bare:,.0f} msg/s; "
            f"transport no-op at-least-once {tr:,.0f} msg/s = {100 * tr / bare:.0f}% of the loop",
            flush=True,
        )
    ratios.sort()
    print(f"median over {rounds} rounds: {100 * ratios[len(ratios) // 2]:.0f}% of the bare loop", flush=True)


def rebalance_cost(url: str, n: int) -> None:
    queue = f"rb{uuid.uuid4().hex[:6]}"
    _fill(url, queue, n, 6)
    tmp = Path(tempfile.mkdtemp(prefix="kafka-bench-"))

    def child(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp / f"{name}.out"
        out.touch()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.kafka_child", url, NS, queue, name, str(out), "0.002"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return proc, out

    def lines(out: Path) -> list[bytes]:
        return [x for x in out.read_bytes().splitlines() if x]

    procs = [child("a")]
    samples: list[tuple[float, int]] = []

    def sample() -> int:
        total = sum(len(lines(o)) for _, o in procs)
        samples.append((time.monotonic(), total))
        return total

    while sample() < n // 5:
        time.sleep(0.05)
    procs += [child("b"), child("c")]
    while sample() < n // 2:
        time.sleep(0.05)
    for p, _ in procs[1:]:
        p.send_signal(signal.SIGTERM)
    while len({x for _, o in procs for x in lines(o)}) < n:
        sample()
        time.sleep(0.05)
    procs[0][0].send_signal(signal.SIGTERM)
    for p, _ in procs:
        p.wait(60)
    processed = [x for _, o in procs for x in lines(o)]
    redone = len(processed) - len(set(processed))
    stall = 0.0
    last_t, last_n = samples[0]
    for t, c in samples[1:]:
        if c > last_n:
            last_t, last_n = t, c
        else:
            stall = max(stall, t - last_t)
    print(
        f"rebalance 1 -> 3 -> 1 over {n} records on 6 partitions: redone {redone} "
        f"({100 * redone / n:.2f}%), longest time without progress {stall:.2f} s",
        flush=True,
    )


def qps_precision(url: str, redis_url: str) -> None:
    for qps in (10, 100, 1000):
        for workers in (1, 4):
            seconds = 10.0
            n = int(qps * seconds * 1.5) + 100
            queue = f"qps{uuid.uuid4().hex[:6]}"
            _fill(url, queue, n, 4)
            tmp = Path(tempfile.mkdtemp(prefix="kafka-qps-"))
            procs = []
            for w in range(workers):
                out = tmp / f"{w}.out"
                procs.append(
                    (
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "bench.kafka_bench",
                                "--qps-child",
                                url,
                                redis_url,
                                queue,
                                str(qps),
                                str(out),
                            ],
                            cwd=REPO,
                        ),
                        out,
                    )
                )
            # Wait for the first start, then let the fleet run `seconds` more.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(o.exists() and o.stat().st_size for _, o in procs):
                time.sleep(0.1)
            time.sleep(seconds + 1.5)
            for p, _ in procs:
                p.send_signal(signal.SIGTERM)
            for p, _ in procs:
                p.wait(60)
            starts = sorted(float(x) for _, o in procs if o.exists() for x in o.read_text().split())
            if len(starts) < 2:
                print(f"  qps {qps:4d} x {workers} workers: no starts recorded", flush=True)
                continue
            # The steady part: a second after the first start (the group is assigned), for 8 s.
            t0 = starts[0] + 1.0
            span = seconds - 2.0
            window = [x for x in starts if t0 <= x < t0 + span]
            achieved = len(window) / span / qps
            worst = 0
            j = 0
            for i in range(len(starts)):
                while starts[i] - starts[j] >= 1.0:
                    j += 1
                worst = max(worst, i - j + 1)
            print(
                f"  qps {qps:4d} x {workers} workers: achieved {achieved:.4f}, "
                f"worst window {worst} ({worst / qps:.3f})",
                flush=True,
            )


def qps_child(url: str, redis_url: str, queue: str, qps: float, out: str) -> None:
    """One consumer process behind the fleet limiter, recording each start's wall time."""
    import redis

    from sluiceway.contract import Keys
    from sluiceway.ratelimit.redis import RedisLimiter
    from sluiceway.transports.gated import Gated

    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    client = redis.Redis.from_url(redis_url)
    limiter = RedisLimiter(client, Keys(NS, queue).ratelimit, qps=qps)
    link = Gated(
        KafkaTransport(url, NS, queue, f"q{os.getpid()}", create_topics=False), limiter, limiter_errors=()
    )
    log = open(out, "w", buffering=1)  # noqa: SIM115 - one line per start, read while it runs
    while not stop:
        ex = link.begin_exchange(Outcomes(), 16).result()
        if not ex.batch.deliveries:
            time.sleep(min(max(ex.batch.retry_after, 0.001), 0.05))
            continue
        got = time.monotonic()
        for d in ex.batch.deliveries:
            wait = got + d.start_after - time.monotonic()
            if wait < -TOLERANCE:
                # Its slot went stale (this process stalled): take a fresh one, as the worker does,
                # so late starts never bunch into one window.
                slot = link.acquire_slot()
                while slot < 0:
                    time.sleep(-slot)
                    slot = link.acquire_slot()
                wait = slot
            if wait > 0:
                time.sleep(wait)
            log.write(f"{time.time():.6f}\n")
        link.begin_exchange(Outcomes(acks=[d.token for d in ex.batch.deliveries]), 0).result()
    log.close()
    link.close()


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--qps-child"]:
        url, redis_url, queue, qps, out = args_in[1:6]
        qps_child(url, redis_url, queue, float(qps), out)
        return
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_bench")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-qps", action="store_true")
    args = parser.parse_args(args_in)
    server = KafkaServer()
    server.start()
    redis_server = None
    try:
        print(
            f"Kafka {server.version} on {server.bootstrap}; confluent-kafka (librdkafka) in-process",
            flush=True,
        )
        throughput(server.url, args.messages, args.rounds)
        rebalance_cost(server.url, min(args.messages, 20_000))
        if not args.skip_qps:
            from tests.support.redis_server import RedisServer

            redis_server = RedisServer()
            redis_server.start()
            print("QPS precision over 10 s (achieved/target, worst 1-s window vs target):", flush=True)
            qps_precision(server.url, redis_server.url)
    finally:
        server.close()
        if redis_server is not None:
            redis_server.close()


if __name__ == "__main__":
    main()
