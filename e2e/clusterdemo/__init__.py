"""``make demo``: the whole system on a local cluster, drained live.

Brings up the local control plane (building it on the first run), a private Redis and the operator
(as its own process, with its least-privilege ServiceAccount); ``kubectl apply``s
``examples/taskqueue.yaml``; publishes a burst; shows replicas, backlog, in-flight, fleet QPS
against the limit, ETA and the last scaling reason until the queue is drained and the fleet is back
at zero; prints a summary; and tears everything down on exit, on error and on Ctrl-C.

Run it with ``PYTHONPATH=e2e python -m clusterdemo [--messages N] [--keep] [--broker B]``.

``--broker rabbitmq`` or ``kafka`` (``make demo BROKER=...``) runs the same demo with the messages
on that broker, started the way the tests start it (``tests/support/rabbitmq_server.py``,
``tests/support/kafka_server.py``) as part of this run; Redis then only coordinates (the rate
limiter, heartbeats). The view reads what the operator reads: the broker's backlog source and the
workers' heartbeats.

Tearing down never depends on the terminal: output goes through :class:`Terminal`, which drops
what it can no longer write (``make demo | tee LOG`` loses its reader first on Ctrl-C), and every
process the run starts is recorded by pid and process group in the run directory, so the end-of-run
check and the next run's sweep find exactly this run's processes and nothing of the user's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import sys
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table

from localcluster.binaries import BinariesUnavailableError, ensure_binaries
from localcluster.cluster import LocalCluster
from localcluster.procs import (
    ClusterError,
    ManagedProcess,
    Registry,
    free_port,
    started_processes,
    survivors,
    sweep_stale,
    wait_until,
)
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from sluiceway_operator.backlog.base import BacklogSource
from sluiceway_operator.backlog.registry import source as backlog_source
from sluiceway_operator.scaling import qps_ceiling
from support import (
    ROOT,
    Operator,
    cond,
    get_dep,
    get_tq,
    install_crd,
    install_operator_rbac,
    redis_secret,
    start_bound,
    start_operator,
)

EXAMPLE = ROOT / "examples" / "taskqueue.yaml"
NAMESPACE = "sluiceway-demo"
OPERATOR_NAMESPACE = "sluiceway-system"
RUNS = ROOT / ".run" / "demo"
RUNS_ENV = "SLUICEWAY_DEMO_RUNS"  # another directory for the runs, each with its own sweep
POISON_EVERY = 250  # one message in this many is not a PNG: it is dead-lettered with its reason
BROKERS = ("redis", "rabbitmq", "kafka")
BROKER_SECRET = "sluiceway-broker"
KAFKA_PARTITIONS = 4  # more than the QPS ceiling (3 pods): the partitions do not cap this demo


class DemoError(RuntimeError):
    pass


class Terminal(io.TextIOBase):
    """The demo's stdout, which never raises: once a write fails (the reader of a pipe is gone,
    the terminal was closed), the rest of the output is dropped and the run carries on tearing down.

    The file descriptor is pointed at /dev/null then, so the interpreter's last flush at exit does
    not fail either.
    """

    def __init__(self, stream: io.TextIOBase | Any) -> None:
        self._stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lose()

    def isatty(self) -> bool:
        try:
            return not self.lost and bool(self._stream.isatty())
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return int(self._stream.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self._stream, "encoding", None) or "utf-8")

    def _lose(self) -> None:
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


@dataclass
class Sample:
    """What one refresh of the live view shows."""

    elapsed: float
    replicas: int
    ready: int
    backlog: int
    in_flight: int
    live: int
    running: int  # tasks running now, over all live workers
    done: int
    dead: int
    retried: int
    qps: float
    eta: float | None
    reason: str
    message: str
    throttled: bool


@dataclass
class Broker:
    """Where the demo's messages live."""

    type: str
    url: str  # the broker's own URL (for Redis, the coordination URL)
    spec: dict[str, Any]  # the TaskQueue's spec.broker
    publish_to: str  # the queue name Publisher.publish_batch takes


