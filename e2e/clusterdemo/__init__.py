"""``make demo``: the whole system on a local cluster, drained live.

Brings up the local control plane (building it on the first run), a private Redis and the operator
(as its own process, with its least-privilege ServiceAccount); ``kubectl apply``s
``examples/taskqueue.yaml``; publishes a burst; shows replicas, backlog, in-flight, fleet QPS
against the limit, ETA and the last scaling reason until the queue is drained and the fleet is back
at zero; prints a summary; and tears everything down on exit, on error and on Ctrl-C.

Run it with ``PYTHONPATH=e2e python -m clusterdemo [--messages N] [--keep]``.
"""

from __future__ import annotations

import argparse
import os
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
from tests.support.redis_server import RedisServer

from localcluster.binaries import BinariesUnavailableError, ensure_binaries
from localcluster.cluster import LocalCluster
from localcluster.procs import ClusterError, sweep_stale
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
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
    start_operator,
)

EXAMPLE = ROOT / "examples" / "taskqueue.yaml"
NAMESPACE = "sluiceway-demo"
OPERATOR_NAMESPACE = "sluiceway-system"
RUNS = ROOT / ".run" / "demo"
POISON_EVERY = 250  # one message in this many is not a PNG: it is dead-lettered with its reason


class DemoError(RuntimeError):
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
    busy: int
    done: int
    dead: int
    retried: int
    qps: float
    eta: float | None
    reason: str
    message: str
    throttled: bool


@dataclass
class Run:
    messages: int
    limit: float
    ceiling: int
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
    args = p.parse_args(argv)
    console = Console(soft_wrap=not sys.stdout.isatty())
    # SIGTERM (CI cancelling, `timeout`) tears down like Ctrl-C does. SIGINT is set explicitly
    # too: a shell that starts a command in the background sets SIGINT to "ignore", and Python
    # then installs no KeyboardInterrupt handler, so Ctrl-C would be lost.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return _demo(console, args.messages, args.timeout, args.keep)
    except KeyboardInterrupt:
        console.print("\n[yellow]Interrupted.[/] Everything started has been stopped.")
        return 130
    except (DemoError, ClusterError, BinariesUnavailableError) as exc:
        console.print(f"\n[red]Demo failed:[/] {exc}")
        return 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _demo(console: Console, messages: int, timeout: float, keep: bool) -> int:
    RUNS.mkdir(parents=True, exist_ok=True)
    # Runs whose owner died (kill -9, a closed terminal) left processes: end them, drop their dirs.
    sweep_stale(RUNS, lambda m: console.print(f"[dim]{m}[/]"))
    run_dir = RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir()
    console.print(f"[bold]Sluiceway on a local Kubernetes cluster[/] (run dir {_rel(run_dir)})")
    console.print("Control-plane binaries (the first run builds them: about 5 minutes):")
    binaries = ensure_binaries(lambda m: console.print(f"  [dim]{m}[/]"))
    pids: set[int] = set()  # every process this run starts, checked at the end
    with ExitStack() as stack:
        started = time.monotonic()
        console.print("Starting etcd, kube-apiserver, kube-controller-manager and the test kubelet...")
        cluster = LocalCluster.start(
            run_dir / "cluster", binaries=binaries, log=lambda m: console.print(f"  [dim]{m}[/]")
        )
        stack.callback(_stop_cluster, console, cluster)
        pids.update(p.pid for p in cluster.processes)
        server = RedisServer()
        server.start()
        stack.callback(server.close)
        if server.proc is not None:
            pids.add(server.proc.pid)
        console.print(f"Redis at {server.url} (a private redis-server for this run)")
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
        stack.callback(op.stop)
        pids.add(op.proc.pid)
        console.print(
            f"Operator running as ServiceAccount {OPERATOR_NAMESPACE}/sluiceway-operator "
            f"(log {_rel(op.log)}); cluster ready in {time.monotonic() - started:.0f} s."
        )
        redis_secret(cluster, NAMESPACE, server.url)
        manifest = _example(run_dir)
        done = cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(manifest))
        if done.returncode != 0:
            raise DemoError(f"kubectl apply of the example failed: {done.stderr.strip()}")
        console.print(f"$ kubectl apply -n {NAMESPACE} -f {_rel(EXAMPLE)}\n  {done.stdout.strip()}")
        spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
        _wait(op, lambda: cond(get_tq(cluster, NAMESPACE, "thumbnails"), "Ready"), 60, "the TaskQueue Ready")
        _hints(console, cluster)
        client = redis.Redis.from_url(server.url)
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
        )
        Publisher(server.url).publish_batch(
            f"{NAMESPACE}/thumbnails",
            (
                {"path": f"img-{i}.{'txt' if i % POISON_EVERY == POISON_EVERY - 1 else 'png'}"}
                for i in range(messages)
            ),
        )
        console.print(
            f"Published a burst of {messages} messages ({messages // POISON_EVERY} of them not PNGs). "
            f"Limit {limit:g} QPS fleet-wide; the QPS ceiling is {run.ceiling} pods.\n"
        )
        _watch(console, cluster, op, client, run, timeout, pids)
        ok = _summary(console, client, run)
        if keep:
            console.print("\n[bold]--keep[/]: everything stays up; press Ctrl-C to stop it.")
            while op.proc.poll() is None:
                time.sleep(1)
    _check_no_strays(console, run_dir, pids)
    return 0 if ok else 1


