"""The local control plane does what a real cluster does for the parts the project relies on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from localcluster.cluster import LocalCluster
from localcluster.procs import ClusterError, free_port, pid_alive, sweep_run

pytestmark = pytest.mark.timeout(300)

E2E = Path(__file__).resolve().parent

GRACE = 10
TRAP_SCRIPT = "trap 'echo got TERM; exit 0' TERM; echo started $POD_NAME; touch ready-$HOSTNAME; while true; do sleep 0.2; done"


def pods(cluster: LocalCluster, ns: str, selector: str = "") -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/{ns}/pods" + (f"?labelSelector={selector}" if selector else "")
    return list(cluster.get(path)["items"])


def ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def deployment(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": GRACE,
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox:1.36",
                            "command": ["sh", "-c", TRAP_SCRIPT],
                            "env": [
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                }
                            ],
                            "readinessProbe": {
                                "exec": {"command": ["sh", "-c", "test -f ready-$HOSTNAME"]},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


@pytest.mark.cluster
def test_deployment_runs_processes_scales_down_with_sigterm_and_is_garbage_collected(
    kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    c, ns = kube_cluster, kube_namespace
    c.apply(deployment("web", 3), ns)
    c.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s", check=True)

    running = c.pods_processes(ns)
    assert len(running) == 3, running
    pids = {pod: p[0] for pod, p in running.items()}
    for pid in pids.values():
        assert pid_alive(pid)
        assert b"sh\x00-c\x00trap" in Path(f"/proc/{pid}/cmdline").read_bytes()
    listed = pods(c, ns, "app=web")
    assert len(listed) == 3
    assert all(ready(p) for p in listed)
    assert all(p["status"]["podIP"] == "127.0.0.1" for p in listed)
    # The ReplicaSet and pods were made by kube-controller-manager, owned by what made them.
    rs = c.get(f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"]
    assert len(rs) == 1
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert all(p["metadata"]["ownerReferences"][0]["name"] == rs[0]["metadata"]["name"] for p in listed)
    c.wait_for(lambda: all(f"started {pod}" in c.pod_log(ns, pod) for pod in pids), 10, "each pod's log")

    c.kubectl("scale", "deployment/web", "--replicas=1", "-n", ns, check=True)
    c.wait_for(
        lambda: len(pods(c, ns, "app=web")) == 1 and len(c.pods_processes(ns)) == 1, 30, "scale down to 1"
    )
    removed = [pod for pod in pids if pod not in c.pods_processes(ns)]
    assert len(removed) == 2
    exits = {e.pod: e for e in c.require_kubelet().exits(ns)}
    for pod in removed:
        e = exits[pod]
        assert e.sigterm_sent, e
        assert not e.sigkill_sent, e
        assert e.exited_after_sigterm is not None, e
        assert e.exited_after_sigterm < GRACE, e
        assert e.exit_code == 0
        assert "got TERM" in c.pod_log(ns, pod)
        assert not pid_alive(pids[pod])

    c.kubectl("delete", "deployment/web", "-n", ns, "--wait=true", check=True)

    def all_gone() -> bool:
        rs_left = c.get(f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"]
        return not rs_left and not pods(c, ns) and not c.pods_processes(ns)

    c.wait_for(all_gone, 40, "garbage collection of the ReplicaSet, its pods and their processes")
    assert not any(pid_alive(pid) for pid in pids.values())


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.sluiceway.dev"},
    "spec": {
        "group": "e2e.sluiceway.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["minReplicas", "maxReplicas"],
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.maxReplicas >= self.minReplicas",
                                        "fieldPath": ".maxReplicas",
                                        "message": "must be at least minReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, lo: int, hi: int) -> str:
    return json.dumps(
        {
            "apiVersion": "e2e.sluiceway.dev/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"minReplicas": lo, "maxReplicas": hi},
        }
    )


@pytest.mark.cluster
def test_crd_cel_rule_rejects_a_bad_object_naming_the_field(
    kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    c, ns = kube_cluster, kube_namespace
    c.apply(CRD)
    c.wait_established("widgets.e2e.sluiceway.dev", 30)

    good = c.kubectl("apply", "-n", ns, "-f", "-", input=widget("good", 1, 3))
    assert good.returncode == 0, good.stderr

    bad = c.kubectl("apply", "-n", ns, "-f", "-", input=widget("bad", 5, 2))
    assert bad.returncode != 0
    assert "spec.maxReplicas" in bad.stderr, bad.stderr
    assert "must be at least minReplicas" in bad.stderr, bad.stderr

    # The structural schema is enforced too, and also names the field.
    negative = c.kubectl("apply", "-n", ns, "-f", "-", input=widget("negative", -1, 2))
    assert negative.returncode != 0
    assert "spec.minReplicas" in negative.stderr, negative.stderr


@pytest.mark.cluster
def test_serviceaccount_kubeconfig_is_denied_what_its_role_does_not_allow(
    kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    c, ns = kube_cluster, kube_namespace
    c.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "configmap-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "reader"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "configmap-reader",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
            },
        ],
        ns,
    )
    kc = c.serviceaccount_kubeconfig(ns, "reader")

    who = c.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kc)
    assert who.stdout == f"system:serviceaccount:{ns}:reader", who.stderr
    allowed = c.kubectl("get", "configmaps", "-n", ns, kubeconfig=kc)
    assert allowed.returncode == 0, allowed.stderr

    for args, what in [
        (("get", "secrets", "-n", ns), 'cannot list resource "secrets"'),
        (("create", "configmap", "x", "-n", ns), 'cannot create resource "configmaps"'),
        (
            ("get", "configmaps", "-n", "default"),
            'cannot list resource "configmaps" in API group "" in the namespace "default"',
        ),
    ]:
        denied = c.kubectl(*args, kubeconfig=kc)
        assert denied.returncode != 0
        assert "forbidden" in denied.stderr.lower(), denied.stderr
        assert what in denied.stderr, denied.stderr


@pytest.mark.cluster
def test_env_sources_exit_codes_and_restart_policy(kube_cluster: LocalCluster, kube_namespace: str) -> None:
    c, ns = kube_cluster, kube_namespace
    c.kubectl("create", "secret", "generic", "creds", "--from-literal=token=s3cret", "-n", ns, check=True)
    c.kubectl(
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=fast",
        "--from-literal=level=3",
        "-n",
        ns,
        check=True,
    )
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "env", "labels": {"tier": "backend"}},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "command": ["sh", "-c"],
                        "args": [
                            "echo token=$TOKEN mode=$MODE ns=$NS tier=$TIER ip=$IP cfg_level=$CFG_level greeting=$(GREETING) pwd=$(pwd)"
                        ],
                        "workingDir": "/tmp",
                        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                        "env": [
                            {
                                "name": "TOKEN",
                                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                            },
                            {
                                "name": "MODE",
                                "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}},
                            },
                            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {
                                "name": "TIER",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}},
                            },
                            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "GREETING", "value": "hello-$(NS)"},
                        ],
                    }
                ],
            },
        },
        ns,
    )
    c.wait_for(
        lambda: c.get(f"/api/v1/namespaces/{ns}/pods/env")["status"].get("phase") == "Succeeded",
        30,
        "pod env to succeed",
    )
    assert c.pod_log(ns, "env").strip() == (
        f"token=s3cret mode=fast ns={ns} tier=backend ip=127.0.0.1 cfg_level=3 greeting=hello-{ns} pwd=/tmp"
    )

    # OnFailure restarts a failing container; its previous instance's exit code and log are kept.
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "flaky"},
            "spec": {
                "restartPolicy": "OnFailure",
                "containers": [
                    {"name": "main", "image": "busybox", "command": ["sh", "-c", "echo attempt; exit 3"]}
                ],
            },
        },
        ns,
    )

    def restarted() -> bool:
        st = c.get(f"/api/v1/namespaces/{ns}/pods/flaky")["status"].get("containerStatuses", [{}])[0]
        return bool(
            st.get("restartCount", 0) >= 1
            and st.get("lastState", {}).get("terminated", {}).get("exitCode") == 3
        )

    c.wait_for(restarted, 30, "pod flaky to restart after exit code 3")
    assert "attempt" in c.pod_log(ns, "flaky", previous=True)

    # kill -9 of a pod's process: restartPolicy Always brings it back, and the status says why.
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "victim"},
            "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"]}]},
        },
        ns,
    )
    c.wait_for(lambda: "victim" in c.pods_processes(ns), 30, "pod victim to run")
    old = c.pods_processes(ns)["victim"][0]
    os.kill(old, 9)

    def back() -> bool:
        st = c.get(f"/api/v1/namespaces/{ns}/pods/victim")["status"]["containerStatuses"][0]
        return bool(
            st["restartCount"] == 1
            and st["lastState"].get("terminated", {}).get("exitCode") == 137
            and "running" in st["state"]
            and c.pods_processes(ns).get("victim", [old])[0] != old
        )

    c.wait_for(back, 30, "pod victim to restart after kill -9")


@pytest.mark.cluster
def test_http_readiness_probe_gates_ready(kube_cluster: LocalCluster, kube_namespace: str) -> None:
    c, ns = kube_cluster, kube_namespace
    port = free_port()
    # Not ready until the server listens, which it does only after a delay.
    script = f"import time, http.server; time.sleep(2); http.server.test(http.server.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11",
                        # As with the real image (no ENTRYPOINT), args alone would replace `python3`.
                        "command": ["python3", "-c", script],
                        "ports": [{"name": "http", "containerPort": port}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                    }
                ]
            },
        },
        ns,
    )
    c.wait_for(lambda: "web" in c.pods_processes(ns), 20, "pod web to start")
    time.sleep(0.5)
    assert not ready(c.get(f"/api/v1/namespaces/{ns}/pods/web"))
    c.wait_for(lambda: ready(c.get(f"/api/v1/namespaces/{ns}/pods/web")), 20, "pod web to become Ready")


@pytest.mark.cluster
def test_liveness_probe_restarts_and_emptydir_tmp_is_per_pod(
    kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    c, ns = kube_cluster, kube_namespace
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "wedged"},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "volumes": [{"name": "tmp", "emptyDir": {}}],
                "containers": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "command": [
                            "sh",
                            "-c",
                            "echo tmp=$TMPDIR; touch alive; sleep 1; rm alive; exec sleep 3600",
                        ],
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        "livenessProbe": {
                            "exec": {"command": ["test", "-f", "alive"]},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }
                ],
            },
        },
        ns,
    )

    def restarted_by_liveness() -> bool:
        st = c.get(f"/api/v1/namespaces/{ns}/pods/wedged")["status"].get("containerStatuses", [{}])[0]
        return bool(st.get("restartCount", 0) >= 1 and st["lastState"]["terminated"]["exitCode"] == 128 + 15)

    c.wait_for(restarted_by_liveness, 30, "a restart after the liveness probe failed")
    tmpdir = c.pod_log(ns, "wedged", previous=True).strip().removeprefix("tmp=")
    assert tmpdir.endswith("/volumes/tmp"), tmpdir
    assert Path(tmpdir).is_dir()


@pytest.mark.cluster
def test_unknown_image_is_reported_and_registered_images_run(
    kube_cluster: LocalCluster, kube_namespace: str
) -> None:
    c, ns = kube_cluster, kube_namespace
    image = f"example.test/tools/echoer-{ns}:1"
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "echo"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": image, "args": ["registered"]}],
            },
        },
        ns,
    )

    def waiting_reason() -> str:
        st = c.get(f"/api/v1/namespaces/{ns}/pods/echo")["status"].get("containerStatuses", [{}])[0]
        return str(st.get("state", {}).get("waiting", {}).get("reason", ""))

    c.wait_for(lambda: waiting_reason() == "ErrImagePull", 20, "ErrImagePull for an unknown image")
    c.require_kubelet().images.register(f"tools/echoer-{ns}", ["echo", "image"])
    c.wait_for(
        lambda: c.get(f"/api/v1/namespaces/{ns}/pods/echo")["status"].get("phase") == "Succeeded",
        20,
        "echo pod",
    )
    assert c.pod_log(ns, "echo").strip() == "image registered"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid_alive(pid)]


@pytest.mark.cluster
def test_port_clash_is_one_clear_error_and_leaves_no_processes(
    kube_cluster: LocalCluster, tmp_path: Path
) -> None:
    # kube_cluster ensures the binaries exist; this test starts its own (failing) control plane.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ClusterError) as err:
            LocalCluster.start(
                tmp_path / "run", binaries=kube_cluster.binaries, apiserver_port=port, with_kubelet=False
            )
    message = str(err.value)
    assert f"127.0.0.1:{port} is already in use" in message
    assert "kube-apiserver" in message
    assert time.monotonic() - started < 30
    # etcd had started before the clash; it must be gone.
    assert _processes_mentioning(str(tmp_path / "run")) == []


@pytest.mark.cluster
def test_stop_leaves_no_processes_and_warm_start_takes_seconds(
    kube_cluster: LocalCluster, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    started = time.monotonic()
    second = LocalCluster.start(run, binaries=kube_cluster.binaries)
    startup = time.monotonic() - started
    try:
        second.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "stubborn"},
                # Ignores SIGTERM, and starts a child in its process group: stop() must still end both.
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "command": ["sh", "-c", "trap '' TERM; sleep 3600 & wait"],
                        }
                    ]
                },
            },
            "default",
        )
        second.wait_for(lambda: "stubborn" in second.pods_processes("default"), 30, "pod stubborn")
        pid = second.pods_processes("default")["stubborn"][0]
    finally:
        second.stop()
    assert not pid_alive(pid)
    assert _processes_mentioning(str(run)) == []
    assert not [p for p in _processes_mentioning("sleep\x003600") if os.getpgid(p) == pid]
    print(f"warm start of a second control plane: {startup:.1f}s")
    assert startup < 60


@pytest.mark.cluster
def test_cluster_down_reaps_what_a_killed_supervisor_left(kube_cluster: LocalCluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(E2E)}
    cli = [sys.executable, "-m", "localcluster"]
    up = subprocess.run(
        [*cli, "up", "--run-dir", str(run)], env=env, capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={run}/admin.kubeconfig" in up.stdout
    supervisor = json.loads((run / "state.json").read_text())["supervisor_pid"]
    try:
        kubectl = [str(kube_cluster.binaries.kubectl), f"--kubeconfig={run}/admin.kubeconfig"]
        subprocess.run(
            [*kubectl, "run", "orphan", "--image=busybox", "--", "sleep", "3600"], check=True, timeout=30
        )

        def pod_pgids() -> list[int]:
            groups = json.loads((run / "pids.json").read_text())["groups"]
            return [g["pgid"] for g in groups if str(g["name"]).startswith("pod default/orphan")]

        deadline = time.monotonic() + 30
        while not pod_pgids() and time.monotonic() < deadline:
            time.sleep(0.2)
        pod_pid = pod_pgids()[0]
        # A supervisor killed outright cannot clean up: its components and pods live on ...
        os.kill(supervisor, 9)
        time.sleep(0.5)
        assert _processes_mentioning(str(run))
        assert pid_alive(pod_pid)
    finally:
        # ... until `down` (or the next start) reaps them from the run's pid file.
        down = subprocess.run(
            [*cli, "down", "--run-dir", str(run)], env=env, capture_output=True, text=True, timeout=60
        )
    assert down.returncode == 0, down.stderr
    assert "killing leftover kube-apiserver" in down.stderr
    # SIGKILLed processes vanish once the kernel has reaped them: wait for that, not a fixed time.
    kube_cluster.wait_for(
        lambda: _processes_mentioning(str(run)) == [] and not pid_alive(pod_pid), 30, "the leftovers gone"
    )


def _binaries_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localcluster.binaries"],
        cwd=E2E,
        env={**env, "PYTHONPATH": str(E2E)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBEBUILDER_ASSETS", "SLUICEWAY_GO")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def test_missing_go_toolchain_is_one_actionable_message(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env["SLUICEWAY_GO"] = str(tmp_path / "no-go-here")
    done = _binaries_cli(env)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "Go toolchain not found" in errors[0]
    assert "KUBEBUILDER_ASSETS" in errors[0]


def test_failed_build_is_one_actionable_message(tmp_path: Path) -> None:
    fake_go = tmp_path / "go"
    fake_go.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            if [ "$1 $2" = "env GOVERSION" ]; then echo go1.26.0; exit 0; fi
            echo "go: k8s.io/kubernetes@v9.9.9: reading module: 410 Gone" >&2
            exit 1
            """
        )
    )
    fake_go.chmod(0o755)
    env = _clean_env(tmp_path)
    env["SLUICEWAY_GO"] = str(fake_go)
    done = _binaries_cli(env)
    assert done.returncode == 2
    assert done.stderr.count("error:") == 1, done.stderr
    assert "failed (go exited 1)" in done.stderr
    assert "410 Gone" in done.stderr
    assert "make cluster-bins" in done.stderr
    assert "build.log" in done.stderr