@dataclass
class Run:
    messages: int
    limit: float
    ceiling: int
    broker: str = "redis"
    processed: dict[str, tuple[int, int]] = field(default_factory=dict)  # worker -> (done, dead), heartbeats
    history: list[int] = field(default_factory=list)  # replica counts, each change once
    peak_qps: float = 0.0
    drained_at: float | None = None
    zero_at: float | None = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1500, help="size of the burst [%(default)s]")
    p.add_argument("--timeout", type=float, default=300, help="give up after this many seconds [%(default)s]")
    p.add_argument(
        "--keep", action="store_true", help="after the drain, keep everything running until Ctrl-C"
    )
    p.add_argument("--broker", choices=BROKERS, default="redis", help="where the messages go [%(default)s]")
    args = p.parse_args(argv)
    out = Terminal(sys.stdout)
    sys.stdout = out
    console = Console(file=out, soft_wrap=not out.isatty())
    # SIGTERM (CI cancelling, `timeout`) and SIGHUP (a closed terminal) tear down like Ctrl-C does.
    # SIGINT is set explicitly too: a shell that starts a command in the background sets SIGINT to
    # "ignore", and Python then installs no KeyboardInterrupt handler, so Ctrl-C would be lost.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    run_dir: Path | None = None
    try:
        run_dir = _new_run(console)
        return _demo(console, run_dir, args.messages, args.timeout, args.keep, args.broker)
    except KeyboardInterrupt:
        _answered()
        console.print("\n[yellow]Interrupted.[/]")
        if run_dir is not None:
            try:
                _check_no_strays(console, run_dir)
            except DemoError as exc:
                console.print(f"[red]{exc}[/]")
                return 1
        return 130
    except (DemoError, ClusterError, BinariesUnavailableError) as exc:
        console.print(f"\n[red]Demo failed:[/] {exc}")
        return 1


