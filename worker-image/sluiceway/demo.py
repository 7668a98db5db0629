"""``make demo``: a local fleet of real worker processes drains a burst under a fleet-wide QPS limit.

Runs against the Redis that ``make services`` starts (``SLUICEWAY_REDIS_URL``, default port 6390),
shows a live view until the queue is empty, then stops the fleet with SIGTERM and checks that
every message was processed and no 1-second window exceeded the limit.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections import deque

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

import sluiceway
import sluiceway.contract
from sluiceway import fleet
from sluiceway.contract import ENV_REDIS_URL, Keys
from sluiceway.ratelimit import max_in_window

QUEUE = "demo"
STARTS = "sluiceway-demo:starts"
SEEN = "sluiceway-demo:seen"


def sample_task(n: int, work_ms: int = 40) -> None:
    """The demo's function: a little work, an occasional transient failure, and one poison pill."""
    client = _record_client()
    pipe = client.pipeline(transaction=False)
    pipe.rpush(STARTS, f"{time.time():.6f}")
    pipe.hincrby(SEEN, str(n), 1)
    pipe.execute()
    if n == 13:
        raise sluiceway.Reject("message 13 is a poison pill: dead-lettered with this reason")
    time.sleep(work_ms / 1000)
    if random.random() < 0.02:
        raise ConnectionError("a flaky downstream; the message is retried with backoff")


_client: redis.Redis | None = None


def _record_client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ[ENV_REDIS_URL])
    return _client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=600)
    p.add_argument("--qps", type=float, default=50)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--redis-url", default=os.environ.get(ENV_REDIS_URL) or _local_url())
    args = p.parse_args(argv)
    console = Console()
    client = redis.Redis.from_url(args.redis_url)
    try:
        client.ping()
    except redis.ConnectionError:
        console.print(
            f"[red]No Redis at {args.redis_url}.[/] Run `make services` first (or `make demo`, which does)."
        )
        return 1
    keys = Keys("default", QUEUE)
    fleet.purge(client, keys)
    client.delete(STARTS, SEEN)

    env = dict(
        os.environ,
        SLUICEWAY_REDIS_URL=args.redis_url,
        SLUICEWAY_LOG_FORMAT="json",
        SLUICEWAY_METRICS_PORT="0",
    )
    env["SLUICEWAY_LOG_LEVEL"] = "WARNING"
    cmd = [
        sys.executable, "-m", "sluiceway", "worker", "-f", "sluiceway.demo:sample_task", "-q", QUEUE,
        "--qps", str(args.qps), "-c", str(args.concurrency), "--backoff", "0.2", "--max-backoff", "1",
    ]  # fmt: skip
    console.print(
        f"[bold]Sluiceway demo[/]: {args.workers} worker processes x {args.concurrency} threads share a "
        f"fleet-wide limit of [bold]{args.qps:g} QPS[/] (Redis {args.redis_url})."
    )
    workers = [
        subprocess.Popen([*cmd, "--worker-id", f"demo-worker-{i}"], env=env, stderr=subprocess.DEVNULL)
        for i in range(args.workers)
    ]
    interrupted = False

    def on_interrupt(_sig: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    try:
        sluiceway.Publisher(args.redis_url).publish_batch(QUEUE, ({"n": i} for i in range(args.messages)))
        console.print(f"Published a burst of {args.messages} messages. Try meanwhile: "
                      f"[cyan]sluiceway stats -q {QUEUE} --redis-url {args.redis_url}[/]")  # fmt: skip
        t0 = time.monotonic()
        history: deque[tuple[float, int]] = deque(maxlen=20)
        with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
            while not interrupted:
                stats = fleet.queue_stats(client, keys)
                beats = fleet.heartbeats(client, keys)
                now = time.monotonic()
                history.append((now, stats.acked + stats.dead_total))
                rate = _rate(history)
                live.update(_view(stats, beats, rate, args.qps, now - t0))
                if not console.is_terminal:
                    console.print(
                        f"t={now - t0:5.1f}s backlog={stats.backlog} in-flight={stats.in_flight} "
                        f"workers={len(beats)} qps={rate:.1f}/{args.qps:g} dead={stats.dead}"
                    )
                if (
                    stats.backlog == 0
                    and stats.in_flight == 0
                    and stats.acked + stats.dead_total >= args.messages
                ):
                    break
                time.sleep(1.0 if not console.is_terminal else 0.25)
        elapsed = time.monotonic() - t0
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    if interrupted:
        console.print("Interrupted: the workers drained and handed back unfinished messages.")
        return 130
    starts = sorted(float(x) for x in client.lrange(STARTS, 0, -1))
    seen = {int(k): int(v) for k, v in client.hgetall(SEEN).items()}
    dead = fleet.dead_letters(client, keys, 10)
    stats = fleet.queue_stats(client, keys)
    worst = max_in_window(starts, 1.0) if starts else 0
    missing = set(range(args.messages)) - set(seen)
    console.print(
        f"\nDrained {args.messages} messages in {elapsed:.1f} s: {stats.acked} acknowledged, "
        f"{stats.retried} retries, {stats.dead} dead-lettered, {len(missing)} never run."
    )
    console.print(f"Busiest 1-second window: {worst} task starts (limit {args.qps:g}).")
    for entry in dead:
        console.print(f"Dead letter: reason={entry['reason']}: {entry['detail']}")
    console.print(f"Workers exited with {codes} after SIGTERM (0 = drained cleanly).")
    ok = not missing and all(c == 0 for c in codes) and worst <= args.qps + 1
    console.print("[green]Demo OK[/]" if ok else "[red]Demo found a problem[/]")
    return 0 if ok else 1


def _local_url() -> str:
    return f"redis://127.0.0.1:{os.environ.get('SLUICEWAY_LOCAL_REDIS_PORT', '6390')}/0"


def _rate(history: deque[tuple[float, int]]) -> float:
    if len(history) < 2:
        return 0.0
    (t0, c0), (t1, c1) = history[0], history[-1]
    return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


def _view(stats: fleet.QueueStats, beats: list[sluiceway.contract.Heartbeat], rate: float, limit: float,
          elapsed: float) -> Table:  # fmt: skip
    eta = (stats.backlog + stats.in_flight) / rate if rate > 0 else float("inf")
    table = Table(title=f"queue default/{QUEUE} - {elapsed:.0f} s", min_width=60)
    table.add_column("backlog", justify="right")
    table.add_column("in flight", justify="right")
    table.add_column("workers (busy)", justify="right")
    table.add_column("fleet QPS / limit", justify="right")
    table.add_column("ETA", justify="right")
    table.add_column("dead", justify="right")
    table.add_row(
        str(stats.backlog),
        str(stats.in_flight),
        f"{len(beats)} ({sum(b['busy'] for b in beats)})",
        f"{rate:.1f} / {limit:g}",
        "-" if eta == float("inf") else f"{eta:.0f} s",
        str(stats.dead),
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
