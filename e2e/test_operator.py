"""The operator against the real local control plane, a real Redis and real worker processes.

The operator runs as its own process (``python -m sluiceway_operator``) with the kubeconfig of its
own ServiceAccount, bound only to the ClusterRole in ``rbac.yaml``: every call it makes is checked by
the real RBAC authorizer. Intervals are short (loop 1 s, cooldown 3 s) so the module stays quick;
every wait has a generous timeout and assertions are on final states and recorded maxima.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from localcluster.cluster import LocalCluster
from localcluster.procs import free_port
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from sluiceway_operator.manifests import CONFIG_HASH_ANNOTATION, deployment_name, operator_rbac
from support import MaxReplicas, Operator, cond, get_dep, get_tq, install_crd, taskqueue, until, wait_ticks

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def operator(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    c = kube_cluster
    install_crd(c)
    ns = c.fresh_namespace("op")
    c.apply(operator_rbac(ns))
    kubeconfig = c.serviceaccount_kubeconfig(ns, "sluiceway-operator")
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    args = ["-A", "--worker-metrics-port", "0", "--http-port", str(port), "--log-format", "console"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluiceway_operator", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    yield Operator(proc, log, ns, port)
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_taskqueue_creates_rolls_repairs_and_cleans_up(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    c.apply(taskqueue("alpha", redis_url), ns)
    dep = until(operator, lambda: get_dep(c, ns, "alpha"), 30, "the worker Deployment")
    assert dep["spec"]["replicas"] == 0
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "TaskQueue"
    assert dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "sluiceway-operator"
    assert any(f["manager"] == "sluiceway-operator" for f in dep["metadata"]["managedFields"])
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SLUICEWAY_CONCURRENCY"]["value"] == "2"
    assert env["SLUICEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "sluiceway-redis"
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 15
    tq = until(operator, lambda: (t := get_tq(c, ns, "alpha")) and cond(t, "Ready") and t, 30, "status")
    assert cond(tq, "Ready")["reason"] == "IdleAtZero"
    assert tq["status"]["selector"] == "app.kubernetes.io/name=sluiceway-worker,sluiceway.dev/taskqueue=alpha"
    hash1 = dep["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]

    # A spec change rolls the pod template (new config hash, new env).
    c.kubectl(
        "patch",
        "taskqueue",
        "alpha",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec":{"concurrency":{"perPod":3}}}',
        check=True,
    )
    dep = until(
        operator,
        lambda: (
            (d := get_dep(c, ns, "alpha"))
            and d["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != hash1
            and d
        ),
        30,
        "the rolled Deployment",
    )
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SLUICEWAY_CONCURRENCY"]["value"] == "3"

    # An edit made outside the operator is repaired; a deleted Deployment is recreated.
    c.kubectl(
        "set",
        "env",
        f"deployment/{deployment_name('alpha')}",
        "-n",
        ns,
        "SLUICEWAY_CONCURRENCY=99",
        check=True,
    )
    until(
        operator,
        lambda: (
            {
                e["name"]: e.get("value")
                for e in get_dep(c, ns, "alpha")["spec"]["template"]["spec"]["containers"][0]["env"]
            }[  # type: ignore[index]
                "SLUICEWAY_CONCURRENCY"
            ]
            == "3"
        ),
        30,
        "the edit repaired",
    )
    uid = get_dep(c, ns, "alpha")["metadata"]["uid"]  # type: ignore[index]
    c.kubectl("delete", "deployment", deployment_name("alpha"), "-n", ns, "--wait=false", check=True)
    until(
        operator,
        lambda: (d := get_dep(c, ns, "alpha")) and d["metadata"]["uid"] != uid,
        30,
        "the Deployment recreated",
    )

    # Under deletionPolicy Purge, deletion purges the queue's Redis keys through the finalizer
    # (Retain, the default, is e2e/test_deletion.py).
    c.kubectl(
        "patch",
        "taskqueue",
        "alpha",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec":{"deletionPolicy":"Purge"}}',
        check=True,
    )
    keys = Keys(ns, "alpha")
    Publisher(redis_url).publish(f"{ns}/alpha", {"n": 1})
    assert r.exists(keys.ready)
    tq = get_tq(c, ns, "alpha")
    assert "sluiceway.dev/cleanup" in tq["metadata"].get("finalizers", [])
    c.kubectl("delete", "taskqueue", "alpha", "-n", ns, "--wait=false", check=True)
    until(
        operator,
        lambda: c.kubectl("get", "taskqueue", "alpha", "-n", ns).returncode != 0,
        30,
        "TaskQueue gone",
    )
    assert not list(r.scan_iter(match=f"sluiceway:{{{ns}/alpha}}:*"))


def test_backlog_scales_up_in_one_step_and_drains_to_zero(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    c.apply(taskqueue("burst", redis_url), ns)
    until(operator, lambda: get_dep(c, ns, "burst"), 30, "the worker Deployment")
    sampler = MaxReplicas(c, ns, "burst")
    # need = ceil(200 * 0.5 s / (2 per pod * 10 s)) = 5 = maxReplicas
    Publisher(redis_url).publish_batch(f"{ns}/burst", ({"n": i, "sleep": 0.2} for i in range(200)))
    until(
        operator,
        lambda: (get_dep(c, ns, "burst") or {}).get("spec", {}).get("replicas") == 5,
        30,
        "5 replicas",
    )
    tq = get_tq(c, ns, "burst")
    assert tq["status"]["lastScale"]["from"] == 0
    assert tq["status"]["lastScale"]["reason"] == "WakeFromZero"
    until(operator, lambda: r.hlen("test:done") == 200, 120, "every message done")
    until(
        operator,
        lambda: (get_dep(c, ns, "burst") or {}).get("spec", {}).get("replicas") == 0,
        60,
        "zero replicas",
    )
    seen = sampler.stop()
    assert seen[:2] == [0, 5], f"not one step from 0: {seen}"
    assert max(seen) == 5
    assert seen[-2:] == [1, 0], f"not N -> 1 -> 0: {seen}"
    events = c.get(f"/api/v1/namespaces/{ns}/events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == "burst"}
    assert "WakeFromZero" in reasons
    until(
        operator,
        lambda: cond(get_tq(c, ns, "burst"), "Ready").get("reason") == "IdleAtZero",
        30,
        "IdleAtZero",
    )


def test_qps_ceiling_holds_and_kubectl_scale_pins(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    # ceiling = ceil(qps 4 * ~0.46 s measured / 1 per pod) = 2 pods, though 300 messages "need" 6.
    c.apply(
        taskqueue(
            "capped",
            redis_url,
            rateLimit={"qps": 4},
            concurrency={"perPod": 1},
            scaling={
                "qpsHeadroom": 0,
                "maxReplicas": 6,
                "pollIntervalSeconds": 1,
                "assumedTaskSeconds": 0.5,
                "targetDrainSeconds": 10,
                "cooldownSeconds": 3,
                "scaleDownStabilizationSeconds": 2,
            },
        ),
        ns,
    )
    until(operator, lambda: get_dep(c, ns, "capped"), 30, "the worker Deployment")
    sampler = MaxReplicas(c, ns, "capped")
    Publisher(redis_url).publish_batch(f"{ns}/capped", ({"n": i, "sleep": 0.45} for i in range(300)))
    tq = until(
        operator,
        lambda: (t := get_tq(c, ns, "capped")) and cond(t, "Throttled").get("status") == "True" and t,
        30,
        "Throttled",
    )
    assert cond(tq, "Throttled")["reason"] == "QPSCeiling"
    until(
        operator,
        lambda: (get_dep(c, ns, "capped") or {}).get("spec", {}).get("replicas") == 2,
        30,
        "2 replicas",
    )
    wait_ticks(operator, c, 4, 30, "with live, measured workers")
    assert max(sampler.stop()) <= 2 + 1

    # kubectl scale on the TaskQueue pins the fleet; removing the pin hands it back to the loop.
    c.kubectl("scale", "taskqueue", "capped", "-n", ns, "--replicas=4", check=True)
    until(
        operator,
        lambda: (get_dep(c, ns, "capped") or {}).get("spec", {}).get("replicas") == 4,
        30,
        "pinned at 4",
    )
    until(
        operator,
        lambda: cond(get_tq(c, ns, "capped"), "Scaling").get("reason") == "Pinned",
        30,
        "Pinned condition",
    )
    wait_ticks(operator, c, 3, 30, "while pinned")
    assert get_dep(c, ns, "capped")["spec"]["replicas"] == 4  # type: ignore[index]
    c.kubectl(
        "patch",
        "taskqueue",
        "capped",
        "-n",
        ns,
        "--type=json",
        "-p",
        '[{"op":"remove","path":"/spec/replicas"}]',
        check=True,
    )
    until(
        operator,
        lambda: (get_dep(c, ns, "capped") or {}).get("spec", {}).get("replicas", 9) <= 3,
        30,
        "unpinned",
    )
    c.kubectl("delete", "taskqueue", "capped", "-n", ns, "--wait=false")


def test_deleted_worker_pods_messages_return_before_lease_expiry(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    # Leases last 60 s; the messages must come back long before that.
    c.apply(
        taskqueue("lease", redis_url, timeoutSeconds=120, scaling={"minReplicas": 2, "maxReplicas": 2}),
        ns,
    )
    Publisher(redis_url).publish_batch(f"{ns}/lease", ({"n": i, "sleep": 60} for i in range(4)))
    until(operator, lambda: sum(int(v) for v in r.hvals("test:seen")) == 4, 60, "4 messages started")
    keys = Keys(ns, "lease")
    victim = until(
        operator,
        lambda: next((b["pod"] for b in fleet.heartbeats(r, keys) if b["busy"] == 2), None),
        30,
        "a heartbeat showing 2 running tasks",
    )
    deleted_at = time.monotonic()
    c.kubectl("delete", "pod", victim, "-n", ns, "--grace-period=0", "--force", check=True)
    # The victim ran 2 messages; they start again on the replacement pod.
    until(
        operator,
        lambda: sum(int(v) for v in r.hvals("test:seen")) >= 6,
        45,
        "the victim's messages restarted",
    )
    assert time.monotonic() - deleted_at < 45  # well inside the 60 s lease
    assert b"returned the leases of a deleted pod" in operator.log.read_bytes()
    c.kubectl("delete", "taskqueue", "lease", "-n", ns, "--wait=false")


def test_bad_input_is_rejected_or_reported_and_isolated(
    kube_cluster: LocalCluster, operator: Operator, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    bad = taskqueue("broken", redis_url, function="not a function")
    done = c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(bad))
    assert done.returncode != 0
    assert "spec.function" in done.stderr

    # Admission checks cron ranges too, naming the field (e2e/test_schedules.py has the rest).
    cron = taskqueue(
        "cron", redis_url, schedules=[{"name": "nightly", "cron": "99 * * * *", "message": {"n": 1}}]
    )
    done = c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(cron))
    assert done.returncode != 0
    assert "spec.schedules[0].cron" in done.stderr

    # A missing Secret degrades that TaskQueue only.
    c.apply(
        taskqueue("nosecret", redis_url, coordination={"urlSecretRef": {"name": "missing", "key": "url"}}), ns
    )
    tq = until(
        operator,
        lambda: (
            (t := get_tq(c, ns, "nosecret")) and cond(t, "Degraded").get("reason") == "SecretMissing" and t
        ),
        30,
        "SecretMissing",
    )
    assert "missing" in cond(tq, "Degraded")["message"]
    c.apply(taskqueue("fine", redis_url), ns)
    until(
        operator,
        lambda: cond(get_tq(c, ns, "fine"), "Ready").get("reason") == "IdleAtZero",
        30,
        "the healthy one Ready",
    )

    # The operator runs least-privilege: it may read one Secret but never list them.
    sa = f"system:serviceaccount:{operator.namespace}:sluiceway-operator"
    assert c.kubectl("auth", "can-i", "get", "secrets", "-n", ns, "--as", sa).stdout.strip() == "yes"
    assert c.kubectl("auth", "can-i", "list", "secrets", "-n", ns, "--as", sa).stdout.strip() == "no"
    assert c.kubectl("auth", "can-i", "delete", "deployments", "-n", ns, "--as", sa).stdout.strip() == "no"
    # Health and metrics.
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.http_port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.http_port}/metrics", timeout=5) as resp:
        assert b"sluiceway_operator_decision_seconds" in resp.read()
    for name in ("nosecret", "fine"):
        c.kubectl("delete", "taskqueue", name, "-n", ns, "--wait=false")
    assert operator.proc.poll() is None
