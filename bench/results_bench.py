"""Call latency: p50/p99 of ``call_async`` for a no-op function against a bare Redis round trip
(a PING on an asyncio client) in the same run, then the throughput of 1,000 concurrent calls.

    python -m bench.results_bench [--samples 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.support.redis_server import RedisServer
from tests.support.workers import worker_env

import sluiceway
from sluiceway import connection

REPO = Path(__file__).resolve().parents[1]


def _quantile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(url: str, samples: int) -> None:
    client = connection.async_client(url)
    await sluiceway.call_async("noop", {}, timeout=30)  # start the listener and warm the worker
    ping: list[float] = []
    calls: list[float] = []
    for _ in range(samples):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        await client.ping()
        ping.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await sluiceway.call_async("noop", {}, timeout=30)
        calls.append(time.perf_counter() - t0)
    await client.aclose()
    for name, xs in (("redis PING", ping), ("call_async(noop)", calls)):
        print(
            f"{name:>18}: p50 {_quantile(xs, 0.5) * 1000:7.3f} ms  p99 {_quantile(xs, 0.99) * 1000:7.3f} ms"
            f"  (mean {statistics.fmean(xs) * 1000:.3f} ms, n={len(xs)})"
        )
    print(f"{'ratio':>18}: p50 {_quantile(calls, 0.5) / _quantile(ping, 0.5):.1f}x a bare round trip")
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        await asyncio.gather(*(sluiceway.call_async("noop", {}, timeout=60) for _ in range(1000)))
        rates.append(1000 / (time.perf_counter() - t0))
    print(
        f"1,000 concurrent calls: {statistics.median(rates):.0f} calls/s (median of 3: {rates[0]:.0f}, {rates[1]:.0f}, {rates[2]:.0f})"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=500)
    args = p.parse_args(argv)
    server = RedisServer()
    server.start()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluiceway",
            "worker",
            "-f",
            "tests.support.call_tasks:noop",
            "-q",
            "noop",
            "-c",
            "8",
        ],
        env=worker_env(server.url, SLUICEWAY_LOG_LEVEL="WARNING"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    os.environ["SLUICEWAY_REDIS_URL"] = server.url
    os.environ.pop("SLUICEWAY_BROKER", None)
    try:
        asyncio.run(_measure(server.url, args.samples))
    finally:
        worker.kill()
        worker.wait()
        server.close()


if __name__ == "__main__":
    main()