_interrupted = False
_unanswered = False  # raised, and not yet seen to start the teardown


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Only the first signal interrupts: a second Ctrl-C (or the SIGHUP that follows a closed
    # terminal) must not break off the teardown the first one started.
    global _interrupted, _unanswered
    if not _interrupted:
        _interrupted = _unanswered = True
        raise KeyboardInterrupt(f"signal {signum}")


def _answered() -> None:
    """The interrupt reached the teardown: no checkpoint raises it again."""
    global _unanswered
    _unanswered = False


def _checkpoint() -> None:
    """Raise again an interrupt that never reached the teardown. Python runs a signal handler
    wherever the main thread happens to be, and an exception it raises inside a finalizer (an
    object's __del__, run by the garbage collector) is printed and dropped. CI saw a Ctrl-C during
    the control plane's start-up lost (the demo ran to the end and exited 0); this is the one way
    we know it can be. Called between the demo's steps and in its polling loops, never from
    teardown code."""
    if _unanswered:
        raise KeyboardInterrupt("an interrupt that was lost on its way")


def _new_run(console: Console) -> Path:
    # The tests' demos run beside each other, and one's sweep would take another's ended run.
    runs = Path(os.environ.get(RUNS_ENV) or RUNS)
    runs.mkdir(parents=True, exist_ok=True)
    # Runs whose owner died (kill -9, a closed terminal) left processes: end them, drop their dirs.
    sweep_stale(runs, lambda m: console.print(f"[dim]{m}[/]"))
    run_dir = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir()
    return run_dir


def _demo(
    console: Console, run_dir: Path, messages: int, timeout: float, keep: bool, broker_type: str = "redis"
) -> int:
    # The operator and Redis; the cluster keeps its own registry in run_dir/cluster.
    registry = Registry(run_dir)
    console.print(f"[bold]Sluiceway on a local Kubernetes cluster[/] (run dir {_rel(run_dir)})")
    console.print("Control-plane binaries (the first run builds them: about 5 minutes):")
    binaries = ensure_binaries(lambda m: console.print(f"  [dim]{m}[/]"))
    with ExitStack() as stack:
        started = time.monotonic()
        # Redis first, so it is stopped last: draining workers hand their messages back to it.
        redis_url = _start_redis(run_dir, registry, stack)
        console.print(f"Redis at {redis_url} (a private redis-server for this run)")
        # The broker next, so it too is stopped after the workers have drained into it.
        broker = _start_broker(console, broker_type, run_dir, registry, stack, redis_url)
        console.print("Starting etcd, kube-apiserver, kube-controller-manager and the test kubelet...")
        cluster = LocalCluster.start(
            run_dir / "cluster", binaries=binaries, log=lambda m: console.print(f"  [dim]{m}[/]")
        )
        stack.callback(_stop_cluster, console, cluster)
        _checkpoint()
        install_crd(cluster)
        cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=True)
        cluster.kubectl("create", "namespace", NAMESPACE, check=True)
        cluster.wait_for(
            lambda: _exists(cluster, f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"),
            30,
            "the demo namespace's default ServiceAccount",
        )
        kubeconfig = install_operator_rbac(cluster, OPERATOR_NAMESPACE)
        op = start_operator(kubeconfig, OPERATOR_NAMESPACE, run_dir / "operator.log")
        registry.add(op.proc.pid, "operator")
        stack.callback(op.stop)
        console.print(
            f"Operator running as ServiceAccount {OPERATOR_NAMESPACE}/sluiceway-operator "
            f"(log {_rel(op.log)}); cluster ready in {time.monotonic() - started:.0f} s."
        )
        _checkpoint()
        redis_secret(cluster, NAMESPACE, redis_url)
        if broker.type != "redis":
            redis_secret(cluster, NAMESPACE, broker.url, name=BROKER_SECRET)
        manifest = _example(run_dir, broker)
        done = cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))
        if done.returncode != 0:
            raise DemoError(f"kubectl apply of the example failed: {done.stderr.strip()}")
        console.print(f"$ kubectl apply -n {NAMESPACE} -f {_rel(EXAMPLE)}\n  {done.stdout.strip()}")
        spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
        _wait(op, lambda: cond(get_tq(cluster, NAMESPACE, "thumbnails"), "Ready"), 60, "the TaskQueue Ready")
        _hints(console, cluster)
        client = redis.Redis.from_url(redis_url)
        stack.callback(client.close)
        limit = float(spec["rateLimit"]["qps"])
        run = Run(
            messages,
            limit,
            qps_ceiling(
                limit,
                latency=float(spec["scaling"]["assumedTaskSeconds"]),
                per_pod=int(spec["concurrency"]["perPod"]),
                headroom=float(spec["scaling"].get("qpsHeadroom", 0.1)),
            )
            or 1,
            broker=broker.type,
        )
        src = None
        if broker.type != "redis":
            src = backlog_source(
                broker.type,
                namespace=NAMESPACE,
                queue="thumbnails",
                coordination=client,
                broker_url=broker.url,
                **broker.spec.get("kafka", {}),
            )
            stack.callback(src.close)
        # The replicas before the burst: the operator may wake the fleet before the first
        # sample of the view (a slow publish, a fast poll), and the history must show the wake.
        run.history.append(
            int((get_dep(cluster, NAMESPACE, "thumbnails") or {}).get("spec", {}).get("replicas", 0))
        )
        pub = Publisher(broker.url)
        stack.callback(pub.close)
        pub.publish_batch(
            broker.publish_to,
            (
                {"path": f"img-{i}.{'txt' if i % POISON_EVERY == POISON_EVERY - 1 else 'png'}"}
                for i in range(messages)
            ),
        )
        console.print(
            f"Published a burst of {messages} messages ({messages // POISON_EVERY} of them not PNGs). "
            f"Limit {limit:g} QPS fleet-wide; the QPS ceiling is {run.ceiling} pods.\n"
        )
        _watch(console, cluster, op, client, run, timeout, src)
        ok = _summary(console, client, run, src)
        if keep:
            console.print(
                "\n[bold]--keep[/]: the cluster, Redis and the operator stay up to explore; "
                "press Ctrl-C to stop them.\n"
                f"  export KUBECONFIG={cluster.kubeconfig}\n"
                f"  export SLUICEWAY_REDIS_URL={redis_url}\n"
                f"  {cluster.kubectl_path} get tq,deploy,pods -n {NAMESPACE}\n"
                + (
                    f'  sluiceway publish -q {NAMESPACE}/thumbnails --repeat 500 \'{{"path": "a.png"}}\'\n'
                    f"  sluiceway stats -q {NAMESPACE}/thumbnails --watch"
                    if broker.type == "redis"
                    else f"  {broker.type} at {broker.url}: publish with "
                    f'sluiceway.Publisher({broker.url!r}).publish({broker.publish_to!r}, {{"path": "a.png"}})'
                )
            )
            while op.proc.poll() is None:
                time.sleep(1)
            raise DemoError(f"the operator exited ({op.proc.returncode}):\n{op.tail(20)}")
    _check_no_strays(console, run_dir)
    return 0 if ok else 1


