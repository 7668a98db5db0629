"""The test kubelet: a stand-in for the container runtime, and nothing else.

Everything above the node is real: kube-apiserver stores and validates, kube-controller-manager
runs Deployments, ReplicaSets, garbage collection and the node-lifecycle controller. This module
does the node's part with local processes instead of containers:

* registers a Node and keeps it Ready by renewing its Lease in ``kube-node-lease`` (so the real
  node-lifecycle controller stays on and would taint a node whose kubelet died);
* binds pending pods (``schedulerName`` default-scheduler) to that Node, since no kube-scheduler runs;
* runs each container as a local process group, the image mapped to a command by :mod:`.images`,
  with the pod's resolved env, ``command``/``args``, ``workingDir`` and a per-pod scratch directory;
* reports status: Running, Ready once the process is up and its readiness probe (exec, httpGet or
  tcpSocket) passes; restarts by ``restartPolicy`` with a (shortened) back-off; Succeeded/Failed;
* on deletion sends SIGTERM to the process group, waits the pod's grace period, sends SIGKILL, and
  then removes the pod with grace 0 and a UID precondition, as a kubelet does;
* keeps per-container logs (current and previous instance) for :meth:`Kubelet.pod_log`.

Also honoured: liveness probes (SIGTERM, grace, SIGKILL, then the restart policy), and an emptyDir
mounted at /tmp becomes a per-pod directory exported as ``TMPDIR``.

Not emulated: isolation of any kind, images, other volumes (a pod's containers share one scratch
dir), securityContext, init and ephemeral containers, lifecycle hooks, startup probes, resource
limits, Services/DNS,
``kubectl logs``/``exec`` through the API (use :meth:`Kubelet.pod_log`). Pods share the host
network: a pod's IP is 127.0.0.1, so two replicas cannot listen on one port.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import datetime as dt
import http.client
import os
import platform
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import ImageTable, UnknownImageError
from .kubeapi import ApiError, KubeApi, Obj
from .procs import Registry, group_alive, kill_group

POD_IP = "127.0.0.1"
LEASE_SECONDS = 40
LEASE_RENEW = 10.0
# A real kubelet backs off 10s doubling to 5 min; tests want crash loops to be observable quickly.
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
LOOP_INTERVAL = 0.1


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConfigError(Exception):
    """The container cannot start yet (missing Secret, unknown image); retried, like a kubelet."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PodProcess:
    namespace: str
    pod: str
    uid: str
    container: str
    pid: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ContainerExit:
    """One finished container instance, for tests that check how a process ended."""

    namespace: str
    pod: str
    uid: str
    container: str
    pid: int
    exit_code: int
    signal: int | None
    sigterm_sent: bool
    sigkill_sent: bool
    # Seconds from SIGTERM to exit; None when no SIGTERM was sent.
    exited_after_sigterm: float | None
    grace_period: float | None


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: unknown references stay verbatim, ``$$`` escapes."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_ITEM = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Obj, path: str) -> str:
    meta = pod.get("metadata", {})
    simple: dict[str, Any] = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": pod.get("spec", {}).get("nodeName"),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName"),
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path] or "")
    m = _ITEM.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


@dataclass
class Probe:
    """One probe's schedule and counters for one container instance."""

    spec: Obj
    next_at: float
    future: concurrent.futures.Future[bool] | None = None
    successes: int = 0
    failures: int = 0

    @classmethod
    def start(cls, spec: Obj | None) -> Probe | None:
        if not spec:
            return None
        return cls(spec, time.monotonic() + float(spec.get("initialDelaySeconds", 0)))

    def step(self, now: float, submit: Callable[[Obj], concurrent.futures.Future[bool]]) -> bool | None:
        """Advance; returns the new verdict when a threshold is crossed, else None."""
        if self.future is None:
            if now >= self.next_at:
                self.future = submit(self.spec)
            return None
        if not self.future.done():
            return None
        ok = False
        with contextlib.suppress(Exception):
            ok = self.future.result()
        self.future = None
        self.next_at = now + float(self.spec.get("periodSeconds", 10))
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            return True if self.successes >= int(self.spec.get("successThreshold", 1)) else None
        self.successes, self.failures = 0, self.failures + 1
        return False if self.failures >= int(self.spec.get("failureThreshold", 3)) else None

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()
            self.future = None


