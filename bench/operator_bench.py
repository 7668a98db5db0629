"""Operator benchmarks against the real local control plane, a real Redis and real workers.

1. Reaction time: a backlog appears at 0 replicas -> the Deployment's spec.replicas is the need;
   and from 1 replica to N. The publish lands at a phase of the loop drawn at random (uniform over
   one interval), over SLUICEWAY_BENCH_REACTION_RUNS runs each (default 20): p50, p95 and max
   against the bound of one loop interval plus 1 s.
2. Over-scaling under a QPS limit: qps 20, 0.5 s tasks, 4 per pod, 10,000 messages: the fleet must
   never exceed the Little's-law ceiling (ceil(20 * 0.5 / 4) = 3) plus 1 pod.
3. Footprint: N TaskQueues (SLUICEWAY_BENCH_TASKQUEUES, default 200) on the real API server:
   operator RSS and CPU, and the p99 tick latency from the operator's own histogram.
4. In-cluster throughput: a TaskQueue with default settings (perPod 8, automatic prefetch) pinned
   to 1 and to 3 pods, a no-op function and a deep backlog (SLUICEWAY_BENCH_INCLUSTER_MESSAGES,
   default 200,000), in msg/s, against a local worker process at the same concurrency measured the
   same way in the same run. Target: one default pod reaches at least 90 % of the local worker.

SLUICEWAY_BENCH_ONLY=reaction,overscale,footprint,incluster picks sections (default: all).

Run: ``python -m bench.operator_bench`` (needs the cached control-plane binaries and redis-server).
"""

from __future__ import annotations

import base64
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "e2e"), str(ROOT)]

from tests.support.redis_server import RedisServer  # noqa: E402

from localcluster.binaries import ensure_binaries  # noqa: E402
from localcluster.cluster import LocalCluster, running_cluster  # noqa: E402
from localcluster.procs import free_port  # noqa: E402
from sluiceway import fleet  # noqa: E402
from sluiceway.contract import Keys  # noqa: E402
from sluiceway.publish import Publisher  # noqa: E402
from sluiceway_operator.manifests import operator_rbac  # noqa: E402

INTERVAL = 2.0


def tq(name: str, redis_url: str, **scaling: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": "sluiceway/worker:bench",
        "function": "tests.tasks:record",
        "broker": {"type": "redis"},
        "concurrency": {"perPod": 4},
        "timeoutSeconds": 5,  # a deleted run's pods drain in seconds, not the default 300
        "scaling": {"pollIntervalSeconds": INTERVAL, "assumedTaskSeconds": 0.5, "targetDrainSeconds": 30,
                    "maxReplicas": 50, "cooldownSeconds": 5, "scaleDownStabilizationSeconds": 5, **scaling},
        "podTemplate": {"env": [{"name": "PYTHONPATH", "value": str(ROOT)}, {"name": "TEST_RECORD_URL", "value": redis_url}]},
    }  # fmt: skip
    return {
        "apiVersion": "sluiceway.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": spec,
    }


def replicas(c: LocalCluster, ns: str, name: str) -> int | None:
    try:
        return int(
            c.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{name}-worker")["spec"].get("replicas", 0)
        )
    except Exception:
        return None


def wait(check: Any, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise TimeoutError


def namespace(c: LocalCluster, redis_url: str) -> str:
    ns = c.fresh_namespace("bench")
    url = base64.b64encode(redis_url.encode()).decode()
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "sluiceway-redis", "namespace": ns},
            "data": {"url": url},
        }
    )
    return ns


def reaction(c: LocalCluster, redis_url: str, runs: int) -> dict[str, list[float]]:
    ns = namespace(c, redis_url)
    pub = Publisher(redis_url)
    out: dict[str, list[float]] = {"from_zero": [], "from_one": []}
    rng = random.Random()
    # need = ceil(960 * 0.5 / (4 * 30)) = 4 from zero; ceil(1920 * 0.5 / (4 * 30)) = 8 from one.
    for series, floor, messages, need in (("from_zero", 0, 960, 4), ("from_one", 1, 1920, 8)):
        for i in range(runs):
            name = f"{series.replace('_', '')}{i}"
            c.apply(tq(name, redis_url, minReplicas=floor), ns)
            wait(lambda n=name, f=floor: replicas(c, ns, n) == f, 30)
            # The loop's phase is unknown to us: a random wait makes the publish land anywhere in it,
            # so the runs sample the whole distribution instead of one phase.
            time.sleep(rng.uniform(0, INTERVAL))
            pub.publish_batch(f"{ns}/{name}", ({"n": k, "sleep": 3} for k in range(messages)))
            out[series].append(wait(lambda n=name, k=need: replicas(c, ns, n) == k, 30))
            c.kubectl("delete", "taskqueue", name, "-n", ns, "--wait=false")
    return out


