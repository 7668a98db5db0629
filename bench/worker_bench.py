"""Worker benchmarks. Every figure is a ratio to a reference measured in the same run.

- throughput: one worker process, no-op task, at-least-once, against two bare redis-py loops
- qps: achieved / target rate and the worst 1-second window, for 10/100/1000 QPS x 1/4/8 workers
- round trips per message at the default settings
- with ``--compare-with REF``: this tree against the code at git ref REF, the median of 5 rounds
  that alternate the two versions in one run (a single run on a shared machine varies by up to 2x)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import redis
from tests.support.starts import start_bound

import sluiceway
from bench.report import lag_tolerant, qps_table, window_figures
from sluiceway import fleet
from sluiceway.contract import Keys

REPO = Path(__file__).resolve().parents[1]
KEYS = Keys("default", "bench")


def _server() -> tuple[subprocess.Popen[bytes], str]:
    sys.path.insert(0, str(REPO))
    from tests.support.redis_server import free_port

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, url


def reference_tree(ref: str) -> Path:
    """The code at git ref ``ref``, extracted once into the cache (keyed by commit)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluiceway" / "bench-ref" / sha
    if not (cache / ".complete").exists():
        archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True, check=True).stdout
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(cache, filter="data")
        (cache / ".complete").touch()
    return cache


