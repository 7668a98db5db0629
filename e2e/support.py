"""Helpers shared by the end-to-end tests and the cluster demo: no pytest in here.

Install the CRD and the operator's RBAC, start the operator as its own process with its
ServiceAccount's kubeconfig, build TaskQueue manifests, read state, sample the replica count, and
compute the figures every scenario reports (messages, duplicates, peak replicas, worst 1-s window,
time to drain, time to zero).
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from tests.support.starts import start_bound, worst_window

from localcluster.cluster import LocalCluster
from localcluster.procs import free_port
from sluiceway.publish import Publisher
from sluiceway.ratelimit import max_in_window
from sluiceway_operator.manifests import deployment_name, operator_rbac

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "taskqueue.yaml"
TQ_PATH = "/apis/sluiceway.dev/v1alpha1/namespaces/{ns}/taskqueues/{name}"
OPERATOR_SA = "sluiceway-operator"


class WaitTimeoutError(AssertionError):
    """A condition did not hold in time; the message carries the operator's log tail."""


class Operator:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, namespace: str, http_port: int) -> None:
        self.proc, self.log, self.namespace, self.http_port = proc, log, namespace, http_port

    def tail(self, n: int = 80) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def install_crd(c: LocalCluster) -> None:
    c.kubectl("apply", "--server-side", "-f", str(CRD), check=True)
    c.wait_established("taskqueues.sluiceway.dev")


def install_operator_rbac(c: LocalCluster, namespace: str) -> Path:
    """Apply the shipped RBAC for a ServiceAccount in ``namespace``; return its kubeconfig."""
    c.apply(operator_rbac(namespace))
    return c.serviceaccount_kubeconfig(namespace, OPERATOR_SA)


@contextlib.contextmanager
def module_operator(c: LocalCluster, log_dir: Path, *extra_args: str) -> Iterator[Operator]:
    """The operator an e2e module shares: the CRD, the shipped least-privilege RBAC in a namespace
    of its own, and the operator as its own process with ``extra_args``; stopped on exit."""
    install_crd(c)
    namespace = c.fresh_namespace("op")
    kubeconfig = install_operator_rbac(c, namespace)
    op = start_operator(kubeconfig, namespace, log_dir / "operator.log", extra_args=extra_args)
    try:
        yield op
    finally:
        op.stop()


def start_operator(
    kubeconfig: Path,
    namespace: str,
    log: Path,
    *,
    extra_args: Sequence[str] = (),
    http_port: int | None = None,
) -> Operator:
    """``python -m sluiceway_operator`` as its own process, acting as the ServiceAccount of ``kubeconfig``.

    The log is appended to, so a restarted operator keeps one log. Worker pods get no metrics port
    (the test kubelet runs every pod on the host network).
    """
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    port = http_port or free_port()
    args = ["-A", "--worker-metrics-port", "0", "--http-port", str(port), "--log-format", "console"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluiceway_operator", *args, *extra_args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the owner, which stops it
        )
    return Operator(proc, log, namespace, port)


def url_secret(c: LocalCluster, namespace: str, url: str, name: str) -> dict[str, str]:
    """A Secret holding ``url`` under the key ``url``; returns the reference a TaskQueue's
    ``urlSecretRef`` fields take."""
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"url": base64.b64encode(url.encode()).decode()},
        }
    )
    return {"name": name, "key": "url"}


def redis_secret(c: LocalCluster, namespace: str, url: str, name: str = "sluiceway-redis") -> None:
    """The coordination Secret users create in each namespace (see docs/operator.md)."""
    url_secret(c, namespace, url, name)


def kafka_broker(c: LocalCluster, namespace: str, url: str, **kafka: Any) -> dict[str, Any]:
    """``spec.broker`` for Kafka at ``url``, its Secret created (``kafka``); ``kafka`` is
    ``spec.broker.kafka`` (partitions, ordering)."""
    return {"type": "kafka", "urlSecretRef": url_secret(c, namespace, url, "kafka"), "kafka": kafka}


