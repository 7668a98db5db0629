"""Helm in tests and benchmarks: the CLI with a private home, and a release of charts/sluiceway.

No pytest in here (bench/helm_bench.py uses it too). The test kubelet mounts no ServiceAccount
token, so a release's operator pod gets ``KUBECONFIG`` through the chart's ``extraEnv``: a
kubeconfig whose exec credential plugin asks the API server for a token of the chart's own
ServiceAccount (a TokenRequest, which is what a token mount holds). The operator then acts with
exactly the RBAC the chart installed.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from localcluster.cluster import LocalCluster, write_kubeconfig
from localcluster.helm import helm_env
from localcluster.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "sluiceway"

TOKEN_PLUGIN = """#!/bin/sh
# Stands in for the token mount the test kubelet lacks: a token of the chart's ServiceAccount.
token=$("$KUBECTL" --kubeconfig "$ADMIN_KUBECONFIG" create token "$SA" -n "$SA_NAMESPACE" --duration=1h) || exit 1
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%s"}}\\n' "$token"
"""


class Helm:
    def __init__(self, binary: Path, home: Path, kubeconfig: Path | None = None) -> None:
        self.binary, self.home, self.kubeconfig = binary, home, kubeconfig

    def run(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        env = helm_env(self.home)
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        proc = subprocess.run(
            [str(self.binary), *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


def token_kubeconfig(c: LocalCluster, tmp_path: Path, namespace: str, sa: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    plugin = tmp_path / "sa-token-plugin"
    plugin.write_text(TOKEN_PLUGIN)
    plugin.chmod(0o755)
    env = {
        "KUBECTL": str(c.kubectl_path),
        "ADMIN_KUBECONFIG": str(c.kubeconfig),
        "SA": sa,
        "SA_NAMESPACE": namespace,
    }
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "interactiveMode": "Never",
        }
    }
    return write_kubeconfig(tmp_path / f"{sa}.kubeconfig", c.server, c.pki.ca_crt, user, embed_ca=True)


class Release:
    """A release of the chart into its own namespace, with values for the local cluster."""

    def __init__(self, c: LocalCluster, helm: Helm, tmp_path: Path, *values: str) -> None:
        self.c, self.helm = c, helm
        self.name = f"sw-{secrets.token_hex(3)}"
        self.namespace = c.fresh_namespace("helm")
        # The API server's PodSecurity admission then rejects an operator pod that is not restricted.
        c.kubectl(
            "label", "namespace", self.namespace, "pod-security.kubernetes.io/enforce=restricted", check=True
        )
        self.fullname = f"{self.name}-operator"
        self.port = free_port()
        kubeconfig = token_kubeconfig(c, tmp_path, self.namespace, self.fullname)
        self.values = [
            "--set=image.repository=sluiceway/operator",
            f"--set=metrics.port={self.port}",
            "--set=config.workerMetricsPort=0",  # pods share the host network here
            "--set=log.format=console",
            "--set=extraEnv[0].name=KUBECONFIG",
            f"--set=extraEnv[0].value={kubeconfig}",
            *values,
        ]

    def install(self, *extra: str) -> float:
        started = time.monotonic()
        self.helm.run(
            "install",
            self.name,
            str(CHART),
            "-n",
            self.namespace,
            "--wait",
            "--timeout=180s",
            *self.values,
            *extra,
        )
        return time.monotonic() - started

    def upgrade(self, *extra: str) -> None:
        self.helm.run(
            "upgrade",
            self.name,
            str(CHART),
            "-n",
            self.namespace,
            "--wait",
            "--timeout=180s",
            *self.values,
            *extra,
        )

    def history(self) -> list[dict[str, Any]]:
        return list(
            json.loads(self.helm.run("history", self.name, "-n", self.namespace, "-o", "json").stdout)
        )

    def args(self) -> list[str]:
        dep = self.c.get(f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{self.fullname}")
        return list(dep["spec"]["template"]["spec"]["containers"][0]["args"])

    def pod_log(self) -> str:
        pods = self.c.get(f"/api/v1/namespaces/{self.namespace}/pods")["items"]
        return "\n".join(self.c.pod_log(self.namespace, p["metadata"]["name"])[-4000:] for p in pods)

    def uninstall(self) -> None:
        self.helm.run("uninstall", self.name, "-n", self.namespace, "--wait", "--timeout=120s", check=False)
