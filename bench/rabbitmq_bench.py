"""RabbitMQ benchmarks. Every figure is a ratio to a reference measured in the same run.

- throughput: one worker process, no-op task, at-least-once (manual acks after success), against
  a bare pika loop on the same node: ``basic_consume``, manual acks, prefetch 1000, a multiple-ack
  every 100 messages. Target: at least 70 % of the bare loop.
- qps: achieved / target rate and the worst 1-second window, for 10/100/1000 QPS x 1/4/8 workers
  (the fleet limiter is on the coordination Redis; messages on RabbitMQ).

The node is a private one started by ``tests/support/rabbitmq_server.py``; the queues are quorum
queues, the default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pika
import redis

from bench import report
from sluiceway.transports.rabbitmq import RabbitMQSink

REPO = Path(__file__).resolve().parents[1]


def _fill(url: str, queue: str, n: int) -> None:
    sink = RabbitMQSink(url)
    try:
        body = b'{"n": 1}'
        for i in range(0, n, 10_000):
            sink.send("default", queue, [body] * min(10_000, n - i))
    finally:
        sink.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_pika(url: str, queue: str, n: int) -> tuple[float, float]:
    """Messages/s and CPU seconds per message of the bare loop (this process)."""
    _fill(url, queue, n)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    count = 0
    t0 = 0.0
    cpu0 = [0.0]

    def on_message(channel: object, method: object, _props: object, _body: bytes) -> None:
        nonlocal count, t0
        if count == 0:
            t0 = time.perf_counter()
            cpu0[0] = time.process_time()
        count += 1
        if count % 100 == 0 or count == n:
            ch.basic_ack(method.delivery_tag, multiple=True)  # type: ignore[attr-defined]
        if count == n:
            ch.stop_consuming()

    ch.basic_consume(queue, on_message)
    ch.start_consuming()
    rate = (n - 1) / (time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0[0]) / (n - 1)
    conn.close()
    return rate, cpu


def bare_pika_async(url: str, queue: str, n: int) -> tuple[float, float]:
    """The same loop on a channel of pika's asynchronous layer (what the transport consumes on):
    no blocking adapter's per-message event objects. Messages/s and CPU seconds per message."""
    from pika.channel import Channel

    _fill(url, queue, n)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    opened: list[Channel] = []
    conn._impl.channel(on_open_callback=opened.append)
    while not opened:
        conn.process_data_events(time_limit=0.05)
    ch = opened[0]
    ch.basic_qos(prefetch_count=1000)
    count = 0
    t0 = cpu0 = 0.0

    def on_message(_ch: Channel, method: object, _props: object, _body: bytes) -> None:
        nonlocal count, t0, cpu0
        if count == 0:
            t0, cpu0 = time.perf_counter(), time.process_time()
        count += 1
        if count % 100 == 0 or count == n:
            ch.basic_ack(method.delivery_tag, multiple=True)  # type: ignore[attr-defined]

    ch.basic_consume(queue, on_message)
    while count < n:
        conn.process_data_events(time_limit=0.05)
    rate = (n - 1) / (time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / (n - 1)
    conn.process_data_events(time_limit=0.1)  # the last ack out
    ch.close()
    while not ch.is_closed:
        conn.process_data_events(time_limit=0.05)
    conn.close()
    return rate, cpu


def _env(redis_url: str, amqp_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        SLUICEWAY_REDIS_URL=redis_url,
        SLUICEWAY_BROKER="rabbitmq",
        SLUICEWAY_BROKER_URL=amqp_url,
        BENCH_RECORD_URL=redis_url,
        SLUICEWAY_METRICS_PORT="0",
        SLUICEWAY_LOG_LEVEL="WARNING",
    )
    return env


def _finished(metrics_port: int) -> int:
    """Messages the worker finished so far, by its own count (its Prometheus endpoint)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0  # not serving yet
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sluiceway_messages_total{")
        )
    )


def worker_throughput(redis_url: str, url: str, queue: str, n: int, concurrency: int) -> tuple[float, float]:
    """Messages/s of one worker process on a no-op task, from its first finished message to its
    last (the bare loop is timed the same way, first to last message), and the worker process's
    CPU seconds per message over the same span: steadier than msg/s on a shared machine, where
    another run's load steals wall time but not CPU time.

    Finished, not taken: the queue's ready count reaches 0 while the worker still holds its whole
    prefetch (up to a few thousand messages), which would credit the worker with work not done."""
    from tests.support.redis_server import free_port

    _fill(url, queue, n)
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluiceway", "worker", "-f", "bench.tasks:noop", "-q", queue, "-c", str(concurrency),
         "--metrics-port", str(metrics_port)],
        env=_env(redis_url, url),
    )  # fmt: skip
    try:
        while (first := _finished(metrics_port)) == 0:
            time.sleep(0.01)
        t0 = time.perf_counter()
        cpu0 = _cpu_seconds(proc.pid)
        while (done := _finished(metrics_port)) < n:
            time.sleep(0.02)  # each poll is an HTTP request the worker serves: not too often
        rate = (done - first) / (time.perf_counter() - t0)
        cpu = (_cpu_seconds(proc.pid) - cpu0) / (done - first)
    finally:
        proc.terminate()
        proc.wait()
    return rate, cpu


def qps_precision(
    redis_url: str, url: str, queue: str, qps: int, workers: int, seconds: float
) -> tuple[float, int]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    _fill(url, queue, int(qps * (seconds + 5)) + 100)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sluiceway", "worker", "-f", "bench.tasks:stamp", "-q", queue, "-c", "16",
             "--qps", str(qps)],
            env=_env(redis_url, url),
        )
        for _ in range(workers)
    ]  # fmt: skip
    try:
        while client.llen("bench:starts") == 0:
            time.sleep(0.01)
        time.sleep(seconds + 1.5)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    # Leftover messages are not purged by the benchmark: each run uses a fresh queue.
    return report.window_figures([float(x) for x in client.lrange("bench:starts", 0, -1)], qps, seconds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--qps-seconds", type=float, default=10.0)
    p.add_argument("--skip-qps", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--qps-rates", default="10,100,1000", help="comma-separated QPS limits [%(default)s]")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    # The test servers' port helpers live in the e2e package (tests/support imports them).
    sys.path[:0] = [str(REPO / "e2e"), str(REPO)]
    from tests.support.rabbitmq_server import RabbitMQServer
    from tests.support.redis_server import RedisServer

    rabbit = RabbitMQServer()
    rabbit.start()
    print(f"rabbitmq node up in {rabbit.start_seconds:.1f} s", flush=True)
    rds = RedisServer()
    rds.start()
    try:
        url = rabbit.url
        seq = iter(range(1_000_000))
        # Alternate the two, so a burst of load from elsewhere hits both alike. Keep the best
        # msg/s and the least CPU/message of the rounds: the machine's limit, not a noisy sample.
        bare = (0.0, 1.0)
        bare_async = (0.0, 1.0)
        workers = {1: (0.0, 1.0), 8: (0.0, 1.0)}
        for _ in range(0 if args.skip_throughput else args.rounds):
            rate, cpu = bare_pika(url, f"bare{next(seq)}", args.messages)
            bare = (max(bare[0], rate), min(bare[1], cpu))
            rate, cpu = bare_pika_async(url, f"bare{next(seq)}", args.messages)
            bare_async = (max(bare_async[0], rate), min(bare_async[1], cpu))
            for c in (8, 1):
                rate, cpu = worker_throughput(rds.url, url, f"w{next(seq)}", args.messages, c)
                workers[c] = (max(workers[c][0], rate), min(workers[c][1], cpu))
        if not args.skip_throughput:
            print(
                "reference: bare pika loop (basic_consume, manual acks, prefetch 1000, ack every 100): "
                f"{bare[0]:,.0f} msg/s, {bare[1] * 1e6:.0f} us CPU/message"
            )
            print(
                "reference: the same loop on pika's asynchronous channel (as the transport consumes): "
                f"{bare_async[0]:,.0f} msg/s, {bare_async[1] * 1e6:.0f} us CPU/message"
            )
            for c, (rate, cpu) in workers.items():
                print(
                    f"worker (-c {c}), no-op, at-least-once: {rate:,.0f} msg/s = {rate / bare[0]:.1%} of the bare "
                    f"pika loop, {rate / bare_async[0]:.1%} of the asynchronous one; {cpu * 1e6:.0f} us CPU/message "
                    f"(the loop's msg/s per CPU: {bare[1] / cpu:.1%})"
                )
        if not args.skip_qps:
            report.qps_table(
                lambda qps, fleet: qps_precision(rds.url, url, f"q{next(seq)}", qps, fleet, args.qps_seconds),
                (1, 4, 8),
                args.qps_seconds,
                [int(x) for x in args.qps_rates.split(",")],
            )
    finally:
        rds.close()
        rabbit.close()


if __name__ == "__main__":
    main()
