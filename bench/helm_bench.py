"""`helm install` of charts/sluiceway to the first Ready TaskQueue, on the warm local control plane.

Per round: a fresh release in its own namespace; ``helm install --wait`` (the operator pod Ready,
i.e. serving /healthz); then a TaskQueue applied at once, until its Ready condition is True (the
chart's operator reconciled it: Deployment applied, Redis observed, status written). Also times
``helm lint --strict`` and ``helm template`` piped to ``kubectl apply --dry-run=server``, the two
checks CI runs on every chart change.

Run: ``python -m bench.helm_bench [rounds]`` (needs the cached control-plane binaries, Helm
(``make helm-bin``) and redis-server). Figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "e2e"), str(ROOT)]

from tests.support.redis_server import RedisServer  # noqa: E402

from helmsupport import CHART, Helm, Release  # noqa: E402
from localcluster.binaries import KUBE_VERSION, ensure_binaries  # noqa: E402
from localcluster.cluster import LocalCluster, running_cluster  # noqa: E402
from localcluster.helm import ensure_helm  # noqa: E402
from support import install_crd, taskqueue  # noqa: E402


def ready(c: LocalCluster, ns: str, name: str) -> bool:
    try:
        tq = c.get(f"/apis/sluiceway.dev/v1alpha1/namespaces/{ns}/taskqueues/{name}")
    except Exception:
        return False
    return any(
        x["type"] == "Ready" and x["status"] == "True" for x in tq.get("status", {}).get("conditions", [])
    )


def one_round(c: LocalCluster, helm: Helm, redis_url: str, work: Path) -> dict[str, float]:
    ns = c.fresh_namespace("bench-tq")
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "sluiceway-redis"},
            "data": {"url": base64.b64encode(redis_url.encode()).decode()},
        },
        ns,
    )
    release = Release(c, helm, work)
    t0 = time.monotonic()
    release.install()
    installed = time.monotonic() - t0
    c.apply(taskqueue("bench", redis_url), ns)
    deadline = time.monotonic() + 120
    while not ready(c, ns, "bench"):
        if time.monotonic() > deadline:
            raise SystemExit(f"no Ready TaskQueue after 120 s:\n{release.pod_log()}")
        time.sleep(0.05)
    total = time.monotonic() - t0
    c.kubectl("delete", "taskqueue", "bench", "-n", ns, "--wait=true", "--timeout=60s")
    release.uninstall()
    return {"install": installed, "ready": total, "reconcile": total - installed}


def timed(fn: Any) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> None:
    rounds = int((argv or sys.argv[1:] or ["3"])[0])
    ensure_binaries()
    binary = ensure_helm()
    redis = RedisServer()
    redis.start()
    try:
        with tempfile.TemporaryDirectory(prefix="sluiceway-helm-bench-") as tmp, running_cluster() as c:
            work = Path(tmp)
            helm = Helm(binary, work / "home", c.kubeconfig)
            install_crd(c)
            lint = timed(lambda: helm.run("lint", "--strict", str(CHART)))
            ns = c.fresh_namespace("bench-dry")

            def dry_run() -> None:
                out = helm.run("template", "d", str(CHART), "-n", ns, "--kube-version", KUBE_VERSION).stdout
                subprocess.run(
                    [
                        str(c.kubectl_path),
                        "--kubeconfig",
                        str(c.kubeconfig),
                        "apply",
                        "--dry-run=server",
                        "-f",
                        "-",
                    ],
                    input=out,
                    text=True,
                    check=True,
                    capture_output=True,
                )

            dry = timed(dry_run)
            results = [one_round(c, helm, redis.url, work / f"r{i}") for i in range(rounds)]
    finally:
        redis.close()
    print(f"helm lint --strict: {lint:.2f} s; helm template | kubectl apply --dry-run=server: {dry:.2f} s")
    for key, label in (
        ("install", "helm install --wait (operator pod Ready)"),
        ("reconcile", "then TaskQueue applied -> Ready"),
        ("ready", "helm install -> first Ready TaskQueue"),
    ):
        values = [r[key] for r in results]
        print(
            f"{label}: median {statistics.median(values):.1f} s, "
            f"min {min(values):.1f} s, max {max(values):.1f} s ({rounds} rounds)"
        )


if __name__ == "__main__":
    main()