def test_kubebuilder_assets_are_preferred(tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl"):
        (assets / name).write_text("#!/bin/sh\n")
        (assets / name).chmod(0o755)
    env = _clean_env(tmp_path)
    env["KUBEBUILDER_ASSETS"] = str(assets)
    env["SLUICEWAY_GO"] = str(tmp_path / "no-go-here")
    done = _binaries_cli(env)
    assert done.returncode == 0, done.stderr
    assert f"kube-apiserver: {assets}/kube-apiserver" in done.stdout


def test_a_sweep_ends_what_a_dead_run_started_in_its_directory_but_never_recorded(tmp_path: Path) -> None:
    """The test kubelet records a pod's pid after starting it: killed in between, it leaves a
    process no pid file names. It works in the run's directory, which is how the sweep finds it."""
    run = tmp_path / "run"
    work = run / "pods" / "p" / "work"
    work.mkdir(parents=True)
    owner = subprocess.Popen(["true"])
    owner.wait()
    (run / "pids.json").write_text(json.dumps({"owner": {"pid": owner.pid, "start": "gone"}, "groups": []}))
    stray = subprocess.Popen(["sleep", "300"], cwd=work, start_new_session=True)
    elsewhere = subprocess.Popen(["sleep", "300"], cwd=tmp_path, start_new_session=True)
    said: list[str] = []
    try:
        assert sweep_run(run, said.append)
        assert stray.wait(10) == -signal.SIGKILL
        assert elsewhere.poll() is None  # only what works in the run's own directory
        assert any(f"pid {stray.pid}, not recorded" in m for m in said), said
    finally:
        for p in (stray, elsewhere):
            p.kill()
            p.wait()