def until(op: Operator, check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until truthy; on timeout fail with the operator's log, so failures explain."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # a transient API error is just another poll
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if op.proc.poll() is not None:
            raise WaitTimeoutError(f"operator exited ({op.proc.returncode}) waiting for {what}\n{op.tail()}")
        time.sleep(0.3)
    raise WaitTimeoutError(
        f"timed out after {timeout} s waiting for {what} (last: {last!r})\n--- operator log ---\n{op.tail()}"
    )


def taskqueue(name: str, redis_url: str, **spec: Any) -> dict[str, Any]:
    """A TaskQueue running ``tests.tasks:record`` with short test intervals; ``spec`` merges one level deep."""
    body: dict[str, Any] = {
        "image": "sluiceway/worker:test",
        "function": "tests.tasks:record",
        "broker": {"type": "redis"},
        "concurrency": {"perPod": 2},
        "liveness": {"heartbeatSeconds": 0.5, "leaseSeconds": 60},
        "timeoutSeconds": 5,
        "scaling": {
            "pollIntervalSeconds": 1,
            "cooldownSeconds": 3,
            "scaleDownStabilizationSeconds": 2,
            "targetDrainSeconds": 10,
            "assumedTaskSeconds": 0.5,
            "maxReplicas": 5,
        },
        "podTemplate": {
            "env": [
                {"name": "PYTHONPATH", "value": str(ROOT)},
                {"name": "TEST_RECORD_URL", "value": redis_url},
            ]
        },
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {
        "apiVersion": "sluiceway.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": body,
    }


def get_tq(c: LocalCluster, ns: str, name: str) -> dict[str, Any]:
    return c.get(TQ_PATH.format(ns=ns, name=name))


def get_dep(c: LocalCluster, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return c.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{deployment_name(name)}")
    except Exception:
        return None


def replicas(c: LocalCluster, ns: str, name: str) -> int | None:
    dep = get_dep(c, ns, name)
    return None if dep is None else int(dep["spec"].get("replicas", 0))


def cond(tq: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in tq.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return {}


class MaxReplicas:
    """Samples the Deployment's spec.replicas in the background and remembers every value seen."""

    def __init__(self, c: LocalCluster, ns: str, name: str) -> None:
        self.seen: list[int] = []
        self.changed_at: list[float] = []  # monotonic time of each entry in ``seen``
        self._target = (c, ns, name)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        dep = get_dep(*self._target)
        if dep is not None:
            value = int(dep["spec"].get("replicas", 0))
            if not self.seen or self.seen[-1] != value:
                self.seen.append(value)
                self.changed_at.append(time.monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.1)

    def stop(self) -> list[int]:
        self._stop.set()
        self._t.join(5)
        # The caller usually stops right after seeing a final value itself; the thread may have
        # slept through it, so take one last sample.
        self._sample()
        return self.seen


@dataclass
class Figures:
    """What each scenario reports and asserts."""

    scenario: str
    messages: int
    processed: int  # distinct messages completed
    lost: int  # published, never completed
    duplicates: int  # extra starts beyond one per message (retries and redeliveries)
    peak_replicas: int
    ceiling: int | None
    worst_window: int  # most task starts in a 1-second window, allowing their record lag
    limit: float | None  # start_bound: the bound docs/worker.md promises
    drain_seconds: float
    zero_seconds: float | None  # from the publish to the fleet back at 0
    dead: int = 0
    worst_window_recorded: int = 0  # the same, counted on the tasks' own timestamps as they are

    def line(self) -> str:
        ceiling = f"/{self.ceiling} ceiling" if self.ceiling is not None else ""
        limit = f" (bound {self.limit:g})" if self.limit is not None else ""
        zero = f"{self.zero_seconds:.1f} s" if self.zero_seconds is not None else "-"
        return (
            f"[e2e figures] {self.scenario}: messages={self.messages} processed={self.processed} "
            f"lost={self.lost} duplicates={self.duplicates} dead-lettered={self.dead} "
            f"peak replicas={self.peak_replicas}{ceiling} worst 1-s window={self.worst_window} starts{limit} "
            f"(recorded {self.worst_window_recorded}) "
            f"drain={self.drain_seconds:.1f} s to-zero={zero}"
        )


def recorded(r: redis.Redis, messages: int) -> tuple[list[float], dict[int, int], dict[int, int]]:
    """What ``tests.tasks.record`` wrote: start times, starts per message, completions per message."""
    starts = [float(x) for x in r.lrange("test:starts", 0, -1)]
    seen = {int(k): int(v) for k, v in r.hgetall("test:seen").items()}
    done = {int(k): int(v) for k, v in r.hgetall("test:done").items()}
    return starts, seen, done


def figures(
    scenario: str,
    r: redis.Redis,
    messages: int,
    *,
    seen_replicas: Sequence[int],
    ceiling: int | None,
    limit: float | None,
    drain_seconds: float,
    zero_seconds: float | None,
    dead: int = 0,
) -> Figures:
    starts, seen, done = recorded(r, messages)
    completed = {n for n, k in done.items() if k > 0}
    return Figures(
        scenario=scenario,
        messages=messages,
        processed=len(completed),
        lost=messages - dead - len(completed & set(range(messages))),
        duplicates=sum(seen.values()) - len(seen),
        peak_replicas=max(seen_replicas, default=0),
        ceiling=ceiling,
        worst_window=worst_window(starts) if starts else 0,
        worst_window_recorded=max_in_window(starts, 1.0) if starts else 0,
        limit=limit,
        drain_seconds=drain_seconds,
        zero_seconds=zero_seconds,
        dead=dead,
    )


def burst_taskqueue(
    name: str,
    redis_url: str,
    *,
    qps: float,
    per_pod: int,
    task_seconds: float,
    max_replicas: int,
    drain_seconds: float,
    scaling: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A rate-limited TaskQueue that starts at zero, for a burst of ``task_seconds`` tasks.

    ``assumedTaskSeconds`` is the tasks' real length unless ``scaling`` says otherwise, so the
    wake-up is sized as the scenario computes it; ``spec`` and ``scaling`` merge as in ``taskqueue``.
    """
    return taskqueue(
        name,
        redis_url,
        rateLimit={"qps": qps},
        concurrency={"perPod": per_pod},
        timeoutSeconds=10,
        scaling={
            "minReplicas": 0,
            "maxReplicas": max_replicas,
            "assumedTaskSeconds": task_seconds,
            "targetDrainSeconds": drain_seconds,
            **(scaling or {}),
        },
        **spec,
    )


def record_payloads(count: int, sleep: float, first: int = 0) -> Iterator[dict[str, Any]]:
    """Messages for ``tests.tasks:record``, numbered from ``first``, each sleeping ``sleep`` seconds."""
    return ({"n": i, "sleep": sleep} for i in range(first, first + count))


class Burst:
    """One burst scenario: wait for the fleet at zero, publish, then time the drain and the way back.

    The replica count is sampled from before the publish, so ``seen`` starts with the 0.
    """

    def __init__(self, c: LocalCluster, op: Operator, ns: str, name: str) -> None:
        self.c, self.op, self.ns, self.name = c, op, ns, name
        self.sampler: MaxReplicas | None = None
        self.t0 = 0.0
        self.drained = 0.0
        self.at_zero: float | None = None
        self.seen: list[int] = []

    def replicas(self) -> int | None:
        return replicas(self.c, self.ns, self.name)

    def publish(self, url: str, queue: str, payloads: Iterable[dict[str, Any]]) -> None:
        until(self.op, lambda: self.replicas() == 0, 60, "the worker Deployment at 0")
        self.sampler = MaxReplicas(self.c, self.ns, self.name)
        self.t0 = time.monotonic()
        pub = Publisher(url)
        try:
            pub.publish_batch(queue, payloads)
        finally:
            pub.close()

    def last_scale(self, timeout: float = 30) -> dict[str, Any]:
        """``status.lastScale`` once written: the operator scales the Deployment first and writes
        the status after, so a test that saw the new replica count may still read the old status."""
        return dict(
            until(
                self.op,
                lambda: get_tq(self.c, self.ns, self.name).get("status", {}).get("lastScale"),
                timeout,
                "status.lastScale",
            )
        )

    def seen_so_far(self) -> list[int]:
        assert self.sampler is not None, "publish first"
        return list(self.sampler.seen)

    def drain(self, r: redis.Redis, messages: int, *, done_within: float, zero_within: float) -> list[int]:
        """Wait for every message done, then for the fleet back at zero; return the replicas seen."""
        assert self.sampler is not None, "publish first"
        until(self.op, lambda: r.hlen("test:done") >= messages, done_within, "every message done")
        self.drained = time.monotonic() - self.t0
        until(self.op, lambda: self.replicas() == 0, zero_within, "the fleet back at zero")
        self.at_zero = time.monotonic() - self.t0
        self.seen = self.sampler.stop()
        return self.seen

    def figures(
        self,
        scenario: str,
        r: redis.Redis,
        messages: int,
        *,
        ceiling: int | None,
        limit: float | None,
        dead: int = 0,
    ) -> Figures:
        return figures(
            scenario,
            r,
            messages,
            seen_replicas=self.seen,
            ceiling=ceiling,
            limit=limit,
            drain_seconds=self.drained,
            zero_seconds=self.at_zero,
            dead=dead,
        )


def ticks(op: Operator) -> int:
    """Ticks the operator has run, from its own histogram (every TaskQueue's loop counts)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{op.http_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("sluiceway_operator_decision_seconds_count"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def wait_ticks(op: Operator, c: LocalCluster, n: int, timeout: float, what: str) -> None:
    """Wait until every TaskQueue's loop has ticked about ``n`` more times: a bounded observation for a
    check that something does *not* happen, measured in the operator's own decisions, not in seconds.

    The tick count is shared by all loops, so this waits for ``n`` ticks per TaskQueue in the
    cluster: exactly ``n`` each when they share one poll interval (``taskqueue``'s 1 s), and more
    for the slower loop otherwise.
    """
    loops = max(1, len(c.get("/apis/sluiceway.dev/v1alpha1/taskqueues")["items"]))
    seen = ticks(op)
    until(op, lambda: ticks(op) >= seen + n * loops, timeout, f"{n} operator ticks ({what})")


__all__ = [
    "CRD",
    "OPERATOR_SA",
    "ROOT",
    "TQ_PATH",
    "Burst",
    "Figures",
    "MaxReplicas",
    "Operator",
    "WaitTimeoutError",
    "burst_taskqueue",
    "cond",
    "figures",
    "get_dep",
    "get_tq",
    "install_crd",
    "install_operator_rbac",
    "kafka_broker",
    "record_payloads",
    "recorded",
    "redis_secret",
    "replicas",
    "start_bound",
    "start_operator",
    "taskqueue",
    "ticks",
    "until",
    "url_secret",
    "wait_ticks",
]


def retire_namespace(c: LocalCluster, namespace: str, timeout: float = 60) -> None:
    """Stop everything a test left running in its namespace, and wait until its processes are gone.

    Tests share one Redis (flushed per test) and record into the same keys; a worker pod still
    draining from the previous test would otherwise hand messages back and record starts into the
    next test's counters.
    """
    c.kubectl("delete", "taskqueues", "--all", "-n", namespace, "--wait=false")
    c.kubectl("delete", "deployments", "--all", "-n", namespace, "--wait=false")
    deadline = time.monotonic() + timeout
    force_deleted_at = -math.inf
    while time.monotonic() < deadline:
        if not any(c.pods_processes(namespace).values()):
            return
        # Again while processes remain: until the garbage collector has removed the ReplicaSet, it
        # can create a pod after the first force delete, and that pod would then drain its tasks
        # for its whole grace period (the task's timeout).
        if time.monotonic() - force_deleted_at >= 2.0:
            c.kubectl(
                "delete", "pods", "--all", "-n", namespace, "--grace-period=0", "--force", "--wait=false"
            )
            force_deleted_at = time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"pods of namespace {namespace} still running {timeout} s after the test")