def _start_redis(run_dir: Path, registry: Registry, stack: ExitStack) -> str:
    """A private redis-server in its own process group, so a Ctrl-C in the terminal reaches only
    the demo, which stops Redis after the workers have drained into it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise DemoError("redis-server is not installed: run `make system-deps` (Debian package redis-server)")
    port = free_port()
    data = run_dir / "redis"
    data.mkdir()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    proc = ManagedProcess("redis-server", argv, run_dir / "redis.log", registry)
    stack.callback(proc.stop)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        wait_until(lambda: bool(client.ping()), 15, f"redis-server on port {port}", watch=[proc])
    finally:
        client.close()
    return url


def _start_broker(
    console: Console, kind: str, run_dir: Path, registry: Registry, stack: ExitStack, redis_url: str
) -> Broker:
    """The demo's broker: the coordination Redis itself, or a private RabbitMQ node or Kafka
    broker started by the tests' own scripts, its processes recorded for the sweep."""
    if kind == "redis":
        return Broker("redis", redis_url, {"type": "redis"}, f"{NAMESPACE}/thumbnails")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    secret = {"name": BROKER_SECRET, "key": "url"}
    if kind == "rabbitmq":
        from tests.support.rabbitmq_server import RabbitMQServer

        console.print("Starting a private RabbitMQ node (tests/support/rabbitmq_server.py)...")
        rabbit = RabbitMQServer(run_dir / "rabbitmq")
        stack.callback(rabbit.close)
        try:
            rabbit.start()
        finally:
            for p, name in ((rabbit.epmd, "epmd"), (rabbit.proc, "rabbitmq-server")):
                if p is not None:
                    registry.add(p.pid, name)
        console.print(f"RabbitMQ at {rabbit.url} (started in {rabbit.start_seconds:.0f} s)")
        return Broker(
            "rabbitmq",
            rabbit.url,
            {"type": "rabbitmq", "urlSecretRef": secret, "queue": "thumbnails"},
            "thumbnails",
        )
    from tests.support.kafka_server import KafkaServer

    console.print(
        "Starting a private Kafka broker (tests/support/kafka_server.py; the first run fetches it)..."
    )
    kafka = KafkaServer()
    stack.callback(kafka.close)
    try:
        kafka.start()
    finally:
        if kafka.proc is not None:
            registry.add(kafka.proc.pid, "kafka")
    console.print(f"Kafka at {kafka.url}")
    return Broker(
        "kafka",
        kafka.url,
        {"type": "kafka", "urlSecretRef": secret, "kafka": {"partitions": KAFKA_PARTITIONS}},
        f"{NAMESPACE}/thumbnails",
    )


