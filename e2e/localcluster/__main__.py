"""``python -m localcluster up|down|status``: a long-lived local cluster for the demo and for poking.

``up`` starts a supervisor process in the background that owns the control plane and the test
kubelet (pods run as its children), waits until the cluster answers, and prints the KUBECONFIG to
export. ``down`` asks the supervisor to stop everything, and kills what is left if it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .binaries import BinariesUnavailableError, _from_assets, build_dir, ensure_binaries
from .cluster import LocalCluster
from .procs import ClusterError, pid_alive, sweep_run

DEFAULT_RUN_DIR = Path(".run/cluster")


def _state(run_dir: Path) -> dict[str, object] | None:
    try:
        state: dict[str, object] = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("supervisor_pid")
    return state if isinstance(pid, int) and pid_alive(pid) else None


# Pods share the host network here, so worker pods get no metrics port (two would clash on it).
OPERATOR_ARGS = ("--worker-metrics-port", "0", "--log-format", "console")


def operator_command(kubeconfig: object) -> str:
    """The shell line that runs the operator from this checkout against the cluster (docs/local-cluster.md)."""
    return f"KUBECONFIG={kubeconfig} .venv/bin/sluiceway-operator {' '.join(OPERATOR_ARGS)}"


def export_text(state: dict[str, object], kubectl: object = "kubectl") -> str:
    return (
        f"Local cluster at {state['server']}. Use it with:\n\n"
        f"    export KUBECONFIG={state['kubeconfig']}\n\n"
        'Run the operator against it from this checkout (docs/local-cluster.md, "The operator against a cluster, from a laptop"):\n\n'
        f"    KUBECONFIG={state['kubeconfig']} {kubectl} apply --server-side -f crds/taskqueue.yaml\n"
        f"    {operator_command(state['kubeconfig'])}\n"
    )


def _print_export(state: dict[str, object]) -> None:
    # The kubectl ensure_binaries would return, without taking its build lock just to print.
    kubectl = _from_assets().get("kubectl") or build_dir() / "bin" / "kubectl"
    print(export_text(state, kubectl if kubectl.is_file() else "kubectl"))


def cmd_up(run_dir: Path, apiserver_port: int | None, timeout: float) -> int:
    run_dir = run_dir.resolve()
    state = _state(run_dir)
    if state:
        print("already running.")
        _print_export(state)
        return 0
    # A previous supervisor that died (machine reboot, kill -9) may have left components behind.
    sweep_run(run_dir, lambda m: print(m, file=sys.stderr))
    try:
        ensure_binaries()
    except BinariesUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for stale in ("state.json", "supervisor.log"):
        (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "localcluster", "serve", "--run-dir", str(run_dir)]
    if apiserver_port:
        argv += ["--apiserver-port", str(apiserver_port)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    with (run_dir / "supervisor.log").open("ab") as log:
        sup = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(run_dir)
        if state:
            _print_export(state)
            return 0
        if sup.poll() is not None:
            tail = (run_dir / "supervisor.log").read_text(errors="replace").strip().splitlines()[-15:]
            print(
                "error: the local cluster failed to start:\n" + "\n".join("    " + t for t in tail),
                file=sys.stderr,
            )
            return 1
        time.sleep(0.2)
    os.killpg(sup.pid, signal.SIGTERM)
    print(
        f"error: the local cluster did not come up within {timeout:.0f}s; see {run_dir / 'supervisor.log'}",
        file=sys.stderr,
    )
    return 1


def cmd_serve(run_dir: Path, apiserver_port: int | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    # Etcd data from an earlier run would resurrect its pods and nodes; `up` always means fresh.
    for old in ("etcd", "pods", "logs"):
        subprocess.run(["rm", "-rf", str(run_dir / old)], check=False)
    try:
        cluster = LocalCluster.start(run_dir, apiserver_port=apiserver_port)
    except (ClusterError, BinariesUnavailableError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    try:
        cluster.write_state(os.getpid())
        print(f"serving; kubeconfig {cluster.kubeconfig}", flush=True)
        stop.wait()
    finally:
        print("stopping", flush=True)
        (run_dir / "state.json").unlink(missing_ok=True)
        cluster.stop()
    return 0


def cmd_down(run_dir: Path) -> int:
    run_dir = run_dir.resolve()
    state = _state(run_dir)
    if state is None:
        sweep_run(run_dir, lambda m: print(m, file=sys.stderr))
        print("local cluster is not running.")
        return 0
    pid = int(str(state["supervisor_pid"]))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    # Anything the supervisor failed to stop is in its pid file.
    sweep_run(run_dir, lambda m: print(m, file=sys.stderr))
    print("local cluster stopped.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("up", "serve", "down", "status"):
        p = sub.add_parser(name)
        p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
        if name in ("up", "serve"):
            p.add_argument("--apiserver-port", type=int, default=None)
        if name == "up":
            p.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args(argv)
    if args.cmd == "up":
        return cmd_up(args.run_dir, args.apiserver_port, args.timeout)
    if args.cmd == "serve":
        return cmd_serve(args.run_dir.resolve(), args.apiserver_port)
    if args.cmd == "down":
        return cmd_down(args.run_dir)
    state = _state(args.run_dir.resolve())
    if state is None:
        print("local cluster is not running.")
        return 1
    _print_export(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