def distribution(samples: list[float]) -> str:
    """p50, p95 and max of ``samples`` against the bound, as one line."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    bound = INTERVAL + 1
    over = sum(1 for x in ordered if x > bound)
    return (
        f"p50 {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s over "
        f"{len(ordered)} runs (bound {bound:g} s = interval + 1 s; {over} above)"
    )


def overscale(c: LocalCluster, redis_url: str, seconds: float) -> dict[str, Any]:
    ns = namespace(c, redis_url)
    c.apply(
        tq("capped", redis_url, maxReplicas=50)
        | {"spec": {**tq("capped", redis_url, maxReplicas=50)["spec"], "rateLimit": {"qps": 20}}},
        ns,
    )
    wait(lambda: replicas(c, ns, "capped") == 0, 30)
    Publisher(redis_url).publish_batch(f"{ns}/capped", ({"n": k, "sleep": 0.5} for k in range(10_000)))
    seen: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n = replicas(c, ns, "capped")
        if n is not None:
            seen.append(n)
        time.sleep(0.1)
    c.kubectl("delete", "taskqueue", "capped", "-n", ns, "--wait=false")
    ceiling = math.ceil(20 * 0.5 / 4)
    return {"max_replicas": max(seen), "ceiling": ceiling, "limit": ceiling + 1, "seconds": seconds}


def footprint(
    c: LocalCluster, redis_url: str, count: int, op: subprocess.Popen[bytes], port: int, seconds: float
) -> dict[str, Any]:
    ns = namespace(c, redis_url)
    docs = [tq(f"q{i}", redis_url) for i in range(count)]
    for k in range(0, count, 100):
        c.apply(docs[k : k + 100], ns)
    wait(lambda: replicas(c, ns, f"q{count - 1}") == 0, 300)
    time.sleep(2 * INTERVAL)
    cpu0, t0 = _cpu(op.pid), time.monotonic()
    time.sleep(seconds)
    cpu = (_cpu(op.pid) - cpu0) / (time.monotonic() - t0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {"taskqueues": count, "rss_mib": _rss(op.pid) / 2**20, "cpu_cores": cpu, "p99_tick_s": _p99(text)}


def acked_rate(client: Any, keys: Keys, n: int) -> float:
    """Messages/s between 10 % and 90 % of ``n`` acknowledged: start-up and the tail do not count."""
    while fleet.queue_stats(client, keys).acked < n // 10:
        time.sleep(0.005)
    a0, t0 = fleet.queue_stats(client, keys).acked, time.perf_counter()
    while (a := fleet.queue_stats(client, keys).acked) < n * 9 // 10:
        time.sleep(0.005)
    return (a - a0) / (time.perf_counter() - t0)


def local_worker_rate(redis_url: str, n: int, concurrency: int) -> float:
    """The reference: ``sluiceway worker`` as a plain local process, no operator, no pod."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    keys = Keys("default", "local")
    client.delete(keys.stats)
    Publisher(redis_url).publish_batch("local", ({"n": i} for i in range(n)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLUICEWAY_REDIS_URL": redis_url,
           "SLUICEWAY_METRICS_PORT": "0", "SLUICEWAY_LOG_LEVEL": "WARNING"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluiceway", "worker", "-f", "bench.tasks:noop", "-q", "local",
         "-c", str(concurrency)],
        env=env,
    )  # fmt: skip
    try:
        return acked_rate(client, keys, n)
    finally:
        proc.terminate()
        proc.wait(30)
        client.delete(keys.ready)