def _env(url: str, tree: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # A reference tree's runtime comes first on the path, ahead of the editable install of this one.
    path = f"{tree / 'worker-image'}{os.pathsep}{REPO}" if tree is not None else str(REPO)
    env.update(
        PYTHONPATH=path,
        SLUICEWAY_REDIS_URL=url,
        BENCH_RECORD_URL=url,
        SLUICEWAY_METRICS_PORT="0",
        SLUICEWAY_LOG_LEVEL="WARNING",
    )
    return env


def _fill(url: str, n: int) -> None:
    pub = sluiceway.Publisher(url)
    pub.publish_batch("bench", ({"n": i} for i in range(n)))
    pub.close()


def bare_one_round_trip(client: redis.Redis, n: int) -> float:
    """Messages/s taking one message per round trip (at-most-once: the cheapest possible)."""
    t0 = time.perf_counter()
    while client.rpop(KEYS.ready) is not None:
        pass
    return n / (time.perf_counter() - t0)


def bare_batched(client: redis.Redis, n: int, batch: int = 500) -> float:
    """Messages/s taking 500 messages per round trip: the physical limit of one client here."""
    t0 = time.perf_counter()
    while client.rpop(KEYS.ready, batch):
        pass
    return n / (time.perf_counter() - t0)


def bare_pipelined(client: redis.Redis, n: int, depth: int = 100) -> float:
    """Messages/s with pipelines of 100 single-message pops per round trip."""
    t0 = time.perf_counter()
    while True:
        pipe = client.pipeline(transaction=False)
        for _ in range(depth):
            pipe.rpop(KEYS.ready)
        if pipe.execute()[-1] is None:
            break
    return n / (time.perf_counter() - t0)


def _round_trips(metrics_port: int) -> float:
    """The worker's own count of its Redis round trips, from its Prometheus endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("sluiceway_redis_round_trips_total"):
                return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("the worker exposes no sluiceway_redis_round_trips_total")


def worker_throughput(url: str, n: int, concurrency: int, tree: Path | None = None) -> tuple[float, float]:
    """Messages/s of one worker process on a no-op task, and its Redis round trips per message.
    ``tree``: run the worker runtime of that source tree instead of this one."""
    from tests.support.redis_server import free_port

    client = redis.Redis.from_url(url)
    client.flushall()
    _fill(url, n)
    metrics_port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluiceway",
            "worker",
            "-f",
            "bench.tasks:noop",
            "-q",
            "bench",
            "-c",
            str(concurrency),
            "--metrics-port",
            str(metrics_port),
        ],
        env=_env(url, tree),
    )
    # Time from the first ack to the last, so process start-up does not count.
    while fleet.queue_stats(client, KEYS).acked == 0:
        time.sleep(0.001)
    t0, cpu0 = time.perf_counter(), _cpu_seconds(proc.pid)
    first = fleet.queue_stats(client, KEYS).acked
    while (done := fleet.queue_stats(client, KEYS).acked) < n:
        time.sleep(0.005)
    rate = (done - first) / (time.perf_counter() - t0)
    LAST_CPU_US[0] = (_cpu_seconds(proc.pid) - cpu0) / max(done - first, 1) * 1e6
    # Counted by the worker itself: start-up (a handful) and heartbeats included.
    round_trips = _round_trips(metrics_port)
    proc.terminate()
    proc.wait()
    return rate, round_trips / n


def qps_precision(
    url: str, qps: int, workers: int, seconds: float, tree: Path | None = None
) -> tuple[float, int]:
    client = redis.Redis.from_url(url)
    client.flushall()
    _fill(url, int(qps * (seconds + 5)) + 100)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sluiceway", "worker", "-f", "bench.tasks:stamp", "-q", "bench", "-c", "16",
             "--qps", str(qps)],
            env=_env(url, tree),
        )
        for _ in range(workers)
    ]  # fmt: skip
    while client.llen("bench:starts") == 0:
        time.sleep(0.01)
    time.sleep(seconds + 1.5)
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
    return window_figures([float(x) for x in client.lrange("bench:starts", 0, -1)], qps, seconds)


def _spin() -> None:
    while True:
        pass


def qps_compare(url: str, ref: str, qps: int, workers: int, seconds: float, rounds: int, load: int) -> None:
    """This tree's and ``ref``'s workers at one QPS cell, alternating which goes first, with
    ``load`` busy processes beside them (a loaded node: replies wait to be read); prints each
    round's mean and worst 1-s window (recorded, and allowing the record lag)."""
    import multiprocessing

    base = reference_tree(ref)
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
    for sp in spinners:
        sp.start()
    try:
        for i in range(rounds):
            runs: list[tuple[str, Path | None]] = [("this tree", None), (ref, base)]
            for name, tree in runs if i % 2 == 0 else reversed(runs):
                qps_precision(url, qps, workers, seconds, tree)
                starts = [float(x) for x in redis.Redis.from_url(url).lrange("bench:starts", 0, -1)]
                mean, worst = window_figures(starts, qps, seconds)
                print(
                    f"round {i + 1} {name}: {qps} QPS x {workers} workers, load {load}: mean {mean:.4f} of the "
                    f"target, worst 1-s window {worst} recorded, {lag_tolerant(starts, qps, seconds)} allowing "
                    f"the record lag (bound {start_bound(qps)})",
                    flush=True,
                )
    finally:
        for sp in spinners:
            sp.kill()


# CPU time (user + system) the worker process spent per message in the last throughput run, µs.
# Steadier than msg/s on a shared machine: waiting for a core does not count.
LAST_CPU_US = [0.0]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare(
    url: str, n: int, concurrency: int, ref: str, rounds: int = 5
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (msg/s, CPU µs per message) of this tree and of ``ref``, alternating which goes
    first in each round."""
    base = reference_tree(ref)
    mine: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    for i in range(rounds):
        runs: list[tuple[list[tuple[float, float]], Path | None]] = [(mine, None), (theirs, base)]
        for sink, tree in runs if i % 2 == 0 else reversed(runs):
            rate = worker_throughput(url, n, concurrency, tree)[0]
            sink.append((rate, LAST_CPU_US[0]))

    def median(xs: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)

    return median(mine), median(theirs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--qps-seconds", type=float, default=10.0)
    p.add_argument("--skip-qps", action="store_true")
    p.add_argument("--compare-with", metavar="REF", help="also compare with the worker at this git ref")
    p.add_argument("--compare-only", action="store_true", help="run only the --compare-with rounds")
    p.add_argument(
        "--qps-compare-with",
        metavar="REF",
        help="only: QPS precision of this tree against REF (see qps_compare)",
    )
    p.add_argument("--qps", type=int, default=1000, help="with --qps-compare-with: the rate")
    p.add_argument("--workers", type=int, default=8, help="with --qps-compare-with: worker processes")
    p.add_argument("--rounds", type=int, default=3, help="with --qps-compare-with: alternating rounds")
    p.add_argument("--load", type=int, default=0, help="with --qps-compare-with: busy processes beside")
    args = p.parse_args(argv)
    proc, url = _server()
    try:
        if args.qps_compare_with:
            qps_compare(
                url, args.qps_compare_with, args.qps, args.workers, args.qps_seconds, args.rounds, args.load
            )
            return
        if args.compare_with:
            for c in (1, 8):
                (now, now_cpu), (then, then_cpu) = compare(url, args.messages, c, args.compare_with)
                print(
                    f"worker (-c {c}) vs {args.compare_with}: median of 5 alternating rounds "
                    f"{now:,.0f} vs {then:,.0f} msg/s = {now / then:.1%}; "
                    f"CPU {now_cpu:.1f} vs {then_cpu:.1f} µs/message = {now_cpu / then_cpu:.1%}",
                    flush=True,
                )
            if args.compare_only:
                return
        client = redis.Redis.from_url(url)
        n = args.messages
        # References are the best of three runs: the physical limit, not a noisy sample of it.
        one = batched = bulk = 0.0
        for _ in range(3):
            _fill(url, n)
            one = max(one, bare_one_round_trip(client, n))
            _fill(url, n)
            batched = max(batched, bare_pipelined(client, n))
            _fill(url, n)
            bulk = max(bulk, bare_batched(client, n))
        print(f"reference: bare redis-py, 1 round trip/message:   {one:,.0f} msg/s")
        print(f"reference: bare redis-py, pipelines of 100 pops:  {batched:,.0f} msg/s")
        print(f"reference: bare redis-py, RPOP count=500 (no per-message client work): {bulk:,.0f} msg/s")
        for c in (1, 8):
            rate, rtt = max(worker_throughput(url, n, c) for _ in range(2))
            print(
                f"worker (-c {c}), no-op, at-least-once: {rate:,.0f} msg/s = {rate / one:.2f}x the 1-RTT loop, "
                f"{rate / batched:.1%} of the pipelined loop, {rate / bulk:.1%} of bulk pops; "
                f"{rtt:.4f} Redis round trips/message"
            )
        if not args.skip_qps:
            qps_table(lambda q, w: qps_precision(url, q, w, args.qps_seconds), (1, 4, 8), args.qps_seconds)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
