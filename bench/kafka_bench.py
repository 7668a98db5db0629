"""Kafka benchmarks, on a broker this run starts (tests/support/kafka_server.py). Every figure is a
ratio to a reference measured in the same run, on the same broker.

- throughput: one ``sluiceway worker`` process on a no-op task (and the transport alone: fetch up
  to 1000, ack each record, commit the finished prefix) against a bare confluent-kafka loop
  (``consume(num_messages=1000)`` then one ``commit(asynchronous=False)`` per batch), and against
  the floor loop: the same loop doing per record what any correct per-message worker must
  (decode the JSON with orjson, check it is an object, call a no-op with it, track the offset);
- rebalance cost: records redone and the longest time without progress while consumers scale
  1 -> 3 -> 1 during a burst;
- QPS precision: ``sluiceway worker`` processes on Kafka under ``--qps``, achieved / target and
  the worst 1-second window, at 10/100/1000 QPS with 1 and 4 workers.

``python -m bench.kafka_bench [--messages N] [--rounds N] [--skip-qps] [--skip-rebalance] [--only-qps]
[--only-rebalance N]``
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "e2e"))  # the test servers pick ports through localcluster.procs

import orjson  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402
from tests.support.kafka_server import KafkaServer  # noqa: E402

from bench.report import RECORD_LAG, lag_tolerant, qps_table, window_figures  # noqa: E402
from sluiceway.transports import kafka_common as kc  # noqa: E402
from sluiceway.transports.base import Outcomes  # noqa: E402
from sluiceway.transports.kafka import KafkaTransport  # noqa: E402

NS = "bench"
# CPU (user + system) per message of the last bare loop and worker run, µs: steadier than msg/s
# on a shared machine, since waiting for a core does not count.
CPU_US = {"bare": 0.0, "floor": 0.0, "transport": 0.0, "worker": 0.0}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
                p.produce(topic, b'{"n": %d}' % i, key=b"%d" % i)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(120) == 0


def _noop(**kwargs: object) -> None:
    return None


def bare_loop(url: str, queue: str, n: int, *, floor: bool = False) -> float:
    """The bare loop; with ``floor``, it also does per record what any correct per-message
    worker must: decode the JSON value (orjson), check it is an object, call a no-op with its keyword
    arguments, and track the offset to commit. No threads, no settle protocol, no metrics: the
    least a per-message Python worker can cost on top of the client."""
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
    start = cpu0 = 0.0
    while got < n:
        msgs = c.consume(num_messages=1000, timeout=1.0)
        if msgs and not start:
            start, cpu0 = time.perf_counter(), time.process_time()
        if floor:
            offsets: dict[tuple[str | None, int | None], int] = {}
            for m in msgs:
                if m.error() is not None:
                    continue
                # orjson, the fastest decode there is here and the worker's own (sluiceway.codec).
                kwargs = orjson.loads(m.value() or b"")
                if not isinstance(kwargs, dict):
                    raise TypeError("not an object")
                _noop(**kwargs)
                offsets[(m.topic(), m.partition())] = (m.offset() or 0) + 1
                got += 1
            if offsets:
                c.commit(
                    offsets=[TopicPartition(t or "", p or 0, o) for (t, p), o in offsets.items()],
                    asynchronous=False,
                )
        else:
            got += sum(1 for m in msgs if m.error() is None)
            if msgs:
                c.commit(asynchronous=False)
    elapsed = time.perf_counter() - start
    CPU_US["floor" if floor else "bare"] = (time.process_time() - cpu0) * 1e6 / n
    c.close()
    return n / elapsed


def transport_loop(url: str, queue: str, n: int) -> float:
    t = KafkaTransport(url, NS, queue, "bench", create_topics=False)
    got = 0
    start = cpu0 = 0.0
    while got < n:
        batch = t.fetch(1000, 1.0)
        if batch and not start:
            start, cpu0 = time.perf_counter(), time.process_time()
        got += len(batch)
        if batch:
            t.settle(Outcomes(acks=[d.token for d in batch]))
    elapsed = time.perf_counter() - start
    CPU_US["transport"] = (time.process_time() - cpu0) * 1e6 / n  # both threads: fetch and poll
    t.close()
    return n / elapsed


def throughput(url: str, redis_url: str, n: int, rounds: int) -> None:
    """Alternating rounds of the four loops (the order rotates each round: the machine's load
    drifts within a run); each round's ratios are to that round's references."""
    rows: dict[str, list[float]] = {
        "worker/bare": [],
        "worker/floor": [],
        "floor/bare": [],
        "transport/bare": [],
    }
    cpu: dict[str, list[float]] = {"bare": [], "floor": [], "transport": [], "worker": []}
    for r in range(rounds):
        queues = {k: f"{k}{uuid.uuid4().hex[:6]}" for k in ("bare", "floor", "tr")}
        for q in queues.values():
            _fill(url, q, n, 1)
        runs: dict[str, Callable[[], float]] = {
            "bare": functools.partial(bare_loop, url, queues["bare"], n),
            "floor": functools.partial(bare_loop, url, queues["floor"], n, floor=True),
            "transport": functools.partial(transport_loop, url, queues["tr"], n),
            "worker": functools.partial(worker_throughput, url, redis_url, n, 8),
        }
        order = list(runs)
        order = order[r % len(order) :] + order[: r % len(order)]
        rate = {k: runs[k]() for k in order}
        for k in cpu:
            cpu[k].append(CPU_US[k])
        rows["worker/bare"].append(rate["worker"] / rate["bare"])
        rows["worker/floor"].append(rate["worker"] / rate["floor"])
        rows["floor/bare"].append(rate["floor"] / rate["bare"])
        rows["transport/bare"].append(rate["transport"] / rate["bare"])
        print(
            f"round {r + 1} (order {', '.join(order)}): bare loop {rate['bare']:,.0f} msg/s; "
            f"floor loop {rate['floor']:,.0f} msg/s = {100 * rate['floor'] / rate['bare']:.0f}% of bare; "
            f"transport alone {rate['transport']:,.0f} msg/s = {100 * rate['transport'] / rate['bare']:.0f}%; "
            f"worker (-c 8, no-op, at-least-once) {rate['worker']:,.0f} msg/s = "
            f"{100 * rate['worker'] / rate['bare']:.0f}% of bare, {100 * rate['worker'] / rate['floor']:.0f}% of floor; "
            f"CPU/message bare {CPU_US['bare']:.1f} µs, floor {CPU_US['floor']:.1f} µs, "
            f"transport {CPU_US['transport']:.1f} µs, worker {CPU_US['worker']:.1f} µs",
            flush=True,
        )

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    print(
        f"median over {rounds} rounds: worker {100 * median(rows['worker/bare']):.0f}% of the bare loop, "
        f"{100 * median(rows['worker/floor']):.0f}% of the floor loop; floor loop {100 * median(rows['floor/bare']):.0f}% "
        f"of the bare loop; transport alone {100 * median(rows['transport/bare']):.0f}%; CPU/message bare "
        f"{median(cpu['bare']):.1f} µs, floor {median(cpu['floor']):.1f} µs, transport {median(cpu['transport']):.1f} µs, "
        f"worker {median(cpu['worker']):.1f} µs",
        flush=True,
    )


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


def _worker_env(url: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        SLUICEWAY_BROKER="kafka",
        SLUICEWAY_NAMESPACE=NS,
        SLUICEWAY_BROKER_URL=url,
        SLUICEWAY_REDIS_URL=redis_url,
        BENCH_RECORD_URL=redis_url,
        SLUICEWAY_METRICS_PORT="0",
        SLUICEWAY_LOG_LEVEL="WARNING",
    )
    return env


class _Committed:
    """The group's committed total, read through one long-lived client: a client made per read
    (threads, connections, metadata) would take CPU from the worker it measures, which the bare
    loop never pays."""

    def __init__(self, url: str, queue: str) -> None:
        self.c = Consumer({"bootstrap.servers": kc.bootstrap(url), "group.id": kc.group(NS, queue)})
        topic = kc.topic(NS, queue)
        parts = self.c.list_topics(topic, timeout=10).topics[topic].partitions
        self.tps = [TopicPartition(topic, p) for p in parts]

    def __call__(self) -> int:
        return sum(max(tp.offset, 0) for tp in self.c.committed(self.tps, timeout=10))

    def close(self) -> None:
        self.c.close()


def worker_throughput(url: str, redis_url: str, n: int, concurrency: int) -> float:
    """Messages/s of one `sluiceway worker` process on a no-op task, at-least-once, from its first
    commit to its last (process start and the group join do not count)."""
    queue = f"wk{uuid.uuid4().hex[:6]}"
    _fill(url, queue, n, 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluiceway",
            "worker",
            "-f",
            "bench.tasks:noop",
            "-q",
            queue,
            "-c",
            str(concurrency),
        ],
        env=_worker_env(url, redis_url),
        cwd=REPO,
    )
    deadline = time.monotonic() + 600
    committed = _Committed(url, queue)
    try:
        while (first := committed()) == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker committed nothing (exit {proc.poll()})")
            time.sleep(0.02)
        t0 = time.perf_counter()
        cpu0 = _cpu_seconds(proc.pid)
        while (done := committed()) < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker stopped at {done} of {n} (exit {proc.poll()})")
            time.sleep(0.02)
        CPU_US["worker"] = (_cpu_seconds(proc.pid) - cpu0) * 1e6 / max(done - first, 1)
        return (done - first) / (time.perf_counter() - t0)
    finally:
        committed.close()
        proc.terminate()
        proc.wait(60)


def qps_precision(
    url: str, redis_url: str, qps: int, workers: int, seconds: float = 10.0
) -> tuple[float, int]:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete("bench:starts")
    queue = f"qps{uuid.uuid4().hex[:6]}"
    _fill(url, queue, int(qps * (seconds + 8)) + 100, 4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sluiceway", "worker", "-f", "bench.tasks:stamp", "-q", queue, "-c", "16",
             "--qps", str(qps)],
            env=_worker_env(url, redis_url),
            cwd=REPO,
        )
        for _ in range(workers)
    ]  # fmt: skip
    deadline = time.monotonic() + 180
    while client.llen("bench:starts") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(seconds + 1.5)
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)
    starts = [float(x) for x in client.lrange("bench:starts", 0, -1)]
    print(
        f"  (qps {qps} x {workers}: worst window of 1 s - {RECORD_LAG:.2f} s, allowing the record lag: "
        f"{lag_tolerant(starts, qps, seconds)})",
        flush=True,
    )
    return window_figures(starts, qps, seconds)


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_bench")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-qps", action="store_true")
    parser.add_argument("--skip-rebalance", action="store_true")
    parser.add_argument("--only-qps", action="store_true", help="run only the QPS precision cases")
    parser.add_argument(
        "--only-rebalance", type=int, default=0, metavar="N", help="run only the rebalance cost, N times"
    )
    args = parser.parse_args(args_in)
    server = KafkaServer()
    server.start()
    from tests.support.redis_server import RedisServer

    redis_server = RedisServer()  # coordination: heartbeats and the fleet rate limit
    redis_server.start()
    try:
        print(f"Kafka {server.version} on {server.bootstrap}", flush=True)
        if args.only_rebalance:
            for _ in range(args.only_rebalance):
                rebalance_cost(server.url, min(args.messages, 20_000))
            return
        if not args.only_qps:
            throughput(server.url, redis_server.url, args.messages, args.rounds)
            if not args.skip_rebalance:
                rebalance_cost(server.url, min(args.messages, 20_000))
        if not args.skip_qps:
            qps_table(lambda q, w: qps_precision(server.url, redis_server.url, q, w), (1, 4), 10.0)
    finally:
        server.close()
        redis_server.close()


if __name__ == "__main__":
    main()
