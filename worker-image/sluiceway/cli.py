"""The ``sluiceway`` command: run a worker, publish messages, inspect a queue.

Every failure the user can cause or fix is one line on stderr and a documented exit code (see
``_EPILOG`` and docs/worker.md, "Command line"), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NoReturn

from sluiceway import __version__
from sluiceway import contract as c
from sluiceway.settings import LOG_LEVELS, QUEUE_NAME, WorkerSettings
from sluiceway.transports.registry import BROKERS

if TYPE_CHECKING:
    import redis

    from sluiceway.fleet import QueueStats


class ToolExit(IntEnum):
    """Exit codes of ``publish``, ``stats`` and ``dlq`` (the worker's are ``worker.ExitCode``)."""

    OK = 0
    FAILURE = 1  # unexpected error
    USAGE = 2  # bad arguments or a bad message: nothing was published or changed
    UNREACHABLE = 5  # Redis or the broker could not be reached (down, wrong URL, refused credentials)


# Brokers this runtime can run: the ones the transport registry has.
WORKING_BROKERS = BROKERS

_EPILOG = """\
Every worker flag can also come from its SLUICEWAY_* environment variable (the operator sets
those); a flag wins over the variable, and the default applies when neither is given.
Exit codes: 0 stopped cleanly, 1 unexpected error, 2 bad settings, 3 function not importable,
4 tasks stuck past their timeout.
"""

_TOOL_EPILOG = """\
Exit codes: 0 done, 1 unexpected error, 2 bad arguments or message (nothing was published or
changed), 5 Redis or the broker unreachable.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of the command, instead of argparse's usage block.
        self.exit(ToolExit.USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _default(name: str) -> Any:
    """The worker's default for a setting: WorkerSettings owns them, help only shows them."""
    for f in dataclasses.fields(WorkerSettings):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _h(text: str, env: str, name: str | None = None, shown: str | None = None) -> str:
    if name is None:
        return f"{text} [{env}]"
    value = shown if shown is not None else _default(name)
    return f"{text} [{env}; default {value}]"


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


# A refresh faster than this only loads Redis: nobody reads a screen redrawn more often.
MIN_REFRESH_SECONDS = 0.1


def _refresh_seconds(text: str) -> float:
    x = _seconds(text)
    if x < MIN_REFRESH_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_REFRESH_SECONDS:g} s, got {text}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sluiceway",
        description="Run Python functions as queue workers with an exact fleet-wide QPS limit.",
        # Both tables, each saying which commands it is for.
        epilog=_EPILOG.replace("Exit codes:", "Exit codes of worker:")
        + _TOOL_EPILOG.replace("Exit codes:", "Exit codes of publish, stats and dlq:"),
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
    w.add_argument("--function", "-f", help=_h("module:callable, a def or async def", c.ENV_FUNCTION))
    _queue_args(w)
    w.add_argument("--broker", choices=WORKING_BROKERS, help=_h("message broker", c.ENV_BROKER, "broker"))
    w.add_argument("--broker-url", help=_h("broker URL when it is not Redis", c.ENV_BROKER_URL))
    w.add_argument(
        "--qps",
        type=float,
        help=_h("fleet-wide task starts per second; 0 = unlimited", c.ENV_QPS, "qps", "0 (unlimited)"),
    )
    w.add_argument(
        "--qps-burst",
        type=int,
        help=_h("extra starts allowed at once after idling", c.ENV_QPS_BURST, "qps_burst"),
    )
    w.add_argument(
        "--concurrency",
        "-c",
        type=int,
        help=_h("tasks at once in this process", c.ENV_CONCURRENCY, "concurrency"),
    )
    w.add_argument(
        "--concurrency-mode",
        choices=list(c.CONCURRENCY_MODES),
        help=_h(
            "how tasks run: threads, one event loop, or one child process each",
            c.ENV_CONCURRENCY_MODE,
            "concurrency_mode",
        ),
    )
    w.add_argument(
        "--prefetch",
        type=int,
        help=_h(
            "extra messages held ready beyond concurrency; -1 = about 100 ms of work",
            c.ENV_PREFETCH,
            "prefetch",
        ),
    )
    w.add_argument(
        "--max-attempts",
        type=int,
        help=_h("attempts before dead-lettering", c.ENV_MAX_ATTEMPTS, "max_attempts"),
    )
    w.add_argument(
        "--backoff",
        dest="backoff_seconds",
        type=float,
        help=_h("first retry delay, s", c.ENV_BACKOFF_SECONDS, "backoff_seconds"),
    )
    w.add_argument(
        "--max-backoff",
        dest="max_backoff_seconds",
        type=float,
        help=_h("retry delay cap, s", c.ENV_MAX_BACKOFF_SECONDS, "max_backoff_seconds"),
    )
    w.add_argument(
        "--timeout",
        dest="timeout_seconds",
        type=float,
        help=_h("per-task timeout, s", c.ENV_TIMEOUT_SECONDS, "timeout_seconds"),
    )
    w.add_argument(
        "--max-age",
        dest="max_message_age_seconds",
        type=float,
        help=_h(
            "dead-letter messages older than this, s; 0 = no limit",
            c.ENV_MAX_MESSAGE_AGE_SECONDS,
            "max_message_age_seconds",
        ),
    )
    w.add_argument(
        "--lease",
        dest="lease_seconds",
        type=float,
        help=_h("message lease, s", c.ENV_LEASE_SECONDS, "lease_seconds"),
    )
    w.add_argument(
        "--heartbeat",
        dest="heartbeat_seconds",
        type=float,
        help=_h("heartbeat interval, s", c.ENV_HEARTBEAT_SECONDS, "heartbeat_seconds"),
    )
    w.add_argument(
        "--drain",
        dest="drain_seconds",
        type=float,
        help=_h(
            "grace for running tasks on SIGTERM, s", c.ENV_DRAIN_SECONDS, "drain_seconds", "the task timeout"
        ),
    )
    w.add_argument(
        "--worker-id",
        help=_h("unique worker name", c.ENV_WORKER_ID, "worker_id", "the pod name, else host-pid"),
    )
    w.add_argument(
        "--metrics-port",
        type=int,
        help=_h("Prometheus /metrics and /healthz; 0 = off", c.ENV_METRICS_PORT, "metrics_port"),
    )
    w.add_argument(
        "--log-format", choices=["json", "console"], help=_h("log lines", c.ENV_LOG_FORMAT, "log_format")
    )
    w.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help=_h("least severe level logged", c.ENV_LOG_LEVEL, "log_level"),
    )

    pub = sub.add_parser(
        "publish",
        help="publish messages (JSON objects of keyword arguments)",
        description="Publish messages. Give one JSON object per argument, or pipe JSON lines on stdin with '-'.",
        epilog=_TOOL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _queue_args(pub)
    pub.add_argument(
        "messages", nargs="*", metavar="JSON", help='e.g. \'{"path": "a.png"}\'; "-" reads JSON lines'
    )
    pub.add_argument("--repeat", type=_count, default=1, help="publish each message this many times [1]")
    pub.add_argument(
        "--delay", type=_seconds, default=0.0, help="hold the messages back this many seconds [0]"
    )
    pub.add_argument(
        "--key",
        help="Kafka record key of every message (its partition, and its order under ordering: key); "
        "refused on other brokers",
    )

    st = sub.add_parser(
        "stats",
        help="show a queue's depth, in-flight work, live workers and running tasks",
        description="Show queue depth, in-flight work, live workers and running tasks, once or live.",
        epilog=_TOOL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _queue_args(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--all", action="store_true", help="every queue in this Redis")
    st.add_argument(
        "--watch",
        action="store_true",
        help="a live view, refreshed in place until Ctrl-C (every queue unless --queue is given)",
    )
    st.add_argument(
        "--interval",
        type=_refresh_seconds,
        default=1.0,
        help=f"seconds between refreshes, at least {MIN_REFRESH_SECONDS:g} [1]",
    )

    dlq = sub.add_parser(
        "dlq",
        help="list or replay dead-lettered messages",
        epilog=_TOOL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _queue_args(dlq)
    dlq.add_argument("--limit", type=_count, default=20, help="entries to show [20]")
    dlq.add_argument("--replay", type=_count, metavar="N", help="move the N oldest back to the queue")
    return p


def _queue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", "-q", help=f"queue name, or namespace/name [{c.ENV_QUEUE}]")
    p.add_argument(
        "--namespace", "-n", help=f"queue namespace [{c.ENV_NAMESPACE}; default {c.DEFAULT_NAMESPACE}]"
    )
    p.add_argument(
        "--redis-url",
        help=f"Redis for queues and coordination [{c.ENV_REDIS_URL}; default {_default('redis_url')}]",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    try:
        return _tool(args)
    except _CommandError as exc:
        print(f"sluiceway {args.command}: {exc}", file=sys.stderr)
        return exc.code


def _worker(args: argparse.Namespace) -> int:
    from sluiceway.run import run_worker

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    code = run_worker(overrides)
    # Everything the worker owns is settled and closed by now, so its exit code is final, and
    # nothing may hold the pod in Terminating past it: not a thread the task function left
    # running (the interpreter would wait for it for ever), nor a client's teardown in a
    # finalizer (a Kafka handle still leaving its group blocks its destructor).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _CommandError(Exception):
    def __init__(self, code: ToolExit, message: str) -> None:
        super().__init__(message)
        self.code = code


def _tool(args: argparse.Namespace) -> int:
    import redis as redis_lib

    from sluiceway.publish import DEFAULT_REDIS_URL, resolve_queue

    url = args.redis_url or os.environ.get(c.ENV_REDIS_URL) or DEFAULT_REDIS_URL
    queue = args.queue or os.environ.get(c.ENV_QUEUE)
    all_queues = args.command == "stats" and (args.all or (args.watch and not queue))
    keys: c.Keys | None = None
    if not all_queues:
        if not queue:
            raise _CommandError(ToolExit.USAGE, f"--queue is required (or set {c.ENV_QUEUE})")
        try:
            keys = resolve_queue(queue, args.namespace)
        except ValueError as exc:
            raise _CommandError(ToolExit.USAGE, str(exc)) from None
        _check_queue(keys)
    try:
        if args.command == "publish":
            assert keys is not None
            return _publish(args, keys, url)
        client = _client(url)
        if args.command == "stats":
            return _stats(args, client, keys)
        assert keys is not None
        return _dlq(args, client, keys)
    except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
        raise _CommandError(ToolExit.UNREACHABLE, f"cannot reach Redis at {_redacted(url)}: {exc}") from None
    except redis_lib.RedisError as exc:
        raise _CommandError(
            ToolExit.FAILURE, f"Redis at {_redacted(url)} answered with an error: {exc}"
        ) from None


def _check_queue(keys: c.Keys) -> None:
    # The rules the worker applies (settings.py): a name no worker would accept is refused here,
    # or its messages would wait for ever.
    if not QUEUE_NAME.match(keys.queue):
        raise _CommandError(
            ToolExit.USAGE,
            f"queue {keys.queue!r} must be 1-200 characters of letters, digits, '.', '_' or '-'",
        )
    if not keys.namespace or "{" in keys.namespace or "}" in keys.namespace or "/" in keys.namespace:
        raise _CommandError(
            ToolExit.USAGE, f"namespace {keys.namespace!r} must be non-empty and free of braces"
        )


def _client(url: str) -> redis.Redis:
    from sluiceway import connection

    try:
        return connection.client(url)
    except ValueError as exc:
        raise _CommandError(ToolExit.USAGE, f"--redis-url {_redacted(url)!r}: {exc}") from None


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON: the worker and other languages cannot read it")


def _read_messages(raws: Sequence[str]) -> list[dict[str, Any]]:
    """Every message, validated as the codec will encode it, before anything is published.

    An error names the argument, or the line of stdin, that holds the bad message."""
    from sluiceway import codec

    if not raws and sys.stdin.isatty():
        # Without this, `sluiceway publish q` at a terminal waits silently for stdin.
        raise _CommandError(
            ToolExit.USAGE, "no messages: give JSON objects as arguments, or pipe JSON lines with '-'"
        )
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    messages: list[dict[str, Any]] = []
    for arg_no, raw in enumerate(raws or ["-"], start=1):
        lines = enumerate(sys.stdin, start=1) if raw == "-" else [(0, raw)]
        for line_no, line in lines:
            if not line.strip():
                continue
            where = f"stdin line {line_no}" if raw == "-" else f"message {arg_no}"
            try:
                obj = decoder.decode(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"a message must be a JSON object, got {line.strip()[:80]}")
                codec.encode(obj)
            except RecursionError:
                raise _CommandError(ToolExit.USAGE, f"{where}: nested too deeply") from None
            except (ValueError, TypeError) as exc:
                raise _CommandError(ToolExit.USAGE, f"{where}: {exc}") from None
            messages.append(obj)
    if not messages:
        raise _CommandError(ToolExit.USAGE, "no messages: stdin held no JSON lines")
    return messages


# Messages per batch when --repeat multiplies them: memory stays bounded whatever the count.
_PUBLISH_CHUNK = 10_000


def _publish(args: argparse.Namespace, keys: c.Keys, url: str) -> int:
    from sluiceway.publish import Publisher, check_keys
    from sluiceway.transports import registry

    messages = _read_messages(args.messages)
    from sluiceway.transports import kafka_common

    # librdkafka retries an unreachable broker every few ms and logs each try; the outcome is
    # this command's one line (exit 5 below), so its client logs stay out of the terminal.
    kafka_common.silence_client_logs()
    try:
        # Without --redis-url the broker comes from the environment, as for the SDK.
        pub = Publisher(args.redis_url) if args.redis_url else Publisher()
    except ValueError as exc:
        raise _CommandError(ToolExit.USAGE, f"--redis-url {_redacted(url)!r}: {exc}") from None
    qname = f"{keys.namespace}/{keys.queue}"
    # Redis errors go on to _tool, which tells a refused connection from an error reply.
    outages = () if pub.broker == "redis" else registry.module(pub.broker).outage_errors
    try:
        check_keys(pub.broker, pub.sink, [args.key])
    except ValueError as exc:  # a key on a broker that has none: nothing is sent
        pub.close()
        raise _CommandError(ToolExit.USAGE, f"--key: {exc}") from None
    sent = 0
    try:
        every = (m for m in messages for _ in range(args.repeat))
        while chunk := list(itertools.islice(every, _PUBLISH_CHUNK)):
            if args.delay > 0:
                for m in chunk:
                    pub.publish(qname, m, delay=args.delay, key=args.key)
            else:
                pub.publish_batch(qname, chunk, keys=None if args.key is None else [args.key] * len(chunk))
            sent += len(chunk)
    except outages as exc:
        # pika's texts may be empty or span lines.
        detail = " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(":")
        done = f" after publishing {sent}" if sent else ""
        raise _CommandError(
            ToolExit.UNREACHABLE, f"cannot reach {pub.broker} at {_redacted(pub.url)}{done}: {detail}"
        ) from None
    finally:
        pub.close()
    print(f"published {sent} message(s) to {qname}")
    return ToolExit.OK


def _dlq(args: argparse.Namespace, client: redis.Redis, keys: c.Keys) -> int:
    from sluiceway import fleet

    if args.replay is not None:
        print(
            f"replayed {fleet.replay_dead_letters(client, keys, args.replay) if args.replay else 0} message(s)"
        )
        return ToolExit.OK
    for entry in fleet.dead_letters(client, keys, args.limit) if args.limit else []:
        print(json.dumps(entry))
    return ToolExit.OK


# --- stats ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _QueueView:
    keys: c.Keys
    stats: QueueStats
    workers: list[c.Heartbeat]

    @property
    def running(self) -> int:
        return sum(int(w["busy"]) for w in self.workers)

    @property
    def rate(self) -> float:
        return sum(float(w["rate"]) for w in self.workers)


def _known_queues(client: redis.Redis) -> list[c.Keys]:
    """Every queue scope with a key in this Redis (its keys share the ``{namespace/queue}`` tag)."""
    found: set[tuple[str, str]] = set()
    for raw in client.scan_iter(match="sluiceway:{*}:*", count=1000):
        key = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        tag = key[len("sluiceway:{") :].split("}:", 1)[0]
        ns, sep, queue = tag.partition("/")
        if sep and ns and queue:
            found.add((ns, queue))
    return [c.Keys(ns, q) for ns, q in sorted(found)]


def _view(client: redis.Redis, keys: c.Keys) -> _QueueView:
    from sluiceway import fleet

    return _QueueView(keys, fleet.queue_stats(client, keys), fleet.heartbeats(client, keys))


def _stats(args: argparse.Namespace, client: redis.Redis, keys: c.Keys | None) -> int:
    def views() -> list[_QueueView]:
        return [_view(client, k) for k in ([keys] if keys is not None else _known_queues(client))]

    if args.watch:
        return _watch(
            views, args.interval, "every queue" if keys is None else f"{keys.namespace}/{keys.queue}"
        )
    shown = views()
    if args.json:
        out = [
            {
                "queue": f"{v.keys.namespace}/{v.keys.queue}",
                "stats": dataclasses.asdict(v.stats),
                "workers": v.workers,
            }
            for v in shown
        ]
        print(json.dumps(out if keys is None else {"stats": out[0]["stats"], "workers": out[0]["workers"]}))
        return ToolExit.OK
    for v in shown:
        print(f"queue {v.keys.namespace}/{v.keys.queue}")
        for name in ("ready", "delayed", "in_flight", "dead", "acked", "retried", "reaped"):
            print(f"  {name:<10} {getattr(v.stats, name)}")
        print(f"  workers    {len(v.workers)} live, running {v.running} task(s)")
        for w in v.workers:
            print(
                f"    {w['worker']}: {w['state']}, {w['busy']}/{w['concurrency']} tasks running, "
                f"{w['rate']:.1f}/s"
            )
    if not shown:
        print("no Sluiceway queues in this Redis")
    return ToolExit.OK


def _watch(views: Any, interval: float, what: str) -> int:
    import signal

    import redis as redis_lib
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console()
    # Ctrl-C is how a live view ends. A shell that started us in the background (a script, CI)
    # may have set SIGINT to "ignore", and Python then keeps it ignored: take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def render(rows: list[_QueueView], error: str) -> Table:
        table = Table(
            title=f"sluiceway stats: {what}, every {interval:g} s (Ctrl-C to quit)",
            caption=error or time.strftime("%H:%M:%S"),
            caption_justify="left",
        )
        for col in (
            "queue",
            "ready",
            "delayed",
            "in flight",
            "dead",
            "workers",
            "tasks running",
            "done/s",
            "acked",
        ):
            table.add_column(col, justify="left" if col == "queue" else "right")
        for v in rows:
            table.add_row(
                f"{v.keys.namespace}/{v.keys.queue}",
                str(v.stats.ready),
                str(v.stats.delayed),
                str(v.stats.in_flight),
                str(v.stats.dead),
                str(len(v.workers)),
                str(v.running),
                f"{v.rate:.1f}",
                str(v.stats.acked),
            )
        if not rows:
            table.add_row("(no queues yet)", *[""] * 8)
        return table

    def poll(rows: list[_QueueView]) -> tuple[list[_QueueView], str]:
        try:
            return views(), ""
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            # A live view outlasts an outage: say so, keep the last figures, try again.
            return rows, f"[red]Redis unreachable, retrying:[/] {exc}"

    rows: list[_QueueView] = []
    try:
        if not console.is_terminal:  # a pipe or a file: one table per refresh, nothing redrawn
            while True:
                rows, error = poll(rows)
                console.print(render(rows, error))
                time.sleep(interval)
        with Live(render(rows, ""), console=console, auto_refresh=False) as live:
            while True:
                rows, error = poll(rows)
                live.update(render(rows, error), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return ToolExit.OK


if __name__ == "__main__":
    sys.exit(main())
