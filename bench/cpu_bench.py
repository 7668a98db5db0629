"""CPU-bound function, one pod, perPod 2: process mode against thread mode in the same run.

The reference is the same work with no Sluiceway at all, in the same rounds: two bare threads
against two bare spawned processes. Its ratio is what the machine allowed at the time (on a
shared machine other work takes the second core), so the workers' ratio is read against it.

The function is about 20 ms of pure Python (its loop is sized once, here, on this machine). Each
round fills the queue, starts one CLI worker as a TaskQueue's pod runs it (its defaults, with
``-c 2``) and times the drain from the first message taken to an empty queue; the modes
alternate, and the median of the rounds is compared. Also printed: the time from the worker's
start to its first task (process mode spawns its children first) and each child's memory.

    python -m bench.cpu_bench [--messages 300] [--rounds 5] [--ms 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
from tests.support.redis_server import RedisServer
from tests.support.workers import children, worker_env

import sluiceway
from bench.cpu_tasks import burn, burn_share, gated_share
from sluiceway import fleet
from sluiceway.contract import Keys

REPO = Path(__file__).resolve().parents[1]
KEYS = Keys("default", "cpu")


def calibrate(ms: float) -> int:
    """Loop iterations for about ``ms`` milliseconds on this machine (best of 5: unloaded speed)."""
    probe = 200_000
    best = min(_timed(probe) for _ in range(5))
    return max(1000, int(probe * (ms / 1000) / best))


def _timed(iterations: int) -> float:
    t0 = time.perf_counter()
    burn(0, iterations)
    return time.perf_counter() - t0


def bare_round(kind: str, n: int, iterations: int) -> float:
    """The machine's own answer, no Sluiceway: ``n`` tasks on 2 threads or 2 spawned processes
    (their start not timed), in tasks/s. Its ratio is the ceiling for the workers' ratio."""
    share = n // 2
    if kind == "thread":
        runners: list[Any] = [threading.Thread(target=burn_share, args=(share, iterations)) for _ in range(2)]
        t0 = time.monotonic()
        for t in runners:
            t.start()
    else:
        ctx = multiprocessing.get_context("spawn")
        ready, go = ctx.Queue(), ctx.Event()
        runners = [ctx.Process(target=gated_share, args=(ready, go, share, iterations)) for _ in range(2)]
        for p in runners:
            p.start()
        for _ in runners:
            ready.get()  # both imported: only the work is timed
        t0 = time.monotonic()
        go.set()
    for r in runners:
        r.join()
    return share * 2 / (time.monotonic() - t0)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pod_cpu(pid: int) -> float:
    return _cpu_seconds(pid) + sum(_cpu_seconds(c) for c in children(pid))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_round(url: str, mode: str, n: int, iterations: int) -> tuple[float, float, float, list[float]]:
    """(tasks/s, seconds from start to the first task, cores the pod used while draining,
    children's RSS in MiB)."""
    client = redis.Redis.from_url(url)
    client.flushall()
    pub = sluiceway.Publisher(url)
    pub.publish_batch("cpu", ({"n": i, "iterations": iterations} for i in range(n)))
    pub.close()
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluiceway", "worker", "-f", "bench.cpu_tasks:burn", "-q", "cpu",
         "-c", "2", "--concurrency-mode", mode],
        env=worker_env(url, SLUICEWAY_LOG_LEVEL="WARNING"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )  # fmt: skip
    rss: list[float] = []
    try:
        while client.llen(KEYS.ready) == n:
            time.sleep(0.002)
        first = time.monotonic()
        cpu0 = _pod_cpu(proc.pid)
        while True:
            stats = fleet.queue_stats(client, KEYS)
            if stats.ready + stats.in_flight == 0:
                break
            if not rss and mode == "process":
                rss = [_rss_mib(p) for p in children(proc.pid)]
            time.sleep(0.005)
        done = time.monotonic()
        cores = (_pod_cpu(proc.pid) - cpu0) / (done - first)
    finally:
        proc.terminate()
        proc.wait(30)
        client.close()
    return n / (done - first), first - started, cores, rss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ms", type=float, default=20.0)
    args = p.parse_args(argv)
    iterations = calibrate(args.ms)
    server = RedisServer()
    server.start()
    rates: dict[str, list[float]] = {"thread": [], "process": []}
    bare: dict[str, list[float]] = {"thread": [], "process": []}
    ready: dict[str, list[float]] = {"thread": [], "process": []}
    cores: dict[str, list[float]] = {"thread": [], "process": []}
    rss: list[float] = []
    try:
        for _ in range(args.rounds):
            for mode in ("thread", "process"):
                rate, to_first, used, mem = one_round(server.url, mode, args.messages, iterations)
                rates[mode].append(rate)
                cores[mode].append(used)
                ready[mode].append(to_first)
                rss += mem
                bare[mode].append(bare_round(mode, args.messages, iterations))
    finally:
        server.close()
    thread, process = statistics.median(rates["thread"]), statistics.median(rates["process"])
    print(
        f"CPU-bound task: {iterations:,} loop iterations (~{args.ms:.0f} ms alone), {args.messages} messages, -c 2"
    )
    for mode in ("thread", "process"):
        print(
            f"  {mode:>7} mode: {statistics.median(rates[mode]):6.1f} tasks/s (rounds: "
            + ", ".join(f"{x:.1f}" for x in rates[mode])
            + f"); start to first task {statistics.median(ready[mode]):.2f} s;"
            f" cores used {statistics.median(cores[mode]):.2f}"
        )
    print(f"  process / thread: {process / thread:.2f}x (target >= 1.8x on 2 cores)")
    b_thread, b_process = statistics.median(bare["thread"]), statistics.median(bare["process"])
    print(
        f"  reference, no Sluiceway, same rounds: 2 processes {b_process:.1f} vs 2 threads {b_thread:.1f}"
        f" tasks/s = {b_process / b_thread:.2f}x (what this machine allows now)"
    )
    if rss:
        print(f"  memory per child: {statistics.median(rss):.0f} MiB RSS (median of {len(rss)})")


if __name__ == "__main__":
    main()