@dataclass
class Container:
    name: str
    spec: Obj
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    argv: tuple[str, ...] = ()
    started_at: str | None = None
    restart_count: int = 0
    ever_started: bool = False
    done: bool = False  # terminated and not to be restarted
    state_terminated: Obj | None = None
    last_terminated: Obj | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    next_start: float = 0.0
    backoff: float = BACKOFF_START
    ready: bool = False
    readiness: Probe | None = None
    liveness: Probe | None = None
    liveness_kill_at: float | None = None  # SIGKILL deadline after a failed liveness probe
    term_sent_at: float | None = None
    grace: float | None = None  # the grace period SIGTERM came with
    kill_sent: bool = False
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    pod: Obj
    dir: Path
    containers: dict[str, Container]
    start_time: str = field(default_factory=now_rfc3339)
    terminating_since: float | None = None
    grace: float = 30.0
    gone: bool = False  # removed from the API (force-deleted or finished by us)
    finished: bool = False
    last_status: Obj | None = None
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)


class Kubelet:
    def __init__(
        self,
        api: KubeApi,
        run_dir: Path,
        registry: Registry,
        *,
        node_name: str = "localcluster-node",
        images: ImageTable | None = None,
        kube_version: str = "v0.0.0",
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.api = api
        self.run_dir = run_dir
        self.registry = registry
        self.node_name = node_name
        self.images = images or ImageTable()
        self.kube_version = kube_version
        self.log = log
        self._pods: dict[str, Obj] = {}  # uid -> latest pod object seen by the watch
        self._runs: dict[str, PodRun] = {}
        self._by_name: dict[tuple[str, str], str] = {}  # (ns, name) -> newest uid
        self._exits: list[ContainerExit] = []
        self._events: queue.Queue[tuple[str, Obj]] = queue.Queue()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._probes = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="kubelet-probe"
        )
        self._errors: list[str] = []
        self._watch_sock: socket.socket | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._register_node()
        for target, name in (
            (self._watch_loop, "kubelet-watch"),
            (self._main_loop, "kubelet"),
            (self._lease_loop, "kubelet-lease"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 3.0) -> None:
        """Stop the loops and end every pod process (SIGTERM, then SIGKILL after ``grace``)."""
        self._stop.set()
        sock = self._watch_sock
        if sock is not None:
            # Wakes the watch thread from its blocking read instead of waiting for the stream's timeout.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            containers = [c for r in self._runs.values() for c in r.containers.values() if c.proc is not None]
        for c in containers:
            if c.proc is not None and group_alive(c.proc.pid):
                kill_group(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in containers:
            assert c.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            kill_group(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=2)
            self.registry.remove(c.proc.pid)
        self._probes.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- public API for tests

    def processes(self, namespace: str | None = None) -> list[PodProcess]:
        """The container processes running now."""
        with self._lock:
            return [
                PodProcess(r.namespace, r.name, r.uid, c.name, c.proc.pid, c.argv)
                for r in self._runs.values()
                if namespace is None or r.namespace == namespace
                for c in r.containers.values()
                if c.proc is not None and c.running
            ]

    def pid(self, namespace: str, pod: str, container: str | None = None) -> int:
        for p in self.processes(namespace):
            if p.pod == pod and (container is None or p.container == container):
                return p.pid
        raise LookupError(
            f"no running process for pod {namespace}/{pod}" + (f" container {container}" if container else "")
        )

    def exits(self, namespace: str | None = None) -> list[ContainerExit]:
        with self._lock:
            return [e for e in self._exits if namespace is None or e.namespace == namespace]

    def log_path(
        self, namespace: str, pod: str, container: str | None = None, previous: bool = False
    ) -> Path:
        with self._lock:
            uid = self._by_name.get((namespace, pod))
            run = self._runs.get(uid) if uid else None
            if run is None:
                raise LookupError(f"the test kubelet never ran pod {namespace}/{pod}")
            if container is None:
                if len(run.containers) != 1:
                    raise LookupError(
                        f"pod {namespace}/{pod} has several containers; name one of {sorted(run.containers)}"
                    )
                container = next(iter(run.containers))
            c = run.containers[container]
        return c.log_path.with_suffix(".previous.log") if previous else c.log_path

    def pod_log(self, namespace: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        try:
            return self.log_path(namespace, pod, container, previous).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def errors(self) -> list[str]:
        """API errors the loops swallowed (they retry); useful when a test times out."""
        with self._lock:
            return list(self._errors)

    # ---------------------------------------------------------------- node and lease

    def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "sluiceway.dev/test-kubelet": "true",
                },
            },
            "spec": {},
        }
        try:
            self.api.create("/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
        self._node_status()
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_micro(),
            },
        }
        try:
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)
        except ApiError as exc:
            if exc.status != 409:
                raise

    def _node_status(self) -> None:
        now = now_rfc3339()
        cpus = str(os.cpu_count() or 1)
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki"
        conds = [
            ("Ready", "True", "KubeletReady", "test kubelet (local processes) is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        resources = {"cpu": cpus, "memory": mem, "pods": "110", "ephemeral-storage": "100Gi"}
        status = {
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r, m in conds
            ],
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name)),
                "bootID": str(uuid.uuid4()),
                "kernelVersion": platform.release(),
                "osImage": "local processes (sluiceway test kubelet)",
                "containerRuntimeVersion": "localprocess://0.1",
                "kubeletVersion": self.kube_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})

    def _lease_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(LEASE_RENEW):
            try:
                self.api.merge_patch(
                    f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}",
                    {"spec": {"renewTime": now_micro(), "holderIdentity": self.node_name}},
                )
                if time.monotonic() - last_status > 60:
                    self._node_status()
                    last_status = time.monotonic()
            except Exception as exc:
                self._note(f"lease renewal: {exc}")

    # ---------------------------------------------------------------- watch

    def _watch_loop(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    listing = self.api.get("/api/v1/pods")
                    seen = set()
                    for pod in listing.get("items", []):
                        seen.add(pod["metadata"]["uid"])
                        self._events.put(("MODIFIED", pod))
                    self._events.put(("RESYNC", {"uids": sorted(seen)}))
                    rv = listing["metadata"]["resourceVersion"]
                for event in self.api.watch(
                    "/api/v1/pods", rv, timeout_seconds=30, on_connect=self._set_watch_sock
                ):
                    if self._stop.is_set():
                        return
                    obj = event.get("object", {})
                    if event.get("type") == "ERROR":
                        rv = ""  # 410 Gone: the resourceVersion is too old; list again.
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if event.get("type") != "BOOKMARK":
                        self._events.put((str(event.get("type")), obj))
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._note(f"pod watch: {exc}")
                rv = ""
                self._stop.wait(0.5)

    def _set_watch_sock(self, sock: socket.socket | None) -> None:
        self._watch_sock = sock
        if self._stop.is_set() and sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ---------------------------------------------------------------- reconcile

    def _note(self, msg: str) -> None:
        with self._lock:
            self._errors.append(msg)
            del self._errors[:-50]
        self.log(f"test kubelet: {msg}")

    def _main_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_events()
                with self._lock:
                    pods = list(self._pods.values())
                for pod in pods:
                    self._reconcile_pod(pod)
                for run in [r for r in list(self._runs.values()) if r.gone and not r.finished]:
                    self._finish_gone(run)
            except Exception as exc:
                self._note(f"reconcile: {type(exc).__name__}: {exc}")
            self._stop.wait(LOOP_INTERVAL)

    def _drain_events(self) -> None:
        while True:
            try:
                kind, obj = self._events.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                if kind == "RESYNC":
                    keep = set(obj["uids"])
                    for uid in [u for u in self._pods if u not in keep]:
                        self._forget(uid)
                    continue
                uid = obj["metadata"]["uid"]
                if kind == "DELETED":
                    self._forget(uid)
                else:
                    self._pods[uid] = obj

    def _forget(self, uid: str) -> None:
        self._pods.pop(uid, None)
        run = self._runs.get(uid)
        if run is not None:
            run.gone = True

    def _reconcile_pod(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        node = spec.get("nodeName")
        if not node:
            if spec.get("schedulerName", "default-scheduler") == "default-scheduler" and not meta.get(
                "deletionTimestamp"
            ):
                self._bind(pod)
            return
        if node != self.node_name:
            return
        uid = meta["uid"]
        run = self._runs.get(uid)
        if run is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return  # finished before this kubelet started (an earlier run); nothing to run
            run = self._new_run(pod)
        if run.finished:
            return
        run.pod = pod
        if meta.get("deletionTimestamp"):
            self._terminate(run)
            return
        for c in run.containers.values():
            self._step_container(run, c)
        self._report(run)

    def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                self._note(f"binding {meta['namespace']}/{meta['name']}: {exc}")
        # The watch brings the bound pod back; don't bind it twice meanwhile.
        pod.setdefault("spec", {})["nodeName"] = self.node_name

    def _new_run(self, pod: Obj) -> PodRun:
        meta = pod["metadata"]
        d = self.run_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        (d / "work").mkdir(parents=True, exist_ok=True)
        containers = {
            c["name"]: Container(name=c["name"], spec=c, log_path=d / f"{c['name']}.log")
            for c in pod["spec"].get("containers", [])
        }
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            pod=pod,
            dir=d,
            containers=containers,
        )
        with self._lock:
            self._runs[run.uid] = run
            self._by_name[(run.namespace, run.name)] = run.uid
        return run

    # ---------------------------------------------------------------- containers

    def _restart_policy(self, run: PodRun) -> str:
        return str(run.pod["spec"].get("restartPolicy", "Always"))

    def _step_container(self, run: PodRun, c: Container) -> None:
        now = time.monotonic()
        if c.proc is not None and c.proc.poll() is not None:
            self._on_exit(run, c)
        if c.proc is None and not c.done and now >= c.next_start:
            self._start_container(run, c)
        if c.running:
            self._probe(run, c, now)

    def _start_container(self, run: PodRun, c: Container) -> None:
        try:
            entry = self.images.lookup(c.spec["image"])
            env = self._resolve_env(run.pod, c.spec, dict(entry.env))
            argv = self.images.argv(c.spec["image"], c.spec.get("command"), c.spec.get("args"))
            argv = [expand(a, env) for a in argv]
        except UnknownImageError as exc:
            c.waiting = ("ErrImagePull", str(exc))
            c.next_start = time.monotonic() + 2
            return
        except ConfigError as exc:
            c.waiting = (exc.reason, str(exc))
            c.next_start = time.monotonic() + 1
            return
        tmp = _tmp_volume(run, c)
        if tmp is not None and "TMPDIR" not in env:
            tmp.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(tmp)
        cwd = c.spec.get("workingDir") or str(run.dir / "work")
        Path(cwd).mkdir(parents=True, exist_ok=True)
        if c.log_path.exists() and c.ever_started:
            c.log_path.replace(c.log_path.with_suffix(".previous.log"))
        with c.log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                # What a runtime reports when the entrypoint does not exist.
                c.waiting = ("RunContainerError", f"failed to start {argv[0]!r}: {exc}")
                c.next_start = time.monotonic() + c.backoff
                c.backoff = min(c.backoff * 2, BACKOFF_MAX)
                return
        self.registry.add(proc.pid, f"pod {run.namespace}/{run.name}/{c.name}")
        if c.ever_started:
            c.restart_count += 1
        c.proc, c.argv, c.env, c.cwd = proc, tuple(argv), env, cwd
        c.ever_started = True
        c.started_at = now_rfc3339()
        c.waiting = None
        c.state_terminated = None
        c.ready = False
        c.readiness = Probe.start(c.spec.get("readinessProbe"))
        c.liveness = Probe.start(c.spec.get("livenessProbe"))
        c.liveness_kill_at = None
        c.term_sent_at = c.grace = None
        c.kill_sent = False

    def _on_exit(self, run: PodRun, c: Container) -> None:
        assert c.proc is not None
        rc = c.proc.returncode
        exited_at = time.monotonic()
        sig = -rc if rc < 0 else None
        code = 128 + sig if sig is not None else rc
        # Children the entrypoint left behind belong to the container too.
        kill_group(c.proc.pid, signal.SIGKILL)
        self.registry.remove(c.proc.pid)
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"localprocess://{c.proc.pid}",
        }
        if sig is not None:
            terminated["signal"] = sig
        with self._lock:
            self._exits.append(
                ContainerExit(
                    run.namespace,
                    run.name,
                    run.uid,
                    c.name,
                    c.proc.pid,
                    code,
                    sig,
                    c.term_sent_at is not None,
                    c.kill_sent,
                    exited_at - c.term_sent_at if c.term_sent_at is not None else None,
                    c.grace if c.term_sent_at is not None else None,
                )
            )
        c.proc = None
        c.ready = False
        for probe in (c.readiness, c.liveness):
            if probe is not None:
                probe.cancel()
        c.liveness_kill_at = None
        policy = self._restart_policy(run)
        restart = run.terminating_since is None and (
            policy == "Always" or (policy == "OnFailure" and code != 0)
        )
        if restart:
            c.last_terminated = terminated
            c.waiting = (
                "CrashLoopBackOff",
                f"back-off {c.backoff:.0f}s restarting failed container={c.name}",
            )
            c.next_start = time.monotonic() + c.backoff
            c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        else:
            c.state_terminated = terminated
            c.done = True

    def _resolve_env(self, pod: Obj, spec: Obj, image_env: Mapping[str, str]) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {
            # The host PATH, with the interpreter's bin dir first so .venv tools resolve.
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
            ),
            "HOSTNAME": pod["metadata"]["name"],
            "HOME": str(self.run_dir / "pods" / "home"),
        }
        for passthrough in ("LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV"):
            if passthrough in os.environ:
                env[passthrough] = os.environ[passthrough]
        env.update(image_env)
        cache: dict[tuple[str, str], Obj | None] = {}

        def source(kind: str, name: str, optional: bool) -> Obj | None:
            key = (kind, name)
            if key not in cache:
                try:
                    cache[key] = self.api.get(f"/api/v1/namespaces/{ns}/{kind}/{name}")
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    cache[key] = None
            obj = cache[key]
            if obj is None and not optional:
                singular = "secret" if kind == "secrets" else "configmap"
                raise ConfigError("CreateContainerConfigError", f'{singular} "{name}" not found')
            return obj

        def values(kind: str, obj: Obj) -> dict[str, str]:
            if kind == "secrets":
                return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return dict(obj.get("data") or {})

        for ef in spec.get("envFrom", []):
            prefix = ef.get("prefix", "")
            for kind, ref_key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                ref = ef.get(ref_key)
                if ref:
                    obj = source(kind, ref["name"], bool(ref.get("optional")))
                    if obj is not None:
                        env.update({prefix + k: v for k, v in values(kind, obj).items()})
        for e in spec.get("env", []):
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(str(e.get("value", "")), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[name] = field_value(pod, vf["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind, ref = (
                    ("secrets", vf["secretKeyRef"])
                    if "secretKeyRef" in vf
                    else ("configmaps", vf["configMapKeyRef"])
                )
                optional = bool(ref.get("optional"))
                obj = source(kind, ref["name"], optional)
                if obj is None:
                    continue
                data = values(kind, obj)
                if ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not optional:
                    raise ConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {kind[:-1]} {ns}/{ref['name']}",
                    )
            elif "resourceFieldRef" in vf:
                res = vf["resourceFieldRef"]["resource"]
                kind_, _, rname = res.partition(".")
                value = (spec.get("resources", {}).get(kind_, {}) or {}).get(rname)
                env[name] = str(value) if value is not None else str(os.cpu_count() if rname == "cpu" else 0)
        return env

    # ---------------------------------------------------------------- probes

    def _probe(self, run: PodRun, c: Container, now: float) -> None:
        assert c.proc is not None
        env, cwd, spec = c.env, c.cwd, c.spec

        def submit(probe: Obj) -> concurrent.futures.Future[bool]:
            return self._probes.submit(run_probe, probe, spec, env, cwd)

        if c.readiness is None:
            c.ready = True
        else:
            verdict = c.readiness.step(now, submit)
            if verdict is not None:
                c.ready = verdict
        if c.liveness_kill_at is not None:
            if now >= c.liveness_kill_at:
                c.kill_sent = True
                kill_group(c.proc.pid, signal.SIGKILL)
            return
        if c.liveness is not None and c.liveness.step(now, submit) is False:
            # As a kubelet does: stop the container with its grace period; the restart policy
            # then decides whether it comes back.
            grace = float(
                c.liveness.spec.get("terminationGracePeriodSeconds")
                or run.pod["spec"].get("terminationGracePeriodSeconds", 30)
            )
            self._note(f"{run.namespace}/{run.name} container {c.name} failed its liveness probe; restarting")
            kill_group(c.proc.pid, signal.SIGTERM)
            c.term_sent_at, c.grace = now, grace
            c.liveness_kill_at = now + grace

    # ---------------------------------------------------------------- deletion

    def _terminate(self, run: PodRun) -> None:
        now = time.monotonic()
        if run.terminating_since is None:
            run.terminating_since = now
            meta = run.pod["metadata"]
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = run.pod["spec"].get("terminationGracePeriodSeconds", 30)
            run.grace = float(grace)
            for c in run.containers.values():
                c.done = True
                if c.proc is not None and c.running:
                    kill_group(c.proc.pid, signal.SIGTERM)
                    c.term_sent_at, c.grace = now, run.grace
        for c in run.containers.values():
            if c.proc is not None and c.proc.poll() is not None:
                self._on_exit(run, c)
        still = [c for c in run.containers.values() if c.proc is not None]
        if still and now - run.terminating_since < run.grace:
            return
        for c in still:
            assert c.proc is not None
            c.kill_sent = True
            kill_group(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)
            self._on_exit(run, c)
        self._report(run)
        try:
            self.api.delete(
                f"/api/v1/namespaces/{run.namespace}/pods/{run.name}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": run.uid},
                },
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                self._note(f"deleting {run.namespace}/{run.name}: {exc}")
                return
        run.finished = True

    def _finish_gone(self, run: PodRun) -> None:
        """The pod vanished from the API without us (force delete, or a finished pod deleted)."""
        if run.terminating_since is None:
            run.terminating_since = time.monotonic()
            run.grace = min(run.grace, 2.0)
            for c in run.containers.values():
                c.done = True
                if c.proc is not None and c.running:
                    kill_group(c.proc.pid, signal.SIGTERM)
                    c.term_sent_at, c.grace = run.terminating_since, run.grace
        else:
            # A force delete of a pod already terminating cuts its grace short, as a kubelet does:
            # otherwise it drains for the whole grace the graceful delete gave it (the task timeout).
            run.grace = min(run.grace, 2.0)
        for c in run.containers.values():
            if c.proc is not None and c.proc.poll() is not None:
                self._on_exit(run, c)
        still = [c for c in run.containers.values() if c.proc is not None]
        if still and time.monotonic() - run.terminating_since < run.grace:
            return
        for c in still:
            assert c.proc is not None
            c.kill_sent = True
            kill_group(c.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)
            self._on_exit(run, c)
        run.finished = True

    # ---------------------------------------------------------------- status

    def _container_status(self, c: Container) -> Obj:
        st: Obj = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": "",
            "ready": c.ready and c.running,
            "started": c.running,
            "restartCount": c.restart_count,
            "lastState": {"terminated": c.last_terminated} if c.last_terminated else {},
        }
        if c.running and c.proc is not None:
            st["containerID"] = f"localprocess://{c.proc.pid}"
            st["state"] = {"running": {"startedAt": c.started_at}}
        elif c.state_terminated is not None:
            st["containerID"] = c.state_terminated["containerID"]
            st["state"] = {"terminated": c.state_terminated}
        else:
            reason, message = c.waiting or ("ContainerCreating", "")
            st["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return st

    def _phase(self, run: PodRun) -> str:
        cs = list(run.containers.values())
        if cs and all(c.done and c.proc is None for c in cs):
            codes = [c.state_terminated["exitCode"] if c.state_terminated else 0 for c in cs]
            if run.terminating_since is not None and not all(c.ever_started for c in cs):
                return "Failed"
            return "Succeeded" if all(code == 0 for code in codes) else "Failed"
        if any(c.ever_started for c in cs):
            return "Running"
        return "Pending"

    def _report(self, run: PodRun) -> None:
        statuses = [self._container_status(c) for c in run.containers.values()]
        ready = bool(statuses) and all(s["ready"] for s in statuses)
        phase = self._phase(run)
        cond_values = {
            "PodReadyToStartContainers": "True",
            "Initialized": "True",
            "ContainersReady": "True" if ready else "False",
            "Ready": "True" if ready else "False",
            "PodScheduled": "True",
        }
        now = now_rfc3339()
        conditions = []
        for ctype, value in cond_values.items():
            prev = run.transitions.get(ctype)
            if prev is None or prev[0] != value:
                run.transitions[ctype] = (value, now)
            cond: Obj = {"type": ctype, "status": value, "lastTransitionTime": run.transitions[ctype][1]}
            if value == "False" and ctype in ("Ready", "ContainersReady"):
                not_ready = [s["name"] for s in statuses if not s["ready"]]
                cond["reason"] = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
                cond["message"] = f"containers with unready status: [{' '.join(not_ready)}]"
            conditions.append(cond)
        status: Obj = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": run.start_time,
            "containerStatuses": statuses,
            "qosClass": run.pod.get("status", {}).get("qosClass", "BestEffort"),
        }
        if status == run.last_status:
            return
        try:
            self.api.merge_patch(
                f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status}
            )
            run.last_status = status
        except ApiError as exc:
            if exc.status == 404:
                run.gone = True
            else:
                self._note(f"status of {run.namespace}/{run.name}: {exc}")


