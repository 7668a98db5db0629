"""The ``sluiceway`` command: run a worker, publish messages, inspect a queue."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from sluiceway import __version__
from sluiceway import contract as c

_EPILOG = """\
Every worker flag can also come from its SLUICEWAY_* environment variable (the operator sets
those); a flag wins over the variable. Exit codes: 0 stopped cleanly, 1 unexpected error,
2 bad settings, 3 function not importable, 4 tasks stuck past their timeout.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sluiceway",
        description="Run Python functions as queue workers with an exact fleet-wide QPS limit.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sluiceway {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser(
        "worker",
        help="consume a queue and call a function for each message",
        description="Consume a queue and call FUNCTION with each message's keyword arguments.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--function", "-f", help=f"module:callable, a def or async def [{c.ENV_FUNCTION}]")
    _queue_args(w)
    w.add_argument(
        "--broker", choices=["redis", "rabbitmq", "kafka"], help=f"message broker [{c.ENV_BROKER}]"
    )
    w.add_argument("--broker-url", help=f"broker URL when it is not Redis [{c.ENV_BROKER_URL}]")
    w.add_argument(
        "--qps", type=float, help=f"fleet-wide task starts per second; 0 = unlimited [{c.ENV_QPS}]"
    )
    w.add_argument(
        "--qps-burst", type=int, help=f"extra starts allowed at once after idling [{c.ENV_QPS_BURST}]"
    )
    w.add_argument(
        "--concurrency", "-c", type=int, help=f"tasks at once in this process [{c.ENV_CONCURRENCY}]"
    )
    w.add_argument(
        "--concurrency-mode", choices=["thread", "asyncio"], help=f"how tasks run [{c.ENV_CONCURRENCY_MODE}]"
    )
    w.add_argument(
        "--prefetch",
        type=int,
        help=f"extra messages held ready beyond concurrency; -1 = about 100 ms of work (default) [{c.ENV_PREFETCH}]",
    )
    w.add_argument("--max-attempts", type=int, help=f"attempts before dead-lettering [{c.ENV_MAX_ATTEMPTS}]")
    w.add_argument(
        "--backoff",
        dest="backoff_seconds",
        type=float,
        help=f"first retry delay, s [{c.ENV_BACKOFF_SECONDS}]",
    )
    w.add_argument(
        "--max-backoff",
        dest="max_backoff_seconds",
        type=float,
        help=f"retry delay cap, s [{c.ENV_MAX_BACKOFF_SECONDS}]",
    )
    w.add_argument(
        "--timeout", dest="timeout_seconds", type=float, help=f"per-task timeout, s [{c.ENV_TIMEOUT_SECONDS}]"
    )
    w.add_argument(
        "--max-age",
        dest="max_message_age_seconds",
        type=float,
        help=f"dead-letter messages older than this, s; 0 = no limit [{c.ENV_MAX_MESSAGE_AGE_SECONDS}]",
    )
    w.add_argument(
        "--lease", dest="lease_seconds", type=float, help=f"message lease, s [{c.ENV_LEASE_SECONDS}]"
    )
    w.add_argument(
        "--heartbeat",
        dest="heartbeat_seconds",
        type=float,
        help=f"heartbeat interval, s [{c.ENV_HEARTBEAT_SECONDS}]",
    )
    w.add_argument(
        "--drain",
        dest="drain_seconds",
        type=float,
        help=f"grace for running tasks on SIGTERM, s [{c.ENV_DRAIN_SECONDS}]",
    )
    w.add_argument("--worker-id", help=f"unique worker name; default the pod name [{c.ENV_WORKER_ID}]")
    w.add_argument(
        "--metrics-port", type=int, help=f"Prometheus /metrics and /healthz; 0 = off [{c.ENV_METRICS_PORT}]"
    )
    w.add_argument("--log-format", choices=["json", "console"], help=f"[{c.ENV_LOG_FORMAT}]")
    w.add_argument("--log-level", help=f"DEBUG, INFO, WARNING ... [{c.ENV_LOG_LEVEL}]")

    pub = sub.add_parser(
        "publish",
        help="publish messages (JSON objects of keyword arguments)",
        description="Publish messages. Give one JSON object per argument, or pipe JSON lines on stdin with '-'.",
    )
    _queue_args(pub)
    pub.add_argument(
        "messages", nargs="*", metavar="JSON", help='e.g. \'{"path": "a.png"}\'; "-" reads JSON lines'
    )
    pub.add_argument("--repeat", type=int, default=1, help="publish each message this many times")
    pub.add_argument("--delay", type=float, default=0.0, help="hold the messages back this many seconds")

    st = sub.add_parser("stats", help="show a queue's depth, in-flight work and live workers")
    _queue_args(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")

    dlq = sub.add_parser("dlq", help="list or replay dead-lettered messages")
    _queue_args(dlq)
    dlq.add_argument("--limit", type=int, default=20, help="entries to show")
    dlq.add_argument("--replay", type=int, metavar="N", help="move the N oldest back to the queue")
    return p


def _queue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", "-q", help=f"queue name, or namespace/name [{c.ENV_QUEUE}]")
    p.add_argument("--namespace", "-n", help=f"queue namespace (default 'default') [{c.ENV_NAMESPACE}]")
    p.add_argument("--redis-url", help=f"Redis for queues and coordination [{c.ENV_REDIS_URL}]")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    return _tool(args)


def _worker(args: argparse.Namespace) -> int:
    from sluiceway.run import run_worker

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    return run_worker(overrides)


def _tool(args: argparse.Namespace) -> int:
    from sluiceway import connection, fleet
    from sluiceway.publish import DEFAULT_REDIS_URL, Publisher, resolve_queue

    queue = args.queue or os.environ.get(c.ENV_QUEUE)
    if not queue:
        print(f"sluiceway {args.command}: --queue is required (or set {c.ENV_QUEUE})", file=sys.stderr)
        return 2
    url = args.redis_url or os.environ.get(c.ENV_REDIS_URL) or DEFAULT_REDIS_URL
    keys = resolve_queue(queue, args.namespace)
    if args.command == "publish":
        messages: list[dict[str, Any]] = []
        try:
            for raw in args.messages or ["-"]:
                lines = sys.stdin if raw == "-" else [raw]
                for line in lines:
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise ValueError(f"a message must be a JSON object, got {line.strip()[:80]}")
                        messages.append(obj)
        except ValueError as exc:
            print(f"sluiceway publish: {exc}", file=sys.stderr)
            return 2
        pub = Publisher(args.redis_url) if args.redis_url else Publisher()  # else the broker from the env
        qname = f"{keys.namespace}/{keys.queue}"
        if args.delay > 0:
            ids = [pub.publish(qname, m, delay=args.delay) for m in messages for _ in range(args.repeat)]
        else:
            ids = pub.publish_batch(qname, [m for m in messages for _ in range(args.repeat)])
        print(f"published {len(ids)} message(s) to {qname}")
        return 0
    client = connection.client(url)
    if args.command == "stats":
        stats = fleet.queue_stats(client, keys)
        workers = fleet.heartbeats(client, keys)
        if args.json:
            print(json.dumps({"stats": dataclasses.asdict(stats), "workers": workers}))
        else:
            print(f"queue {keys.namespace}/{keys.queue}")
            for name in ("ready", "delayed", "in_flight", "dead", "acked", "retried", "reaped"):
                print(f"  {name:<10} {getattr(stats, name)}")
            print(f"  workers    {len(workers)} live, {sum(w['busy'] for w in workers)} busy")
            for w in workers:
                print(
                    f"    {w['worker']}: {w['state']}, {w['busy']}/{w['concurrency']} busy, {w['rate']:.1f}/s"
                )
        return 0
    if args.replay:
        print(f"replayed {fleet.replay_dead_letters(client, keys, args.replay)} message(s)")
        return 0
    for entry in fleet.dead_letters(client, keys, args.limit):
        print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