def _example(run_dir: Path) -> Path:
    """``examples/taskqueue.yaml`` with the run-time values of the local cluster substituted."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
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
    pids: set[int],
) -> None:
    keys = Keys(NAMESPACE, "thumbnails")
    t0 = time.monotonic()
    rates: deque[tuple[float, int]] = deque(maxlen=12)
    tty = console.is_terminal
    last_line = 0.0
    with Live(console=console, refresh_per_second=4, transient=False, auto_refresh=tty) as live:
        while True:
            if op.proc.poll() is not None:
                raise DemoError(f"the operator exited ({op.proc.returncode}):\n{op.tail(20)}")
            s = _sample(cluster, client, keys, rates, time.monotonic() - t0)
            for pod_pids in cluster.pods_processes(NAMESPACE).values():
                pids.update(pod_pids)
            run.peak_qps = max(run.peak_qps, s.qps)
            if not run.history or run.history[-1] != s.replicas:
                run.history.append(s.replicas)
            finished = s.done + s.dead >= run.messages and s.backlog == 0 and s.in_flight == 0
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
) -> Sample:
    stats = fleet.queue_stats(client, keys)
    beats = fleet.heartbeats(client, keys)
    dep = get_dep(cluster, NAMESPACE, "thumbnails") or {}
    tq = get_tq(cluster, NAMESPACE, "thumbnails")
    status = tq.get("status", {})
    last = status.get("lastScale") or {}
    # Starts per second ~ settlements per second (acks, retries, dead letters), over the last ~3 s.
    rates.append((elapsed, stats.acked + stats.retried + stats.dead_total))
    while len(rates) > 2 and rates[0][0] < elapsed - 3:
        rates.popleft()
    (ta, ca), (tb, cb) = rates[0], rates[-1]
    qps = (cb - ca) / (tb - ta) if tb > ta else 0.0
    work = stats.backlog + stats.in_flight
    return Sample(
        elapsed=elapsed,
        replicas=int(dep.get("spec", {}).get("replicas", 0)),
        ready=int(dep.get("status", {}).get("readyReplicas", 0) or 0),
        backlog=stats.backlog,
        in_flight=stats.in_flight,
        live=len(beats),
        busy=sum(1 for b in beats if b["busy"]),
        done=stats.acked,
        dead=stats.dead_total,
        retried=stats.retried,
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
    for col in ("replicas (ready)", "backlog", "in flight", "workers (busy)", "fleet QPS / limit"):
        table.add_column(col, justify="right")
    table.add_column("ETA", justify="right")
    table.add_column("done / dead", justify="right")
    qps = f"{s.qps:.0f} / {run.limit:g}" + (" [yellow]throttled[/]" if s.throttled else "")
    table.add_row(
        f"{s.replicas} ({s.ready}) [dim]ceiling {run.ceiling}[/]",
        str(s.backlog),
        str(s.in_flight),
        f"{s.live} ({s.busy})",
        qps,
        _eta(s),
        f"{s.done} / {s.dead}",
    )
    return table


def _line(s: Sample, run: Run) -> str:
    return (
        f"t={s.elapsed:5.1f}s replicas={s.replicas} ready={s.ready} backlog={s.backlog} "
        f"in-flight={s.in_flight} workers={s.live} busy={s.busy} qps={s.qps:.0f}/{run.limit:g} "
        f"eta={_eta(s)} done={s.done} dead={s.dead} last-scale={s.reason}"
    )


def _eta(s: Sample) -> str:
    if s.eta is None:
        return "-"
    return "done" if s.backlog + s.in_flight == 0 else f"{s.eta:.0f} s"


def _summary(console: Console, client: redis.Redis, run: Run) -> bool:
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
        f"fleet QPS peaked at {run.peak_qps:.0f} (limit {run.limit:g}, 3-second average)."
    )
    for entry in dead:
        console.print(f"Dead letter: reason={entry['reason']}: {entry['detail']}")
    ok = stats.acked + stats.dead_total == run.messages and stats.backlog == 0 and stats.in_flight == 0
    console.print("[green]Demo OK[/]" if ok else "[red]Demo found a problem[/]")
    return ok


def _stop_cluster(console: Console, cluster: LocalCluster) -> None:
    console.print("Stopping the operator, the worker pods, the control plane and Redis...")
    cluster.stop()


def _check_no_strays(console: Console, run_dir: Path, pids: set[int]) -> None:
    """Every process of this run is gone: the ones we saw (operator, Redis, pods, components) and
    any process whose command line or working directory is inside the run directory."""
    deadline = time.monotonic() + 10
    while True:
        found = sorted({p for p in pids if _alive(p)} | set(processes_of(run_dir)))
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if found:
        raise DemoError(f"stray processes left behind: {found}")
    console.print(f"Cleaned up: none of the {len(pids)} processes of this run is left.")


def processes_of(run_dir: Path) -> list[int]:
    """Pids whose command line names ``run_dir`` or whose working directory is inside it."""
    needle = str(run_dir.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if needle in cmdline or cwd == needle or cwd.startswith(needle + os.sep):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _exists(cluster: LocalCluster, path: str) -> bool:
    try:
        cluster.get(path)
    except Exception:
        return False
    return True


def _wait(op: Operator, check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