def _example(run_dir: Path, broker: Broker) -> Path:
    """``examples/taskqueue.yaml`` with the run-time values of the local cluster substituted."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["broker"] = broker.spec
    for env in doc["spec"]["podTemplate"]["env"]:
        if env["name"] == "PYTHONPATH":
            env["value"] = str(ROOT / "examples")
    out = run_dir / "taskqueue.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _hints(console: Console, cluster: LocalCluster) -> None:
    kubectl = cluster.kubectl_path
    console.print(
        "\n[bold]Try meanwhile[/] in another terminal:\n"
        f"  export KUBECONFIG={cluster.kubeconfig}\n"
        f"  alias kubectl={kubectl}\n"
        f"  kubectl get tq -n {NAMESPACE} -w\n"
        f"  kubectl get tq -n {NAMESPACE} -o wide\n"
        f"  kubectl describe tq thumbnails -n {NAMESPACE}\n"
        f"  kubectl get pods -n {NAMESPACE} -w\n"
        f"  kubectl get events -n {NAMESPACE} --field-selector involvedObject.kind=TaskQueue\n"
    )


def _watch(
    console: Console,
    cluster: LocalCluster,
    op: Operator,
    client: redis.Redis,
    run: Run,
    timeout: float,
    src: BacklogSource | None = None,
) -> None:
    keys = Keys(NAMESPACE, "thumbnails")
    t0 = time.monotonic()
    rates: deque[tuple[float, int]] = deque(maxlen=12)
    tty = console.is_terminal
    last_line = 0.0
    with Live(console=console, refresh_per_second=4, transient=False, auto_refresh=tty) as live:
        while True:
            _checkpoint()
            if op.proc.poll() is not None:
                raise DemoError(f"the operator exited ({op.proc.returncode}):\n{op.tail(20)}")
            s = _sample(cluster, client, keys, rates, time.monotonic() - t0, run, src)
            run.peak_qps = max(run.peak_qps, s.qps)
            if not run.history or run.history[-1] != s.replicas:
                run.history.append(s.replicas)
            finished = s.done + s.dead >= run.messages and s.backlog == 0 and s.in_flight == 0
            if src is not None:
                # Heartbeat counts lag the last completions by up to a beat (and a worker's last
                # ones may never be beaten): once no pod is left, the broker's empty queue decides.
                finished = (
                    s.backlog == 0
                    and s.in_flight == 0
                    and (s.done + s.dead >= run.messages or (s.replicas == 0 and s.live == 0))
                )
            if finished and run.drained_at is None:
                run.drained_at = s.elapsed
            if tty:
                live.update(_view(s, run))
            elif s.elapsed - last_line >= 1.0:
                last_line = s.elapsed
                console.print(_line(s, run), highlight=False, soft_wrap=True)
            if finished and s.replicas == 0 and s.live == 0:
                run.zero_at = s.elapsed
                if tty:
                    live.update(_view(s, run))
                return
            if s.elapsed > timeout:
                raise DemoError(f"not drained and at zero after {timeout:.0f} s (last: {_line(s, run)})")
            time.sleep(0.25)


def _sample(
    cluster: LocalCluster,
    client: redis.Redis,
    keys: Keys,
    rates: deque[tuple[float, int]],
    elapsed: float,
    run: Run | None = None,
    src: BacklogSource | None = None,
) -> Sample:
    beats = fleet.heartbeats(client, keys)
    if src is None:
        stats = fleet.queue_stats(client, keys)
        backlog, in_flight, acked, retried, dead = (
            stats.backlog,
            stats.in_flight,
            stats.acked,
            stats.retried,
            stats.dead_total,
        )
    else:
        assert run is not None
        b = src.backlog()
        for h in beats:  # counts since each worker started; a worker's are kept after it exits
            run.processed[str(h["worker"])] = (int(h["processed"]), int(h["dead_lettered"]))
        backlog, dead, retried = b.ready + b.delayed, b.dead, 0
        in_flight = sum(int(h["in_flight"]) for h in beats)
        acked = sum(done for done, _ in run.processed.values())
    dep = get_dep(cluster, NAMESPACE, "thumbnails") or {}
    tq = get_tq(cluster, NAMESPACE, "thumbnails")
    status = tq.get("status", {})
    last = status.get("lastScale") or {}
    # Throughput: settlements (acks, retries, dead letters) per second over the last ~3 s. It
    # follows the starts a task duration later, and the two counter reads that bound each
    # interval are taken a poll apart, so it can read a little over the limit while no 1-second
    # window holds more starts than the bound of docs/worker.md allows.
    rates.append((elapsed, acked + retried + dead))
    while len(rates) > 2 and rates[0][0] < elapsed - 3:
        rates.popleft()
    (ta, ca), (tb, cb) = rates[0], rates[-1]
    qps = (cb - ca) / (tb - ta) if tb > ta else 0.0
    work = backlog + in_flight
    return Sample(
        elapsed=elapsed,
        replicas=int(dep.get("spec", {}).get("replicas", 0)),
        ready=int(dep.get("status", {}).get("readyReplicas", 0) or 0),
        backlog=backlog,
        in_flight=in_flight,
        live=len(beats),
        running=sum(int(h["busy"]) for h in beats),
        done=acked,
        dead=dead,
        retried=retried,
        qps=qps,
        eta=work / qps if qps > 0 else (0.0 if work == 0 else None),
        reason=str(last.get("reason", "-")),
        message=str(last.get("message", "")),
        throttled=cond(tq, "Throttled").get("status") == "True",
    )


def _view(s: Sample, run: Run) -> Table:
    table = Table(
        title=f"TaskQueue {NAMESPACE}/thumbnails, {s.elapsed:.0f} s since the burst",
        caption=f"last scaling: [bold]{s.reason}[/] {s.message}",
        caption_justify="left",
        min_width=90,
    )
    for col in ("replicas (ready)", "backlog", "in flight", "workers (tasks)", "settled/s / QPS limit"):
        table.add_column(col, justify="right")
    table.add_column("ETA", justify="right")
    table.add_column("done / dead", justify="right")
    qps = f"{s.qps:.0f} / {run.limit:g}" + (" [yellow]throttled[/]" if s.throttled else "")
    table.add_row(
        f"{s.replicas} ({s.ready}) [dim]ceiling {run.ceiling}[/]",
        str(s.backlog),
        str(s.in_flight),
        f"{s.live} ({s.running} tasks)",
        qps,
        _eta(s),
        f"{s.done} / {s.dead}",
    )
    return table


def _line(s: Sample, run: Run) -> str:
    return (
        f"t={s.elapsed:5.1f}s replicas={s.replicas} ready={s.ready} backlog={s.backlog} "
        f"in-flight={s.in_flight} workers={s.live} tasks={s.running} settled/s={s.qps:.0f}/{run.limit:g} "
        f"eta={_eta(s)} done={s.done} dead={s.dead} last-scale={s.reason}"
    )


def _eta(s: Sample) -> str:
    if s.eta is None:
        return "-"
    return "done" if s.backlog + s.in_flight == 0 else f"{s.eta:.0f} s"


def _summary(console: Console, client: redis.Redis, run: Run, src: BacklogSource | None = None) -> bool:
    if src is not None:
        return _broker_summary(console, run, src)
    keys = Keys(NAMESPACE, "thumbnails")
    stats = fleet.queue_stats(client, keys)
    dead = fleet.dead_letters(client, keys, 5)
    steps = " -> ".join(str(n) for n in run.history)
    console.print(
        f"\n[bold]Drained[/] {run.messages} messages in {run.drained_at or 0:.1f} s: {stats.acked} done, "
        f"{stats.retried} retries, {stats.dead_total} dead-lettered; the fleet was back at zero after "
        f"{run.zero_at or 0:.1f} s."
    )
    console.print(
        f"Replicas: {steps} (peak {max(run.history, default=0)}, QPS ceiling {run.ceiling}); "
        f"throughput peaked at {run.peak_qps:.0f} settled/s over 3 s (limit {run.limit:g} QPS: "
        f"no 1-second window may hold more than {start_bound(run.limit)} starts, "
        "docs/worker.md#guarantees)."
    )
    for entry in dead:
        console.print(f"Dead letter: reason={entry['reason']}: {entry['detail']}")
    ok = stats.acked + stats.dead_total == run.messages and stats.backlog == 0 and stats.in_flight == 0
    console.print("[green]Demo OK[/]" if ok else "[red]Demo found a problem[/]")
    return ok


def _broker_summary(console: Console, run: Run, src: BacklogSource) -> bool:
    """On RabbitMQ or Kafka the broker keeps no completion counter: the run is OK when its
    queue is empty, nothing is in flight, and exactly the poison messages were dead-lettered."""
    b = src.backlog()
    done = sum(d for d, _ in run.processed.values())
    poison = run.messages // POISON_EVERY
    steps = " -> ".join(str(n) for n in run.history)
    console.print(
        f"\n[bold]Drained[/] {run.messages} messages on {run.broker} in {run.drained_at or 0:.1f} s: "
        f"{b.ready + b.delayed} left in the queue, {b.dead} dead-lettered, at least {done} done (the "
        f"workers' heartbeats); the fleet was back at zero after {run.zero_at or 0:.1f} s."
    )
    console.print(
        f"Replicas: {steps} (peak {max(run.history, default=0)}, QPS ceiling {run.ceiling}); "
        f"throughput peaked at {run.peak_qps:.0f} settled/s over 3 s (limit {run.limit:g} QPS: "
        f"no 1-second window may hold more than {start_bound(run.limit)} starts, "
        "docs/worker.md#guarantees)."
    )
    ok = b.ready + b.delayed == 0 and b.dead == poison
    console.print(
        "[green]Demo OK[/]" if ok else f"[red]Demo found a problem[/] (expected {poison} dead letters)"
    )
    return ok


def _stop_cluster(console: Console, cluster: LocalCluster) -> None:
    console.print("Stopping the operator, the worker pods, the control plane and Redis...")
    cluster.stop()


def _check_no_strays(console: Console, run_dir: Path) -> None:
    """None of the processes this run started is left, nor anything in their process groups.

    Identity comes from the run's ledgers (pid, process group, start time), never from command
    lines: a user's `tail -F` of the operator log names the run directory too, and is not ours.
    """
    started = started_processes(run_dir)
    deadline = time.monotonic() + 10
    while (found := survivors(started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if found:
        raise DemoError(f"stray processes left behind: {found}")
    console.print(f"Cleaned up: none of the {len(started)} processes of this run is left.")


def _exists(cluster: LocalCluster, path: str) -> bool:
    try:
        cluster.get(path)
    except Exception:
        return False
    return True


def _wait(op: Operator, check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _checkpoint()
        try:
            if check():
                return
        except Exception:  # a transient API error is just another poll
            pass
        if op.proc.poll() is not None:
            raise DemoError(f"the operator exited ({op.proc.returncode}):\n{op.tail(20)}")
        time.sleep(0.3)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}\n{op.tail(20)}")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