def _tmp_volume(run: PodRun, c: Container) -> Path | None:
    """A per-pod directory standing in for an emptyDir mounted at /tmp (exported as TMPDIR).

    Other mounts cannot be emulated without a mount namespace, so they are ignored.
    """
    empty = {v["name"] for v in run.pod["spec"].get("volumes") or [] if "emptyDir" in v}
    for m in c.spec.get("volumeMounts") or []:
        if m.get("mountPath", "").rstrip("/") == "/tmp" and m.get("name") in empty:
            return run.dir / "volumes" / str(m["name"])
    return None


def _port(probe_port: Any, container: Obj) -> int:
    if isinstance(probe_port, int) or (isinstance(probe_port, str) and probe_port.isdigit()):
        return int(probe_port)
    for p in container.get("ports", []):
        if p.get("name") == probe_port:
            return int(p["containerPort"])
    raise ValueError(f"no container port named {probe_port!r}")


def run_probe(probe: Obj, container: Obj, env: Mapping[str, str], cwd: str) -> bool:
    """One probe attempt; True on success."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "exec" in probe:
        try:
            done = subprocess.run(
                probe["exec"]["command"],
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0
    if "httpGet" in probe:
        get = probe["httpGet"]
        host = get.get("host") or POD_IP
        port = _port(get["port"], container)
        cls = (
            http.client.HTTPSConnection
            if get.get("scheme", "HTTP").upper() == "HTTPS"
            else http.client.HTTPConnection
        )
        conn = cls(host, port, timeout=timeout)
        try:
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
            conn.request("GET", get.get("path", "/"), headers=headers)
            return 200 <= conn.getresponse().status < 400
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
    if "tcpSocket" in probe:
        sock_probe = probe["tcpSocket"]
        try:
            with socket.create_connection(
                (sock_probe.get("host") or POD_IP, _port(sock_probe["port"], container)), timeout=timeout
            ):
                return True
        except OSError:
            return False
    return True


def pod_processes(kubelet: Kubelet, namespace: str, pod_names: Sequence[str]) -> list[PodProcess]:
    wanted = set(pod_names)
    return [p for p in kubelet.processes(namespace) if p.pod in wanted]
