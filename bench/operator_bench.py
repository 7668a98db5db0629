"""Operator benchmarks against the real local control plane, a real Redis and real workers.

1. Reaction time: a backlog appears at 0 replicas -> the Deployment's spec.replicas is the need;
   and from 1 replica to N. Target: at most one loop interval plus 1 s.
2. Over-scaling under a QPS limit: qps 20, 0.5 s tasks, 4 per pod, 10,000 messages: the fleet must
   never exceed the Little's-law ceiling (ceil(20 * 0.5 / 4) = 3) plus 1 pod.
3. Footprint: N TaskQueues (SLUICEWAY_BENCH_TASKQUEUES, default 200) on the real API server:
   operator RSS and CPU, and the p99 tick latency from the operator's own histogram.

Run: ``python -m bench.operator_bench`` (needs the cached control-plane binaries and redis-server).
"""

from __future__ import annotations

import base64
import math
import os
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
from sluiceway.publish import Publisher  # noqa: E402
from sluiceway_operator.manifests import operator_rbac  # noqa: E402

INTERVAL = 2.0


def tq(name: str, redis_url: str, **scaling: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "image": "sluiceway/worker:bench",
        "function": "tests.tasks:record",
        "broker": {"type": "redis"},
        "concurrency": {"perPod": 4},
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


def reaction(c: LocalCluster, redis_url: str) -> dict[str, Any]:
    ns = namespace(c, redis_url)
    pub = Publisher(redis_url)
    out: dict[str, Any] = {"from_zero": [], "from_one": []}
    # need = ceil(960 * 0.5 / (4 * 30)) = 4
    for i in range(3):
        name = f"wake{i}"
        c.apply(tq(name, redis_url), ns)
        wait(lambda n=name: replicas(c, ns, n) == 0, 30)
        time.sleep(INTERVAL * 1.5)  # land at a random phase of the loop
        pub.publish_batch(f"{ns}/{name}", ({"n": k, "sleep": 30} for k in range(960)))
        out["from_zero"].append(wait(lambda n=name: replicas(c, ns, n) == 4, 30))
        c.kubectl("delete", "taskqueue", name, "-n", ns, "--wait=false")
    for i in range(3):
        name = f"grow{i}"
        c.apply(tq(name, redis_url, minReplicas=1), ns)
        wait(lambda n=name: replicas(c, ns, n) == 1, 30)
        time.sleep(INTERVAL * 1.5)
        pub.publish_batch(f"{ns}/{name}", ({"n": k, "sleep": 30} for k in range(1920)))  # need 8
        out["from_one"].append(wait(lambda n=name: replicas(c, ns, n) == 8, 30))
        c.kubectl("delete", "taskqueue", name, "-n", ns, "--wait=false")
    return out


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
        c.kubectl(
            "wait", "--for=condition=Established", "crd/taskqueues.sluiceway.dev", "--timeout=60s", check=True
        )
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
        try:
            r = reaction(c, redis.url)
            print(
                f"reaction 0 -> need (4): {', '.join(f'{x:.2f}' for x in r['from_zero'])} s (interval {INTERVAL} s)"
            )
            print(f"reaction 1 -> N (8):    {', '.join(f'{x:.2f}' for x in r['from_one'])} s")
            o = overscale(c, redis.url, float(os.environ.get("SLUICEWAY_BENCH_OVERSCALE_SECONDS", "40")))
            print(
                f"over-scaling: max replicas {o['max_replicas']} vs Little's-law ceiling {o['ceiling']} (+1 = {o['limit']}) over {o['seconds']:.0f} s"
            )
            threading.Event().wait(3)
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
