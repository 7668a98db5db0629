"""The operator starts with the kubeconfigs users have, against the real API server.

Each form runs ``sluiceway-operator`` as its own process with ``KUBECONFIG`` set, then checks what a
user would: ``/healthz`` answers, a TaskQueue gets its status (kopf's watch and the operator's own
client both authenticated), and its deletion completes (the finalizer's patch went through).

- ``flattened``: what `kubectl config view --flatten --raw` writes (and kind, EKS, GKE): the CA and
  a client certificate as base64 data. The operator used to hand that CA to ``ssl`` undecoded and
  retry its startup forever.
- ``token``: a ServiceAccount token with the CA embedded (the harness's ServiceAccount kubeconfigs).
- ``ca-file``: a token with the CA as a file path, the form the tests used before.
- ``exec``: an exec credential plugin (a shell script printing an ExecCredential, as EKS's and GKE's
  plugins do). Its first token is invalid, so a 401 must make the operator log in again; its tokens
  expire 65 s after issue, so the operator must run it again ahead of the expiry.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.__main__ import export_text
from localcluster.cluster import LocalCluster, write_kubeconfig
from localcluster.procs import free_port
from support import (
    OPERATOR_SA,
    ROOT,
    Operator,
    cond,
    get_tq,
    install_crd,
    install_operator_rbac,
    taskqueue,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(240)]

PLUGIN = """#!/bin/sh
# A minimal exec credential plugin: the first token is invalid, later ones are the real one.
echo run >> "$PLUGIN_CALLS"
if [ "$(wc -l < "$PLUGIN_CALLS")" -eq 1 ]; then token=not-a-valid-token; else token=$(cat "$PLUGIN_TOKEN"); fi
expires=$(date -u -d "+65 seconds" +%Y-%m-%dT%H:%M:%SZ)
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%s","expirationTimestamp":"%s"}}\\n' "$token" "$expires"
"""


@pytest.fixture(scope="module")
def operator_sa(kube_cluster: LocalCluster) -> str:
    """A namespace holding the operator's ServiceAccount, bound to the shipped RBAC."""
    install_crd(kube_cluster)
    namespace = kube_cluster.fresh_namespace("kc")
    install_operator_rbac(kube_cluster, namespace)
    return namespace


def flattened(c: LocalCluster, tmp_path: Path) -> Path:
    out = c.kubectl("config", "view", "--flatten", "--raw", check=True).stdout
    cluster = yaml.safe_load(out)["clusters"][0]["cluster"]
    assert "certificate-authority-data" in cluster and "certificate-authority" not in cluster
    path = tmp_path / "flattened.kubeconfig"
    path.write_text(out)
    return path


def exec_kubeconfig(c: LocalCluster, token: str, tmp_path: Path) -> Path:
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(PLUGIN)
    plugin.chmod(0o755)
    (tmp_path / "token").write_text(token)
    user: dict[str, Any] = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "env": [
                {"name": "PLUGIN_CALLS", "value": str(tmp_path / "calls")},
                {"name": "PLUGIN_TOKEN", "value": str(tmp_path / "token")},
            ],
            "interactiveMode": "Never",
        }
    }
    return write_kubeconfig(tmp_path / "exec.kubeconfig", c.server, c.pki.ca_crt, user, embed_ca=True)


def plugin_calls(tmp_path: Path) -> int:
    calls = tmp_path / "calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


@pytest.fixture
def kubeconfig(
    request: pytest.FixtureRequest, kube_cluster: LocalCluster, operator_sa: str, tmp_path: Path
) -> Path:
    c, form = kube_cluster, request.param
    if form == "flattened":
        return flattened(c, tmp_path)
    token = c.serviceaccount_token(operator_sa, OPERATOR_SA)
    if form == "token":
        path = c.serviceaccount_kubeconfig(operator_sa, OPERATOR_SA)
        assert "certificate-authority-data" in path.read_text()
        return path
    if form == "ca-file":
        return write_kubeconfig(tmp_path / "ca-file.kubeconfig", c.server, c.pki.ca_crt, {"token": token})
    return exec_kubeconfig(c, token, tmp_path)