def incluster(c: LocalCluster, redis_url: str, n: int, pods: int) -> float:
    """msg/s of a default TaskQueue pinned to ``pods`` pods draining ``n`` no-op messages."""
    import redis as redis_lib

    ns = namespace(c, redis_url)
    name = f"thru{pods}"
    body = {
        "apiVersion": "sluiceway.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": name},
        "spec": {
            "image": "sluiceway/worker:bench",
            "function": "bench.tasks:noop",
            "broker": {"type": "redis"},
            "replicas": pods,  # pinned: the figure is per pod count, not the autoscaler's choice
            "podTemplate": {"env": [{"name": "PYTHONPATH", "value": str(ROOT)}]},
        },
    }
    c.apply(body, ns)
    client = redis_lib.Redis.from_url(redis_url)
    keys = Keys(ns, name)
    wait(lambda: len(fleet.heartbeats(client, keys)) >= pods, 120)
    Publisher(redis_url).publish_batch(f"{ns}/{name}", ({"n": i} for i in range(n)))
    try:
        return acked_rate(client, keys, n)
    finally:
        c.kubectl("delete", "taskqueue", name, "-n", ns, "--wait=false")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _p99(metrics_text: str) -> float:
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith("sluiceway_operator_decision_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1]
    for le, n in buckets:
        if n >= 0.99 * total:
            return le
    return math.inf


def main() -> None:
    count = int(os.environ.get("SLUICEWAY_BENCH_TASKQUEUES", "200"))
    redis = RedisServer()
    redis.start()
    with running_cluster(binaries=ensure_binaries()) as c:
        c.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "taskqueue.yaml"), check=True)
        c.wait_established("taskqueues.sluiceway.dev")
        op_ns = c.fresh_namespace("op")
        c.apply(operator_rbac(op_ns))
        kubeconfig = c.serviceaccount_kubeconfig(op_ns, "sluiceway-operator")
        port = free_port()
        log = Path(tempfile.mkdtemp()) / "operator.log"
        with log.open("wb") as out:
            op = subprocess.Popen(
                [sys.executable, "-m", "sluiceway_operator", "-A", "--worker-metrics-port", "0", "--http-port", str(port)],
                env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        only = set(filter(None, os.environ.get("SLUICEWAY_BENCH_ONLY", "").split(","))) or {
            "reaction", "overscale", "footprint", "incluster"
        }  # fmt: skip
        try:
            if "incluster" in only:
                n = int(os.environ.get("SLUICEWAY_BENCH_INCLUSTER_MESSAGES", "200000"))
                local = local_worker_rate(redis.url, n, 8)
                one = incluster(c, redis.url, n, 1)
                three = incluster(c, redis.url, n, 3)
                print(f"in-cluster, default TaskQueue, no-op: local worker (-c 8) {local:,.0f} msg/s")
                print(f"  1 pod:  {one:,.0f} msg/s = {one / local:.1%} of the local worker (target >= 90 %)")
                print(f"  3 pods: {three:,.0f} msg/s = {three / local:.1%} of one local worker")
            if "reaction" in only:
                r = reaction(c, redis.url, int(os.environ.get("SLUICEWAY_BENCH_REACTION_RUNS", "20")))
                print(f"reaction 0 -> need (4): {distribution(r['from_zero'])}")
                print(f"reaction 1 -> N (8):    {distribution(r['from_one'])}")
            if "overscale" in only:
                o = overscale(c, redis.url, float(os.environ.get("SLUICEWAY_BENCH_OVERSCALE_SECONDS", "40")))
                print(
                    f"over-scaling: max replicas {o['max_replicas']} vs Little's-law ceiling {o['ceiling']} (+1 = {o['limit']}) over {o['seconds']:.0f} s"
                )
                threading.Event().wait(3)
            if "footprint" in only:
                f = footprint(
                    c,
                    redis.url,
                    count,
                    op,
                    port,
                    float(os.environ.get("SLUICEWAY_BENCH_FOOTPRINT_SECONDS", "30")),
                )
                print(
                    f"footprint: {f['taskqueues']} TaskQueues, RSS {f['rss_mib']:.0f} MiB, CPU {f['cpu_cores']:.2f} cores, p99 tick <= {f['p99_tick_s']} s"
                )
        finally:
            op.terminate()
            op.wait(30)
            redis.close()


if __name__ == "__main__":
    main()