def start(kubeconfig: Path, watch: str, log: Path) -> Operator:
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    args = ["-n", watch, "--worker-metrics-port", "0", "--http-port", str(port), "--log-format", "console"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluiceway_operator", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Operator(proc, log, watch, port)


def healthz(op: Operator) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{op.http_port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture
def running(kubeconfig: Path, ns: str, tmp_path: Path) -> Iterator[Operator]:
    op = start(kubeconfig, ns, tmp_path / "operator.log")
    yield op
    op.stop()


@pytest.mark.parametrize("kubeconfig", ["flattened", "token", "ca-file", "exec"], indirect=True)
def test_operator_starts_serves_healthz_and_reconciles(
    kube_cluster: LocalCluster, kubeconfig: Path, running: Operator, ns: str, redis_url: str, tmp_path: Path
) -> None:
    c, op = kube_cluster, running
    until(op, lambda: healthz(op), 60, "/healthz")
    c.apply(taskqueue("kc", redis_url), ns)
    tq = until(
        op, lambda: (t := get_tq(c, ns, "kc")) and cond(t, "Ready").get("status") == "True" and t, 60, "Ready"
    )
    assert cond(tq, "Ready")["reason"] == "IdleAtZero"
    if "exec" in kubeconfig.name:
        # kopf's login and the operator's client each ran the plugin; one of them got the invalid
        # token, was refused, and logged in again.
        assert plugin_calls(tmp_path) >= 3, op.tail()
        # Tokens live 65 s and are renewed 60 s early, before the next call: a spec change makes
        # the operator call the API (an idle TaskQueue costs no call), with a fresh token.
        seen = plugin_calls(tmp_path)
        edits = iter(range(10**6))

        def renewed() -> bool:
            patch = json.dumps({"spec": {"concurrency": {"perPod": 2 + next(edits) % 2}}})
            c.kubectl("patch", "taskqueue", "kc", "-n", ns, "--type=merge", "-p", patch, check=True)
            return plugin_calls(tmp_path) > seen

        until(op, renewed, 40, "the plugin to run again before the expiry")
    c.kubectl("delete", "taskqueue", "kc", "-n", ns, "--wait=false", check=True)
    until(op, lambda: not c.kubectl("get", "taskqueue", "kc", "-n", ns).stdout, 60, "the deletion to finish")
    assert op.proc.poll() is None, op.tail()


def test_operator_without_usable_credentials_exits_and_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.kubeconfig"
    op = start(missing, "default", tmp_path / "operator.log")
    try:
        deadline = time.monotonic() + 60
        while op.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert op.proc.returncode not in (None, 0), op.tail()
        assert f"no kubeconfig found at {missing}" in op.log.read_text(), op.tail()
        assert not healthz(op)
    finally:
        op.stop()


def test_the_operator_command_cluster_up_prints_runs_against_the_cluster(
    kube_cluster: LocalCluster, ns: str, redis_url: str, tmp_path: Path
) -> None:
    """`make cluster-up` prints how to run the operator from a laptop; those exact lines work."""
    c = kube_cluster
    text = export_text({"server": c.server, "kubeconfig": str(c.kubeconfig)}, c.kubectl_path)
    apply_line, operator_line = [
        line.strip() for line in text.splitlines() if line.strip().startswith("KUBECONFIG=")
    ]
    env_part, _, command = apply_line.partition(" ")
    applied = subprocess.run(
        shlex.split(command),
        cwd=ROOT,
        env={**os.environ, env_part.split("=", 1)[0]: env_part.split("=", 1)[1]},
    )
    assert applied.returncode == 0
    words = shlex.split(operator_line)
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    argv = [w for w in words if w not in {f"{k}={v}" for k, v in env.items()}]
    assert argv[0] == ".venv/bin/sluiceway-operator"
    port = free_port()
    log = tmp_path / "operator.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(ROOT / argv[0]), *argv[1:], "--http-port", str(port), "-n", ns],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    op = Operator(proc, log, ns, port)
    try:
        until(op, lambda: healthz(op), 60, "/healthz")
        c.apply(taskqueue("laptop", redis_url), ns)
        until(op, lambda: cond(get_tq(c, ns, "laptop"), "Ready").get("status") == "True", 60, "Ready")
        c.kubectl("delete", "taskqueue", "laptop", "-n", ns, "--wait=true", "--timeout=60s", check=True)
    finally:
        op.stop()
