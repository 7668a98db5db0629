"""The Helm chart (charts/sluiceway) with the real Helm 3 CLI against the real local control plane.

Helm comes from ``localcluster.helm`` (``$HELM`` or a cached build; ``make test`` builds it first).

The test kubelet mounts no ServiceAccount token, so the chart's operator pod gets ``KUBECONFIG``
through ``extraEnv``: a kubeconfig whose exec credential plugin asks the API server for a token of
the chart's own ServiceAccount (a TokenRequest, which is what a token mount holds). The operator
then acts with exactly the RBAC the chart installed; the pod's image maps to the local
``python -m sluiceway_operator`` (e2e/localcluster/images.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from helmsupport import CHART, Helm, Release
from localcluster.binaries import KUBE_VERSION
from localcluster.cluster import LocalCluster
from localcluster.helm import ensure_helm
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from sluiceway_operator.manifests import deployment_name, operator_rbac
from support import CRD, cond, get_tq, install_crd, replicas, taskqueue

# Every test here needs Helm, a Go-built tool like the control plane: keep them out of `make test-unit`.
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return ensure_helm()


@pytest.fixture
def helm(helm_bin: Path, tmp_path: Path) -> Helm:
    return Helm(helm_bin, tmp_path / "helm-home")


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    out = helm.run("template", "t", str(CHART), "--kube-version", KUBE_VERSION, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples: rules compared by what they grant, not how they are split."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


SOURCE_RULES = next(d for d in operator_rbac() if d["kind"] == "ClusterRole")["rules"]
ALL_OPTIONS = [
    "--set=metrics.serviceMonitor.enabled=true",
    "--set=metrics.prometheusRule.enabled=true",
    "--set=metrics.grafanaDashboard.enabled=true",
]


# --- No cluster: the chart itself -------------------------------------------------------------------


def test_chart_crd_is_the_repositorys_crd(helm: Helm) -> None:
    shown = helm.run("show", "crds", str(CHART)).stdout
    assert list(yaml.safe_load_all(shown)) == list(yaml.safe_load_all(CRD.read_text()))


def test_chart_rbac_is_rbac_yaml_cluster_wide_and_split_by_scope_when_namespaced(helm: Helm) -> None:
    docs = render(helm)
    (role,) = by_kind(docs, "ClusterRole")
    assert role["rules"] == SOURCE_RULES
    assert not by_kind(docs, "Role")

    docs = render(helm, "--set=watchNamespaces={team-a,team-b}")
    (cluster_role,) = by_kind(docs, "ClusterRole")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    cluster_wide = rule_set(cluster_role["rules"])
    assert {r for _, r, _ in cluster_wide} <= {"customresourcedefinitions", "namespaces"}
    for role in roles:
        # Together the Role and the ClusterRole grant exactly what rbac.yaml grants.
        assert rule_set(role["rules"]) | cluster_wide == rule_set(SOURCE_RULES)
    (dep,) = by_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_chart_pod_is_restricted_and_takes_scheduling_values(helm: Helm) -> None:
    docs = render(
        helm,
        "--set=nodeSelector.pool=ops",
        "--set=tolerations[0].key=ops,tolerations[0].operator=Exists",
        "--set=imagePullSecrets[0].name=regcred",
        "--set=image.digest=sha256:" + "a" * 64,
        "--set=log.level=debug,log.format=console",
    )
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["nodeSelector"] == {"pool": "ops"}
    assert pod["tolerations"] == [{"key": "ops", "operator": "Exists"}]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert container["image"] == "ghcr.io/sluiceway/operator@sha256:" + "a" * 64
    assert "--log-level=DEBUG" in container["args"] and "--log-format=console" in container["args"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_helm_lint_strict(helm: Helm) -> None:
    helm.run("lint", "--strict", str(CHART))
    helm.run("lint", "--strict", str(CHART), *ALL_OPTIONS, "--set=watchNamespaces={a}")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("config.workerMetricsPort=-1", "at '/config/workerMetricsPort'"),
        ("watchNamespaces={Not_A_Namespace}", "at '/watchNamespaces/0'"),
        ("log.format=xml", "at '/log/format'"),
        ("metrics.prometheusRule.degradedFor=soon", "at '/metrics/prometheusRule/degradedFor'"),
        ("replicas=2", "additional properties 'replicas' not allowed"),
    ],
)
def test_a_wrong_value_fails_with_its_path(helm: Helm, value: str, message: str) -> None:
    proc = helm.run("template", "t", str(CHART), f"--set={value}", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# --- Against the local control plane ----------------------------------------------------------------


def test_template_passes_the_api_servers_dry_run(kube_cluster: LocalCluster, helm: Helm) -> None:
    c = kube_cluster
    install_crd(c)
    ns = c.fresh_namespace("helm-dry")
    c.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", check=True)
    for extra in ([], ["--set=watchNamespaces={" + ns + "}", "--set=metrics.grafanaDashboard.enabled=true"]):
        out = helm.run(
            "template", "dry", str(CHART), "-n", ns, "--kube-version", KUBE_VERSION, "--include-crds", *extra
        ).stdout
        applied = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=out)
        assert applied.returncode == 0, applied.stderr
        assert "PodSecurity" not in applied.stderr, applied.stderr  # the pod meets "restricted"
    lax = helm.run(
        "template", "dry", str(CHART), "-n", ns, "--kube-version", KUBE_VERSION,
        "--set=securityContext.allowPrivilegeEscalation=true",
    ).stdout  # fmt: skip
    warned = c.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=lax)
    assert 'would violate PodSecurity "restricted:latest"' in warned.stderr, warned.stderr
    # helm install applies values.schema.json before sending anything.
    helm.kubeconfig = c.kubeconfig
    failed = helm.run("install", "bad", str(CHART), "-n", ns, "--set=metrics.port=0", check=False)
    assert failed.returncode != 0 and "at '/metrics/port'" in failed.stderr, failed.stderr
    assert not c.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]
    assert "bad" not in helm.run("list", "-n", ns, "-a", "-q").stdout
    # The check is real: the API server rejects what the schemas reject.
    bad = out.replace("containerPort:", "containerPortt:", 1)
    rejected = c.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", ns, "-f", "-", input=bad)
    assert rejected.returncode != 0 and "containerPortt" in rejected.stderr


def test_the_namespaced_split_matches_the_api_servers_scopes(kube_cluster: LocalCluster, helm: Helm) -> None:
    """A resource rbac.yaml gains later lands in the ClusterRole or the Roles by its real scope."""
    out = kube_cluster.kubectl("api-resources", "--namespaced=false", "-o", "name", check=True).stdout
    cluster_scoped = {name.split(".", 1)[0] for name in out.split()}
    docs = render(helm, "--set=watchNamespaces={team-a}")
    (cluster_role,) = by_kind(docs, "ClusterRole")
    (role,) = by_kind(docs, "Role")
    granted_cluster_wide = {r for _, r, _ in rule_set(cluster_role["rules"])}
    granted_per_namespace = {r for _, r, _ in rule_set(role["rules"])}
    for _, resource, _ in rule_set(SOURCE_RULES):
        if resource.split("/", 1)[0] in cluster_scoped:
            assert resource in granted_cluster_wide, (
                f"{resource} is cluster-scoped: it belongs in the ClusterRole"
            )
        else:
            assert resource in granted_per_namespace, f"{resource} is namespaced: it belongs in the Roles"
            assert resource not in granted_cluster_wide, f"{resource} must not be granted cluster-wide"


@pytest.fixture
def release(kube_cluster: LocalCluster, helm: Helm, tmp_path: Path) -> Iterator[Release]:
    helm.kubeconfig = kube_cluster.kubeconfig
    r = Release(kube_cluster, helm, tmp_path)
    yield r
    r.uninstall()


def wait_for(c: LocalCluster, check: Any, timeout: float, what: str, release: Release) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what} (last: {last!r})\n{release.pod_log()}"
    )


def forget(c: LocalCluster, ns: str, name: str) -> None:
    """Delete a TaskQueue whose operator is gone: its finalizer would hold it (and its namespace) forever."""
    c.kubectl("patch", "taskqueue", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    c.kubectl("delete", "taskqueue", name, "-n", ns, "--wait=false")


@pytest.mark.cluster
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_install_reconciles_and_drains_then_upgrade_rollback_and_uninstall_keep_the_work(
    kube_cluster: LocalCluster, release: Release, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    install_crd(c)  # crds/ is skipped when the CRD exists (other modules install it): Helm's rule
    seconds = release.install()
    c.apply(taskqueue("hq", redis_url), ns)
    ready = lambda: (t := get_tq(c, ns, "hq")) and cond(t, "Ready").get("status") == "True" and t  # noqa: E731
    wait_for(c, ready, 60, "the TaskQueue Ready under the chart's operator", release)
    print(f"\n[helm figures] helm install --wait {seconds:.1f} s")

    messages = 200
    Publisher(redis_url).publish_batch(f"{ns}/hq", ({"n": i} for i in range(messages)))
    wait_for(c, lambda: r.hlen("test:done") >= messages, 180, "the burst drained", release)
    assert sorted(int(k) for k in r.hkeys("test:done")) == list(range(messages))

    # Upgrade with changed values: the operator restarts with them and keeps reconciling.
    release.upgrade("--set=log.level=DEBUG", "--set=podAnnotations.sluiceway\\.dev/test=upgraded")
    assert "--log-level=DEBUG" in release.args()
    c.kubectl(
        "patch", "taskqueue", "hq", "-n", ns, "--type=merge", "-p", '{"spec":{"concurrency":{"perPod":3}}}'
    )
    wait_for(
        c,
        lambda: (
            (d := c.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{deployment_name('hq')}"))
            and {
                e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
            }.get("SLUICEWAY_CONCURRENCY")
            == "3"
        ),
        60,
        "the upgraded operator to apply a spec change",
        release,
    )
    release.helm.run("rollback", release.name, "1", "-n", release.namespace, "--wait", "--timeout=180s")
    assert "--log-level=INFO" in release.args()
    assert [h["revision"] for h in release.history()] == [1, 2, 3]

    # Queued work survives the uninstall: pin the fleet to zero, queue 100, uninstall.
    c.kubectl("patch", "taskqueue", "hq", "-n", ns, "--type=merge", "-p", '{"spec":{"replicas":0}}')
    wait_for(
        c, lambda: replicas(c, ns, "hq") == 0 and not any(c.pods_processes(ns).values()), 90, "zero", release
    )
    Publisher(redis_url).publish_batch(f"{ns}/hq", ({"n": messages + i} for i in range(100)))
    release.uninstall()
    gone = lambda: not c.get(f"/api/v1/namespaces/{release.namespace}/pods")["items"]  # noqa: E731
    wait_for(c, gone, 60, "the operator pod gone", release)
    assert c.kubectl("get", "crd", "taskqueues.sluiceway.dev").returncode == 0
    assert get_tq(c, ns, "hq")["metadata"]["name"] == "hq"
    stats = fleet.queue_stats(r, Keys(ns, "hq"))
    assert stats.backlog == 100, stats
    forget(c, ns, "hq")


@pytest.mark.cluster
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_namespaced_install_watches_only_its_namespaces_and_is_denied_other_secrets(
    kube_cluster: LocalCluster, helm: Helm, tmp_path: Path, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    helm.kubeconfig = c.kubeconfig
    install_crd(c)
    other = c.fresh_namespace("helm-other")
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "sluiceway-redis"},
            "stringData": {"url": redis_url},
        },
        other,
    )
    release = Release(c, helm, tmp_path, "--set=watchNamespaces={" + ns + "}")
    try:
        release.install()
        sa = f"system:serviceaccount:{release.namespace}:{release.fullname}"

        def can(verb: str, resource: str, where: str) -> str:
            return c.kubectl("auth", "can-i", verb, resource, "-n", where, "--as", sa).stdout.strip()

        assert can("get", "secrets", ns) == "yes"
        assert can("get", "secrets", other) == "no"
        assert can("delete", "pods", other) == "no"
        assert can("delete", "pods", "kube-system") == "no"
        # The operator's own credentials, not impersonation: a real 403 from the API server.
        token = c.serviceaccount_kubeconfig(release.namespace, release.fullname)
        denied = c.kubectl("get", "secret", "sluiceway-redis", "-n", other, kubeconfig=token)
        assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
        assert c.kubectl("get", "secret", "sluiceway-redis", "-n", ns, kubeconfig=token).returncode == 0

        c.apply(taskqueue("mine", redis_url), ns)
        c.apply(taskqueue("theirs", redis_url), other)
        ready = lambda: (t := get_tq(c, ns, "mine")) and cond(t, "Ready").get("status") == "True"  # noqa: E731
        wait_for(c, ready, 60, "the watched namespace's TaskQueue Ready", release)
        # The operator never saw the other namespace: no status, no finalizer, no Deployment.
        theirs = get_tq(c, other, "theirs")
        assert "status" not in theirs and not theirs["metadata"].get("finalizers"), theirs
        assert c.kubectl("get", "deployment", deployment_name("theirs"), "-n", other).returncode != 0
        c.kubectl("delete", "taskqueue", "mine", "-n", ns, "--wait=true", "--timeout=60s", check=True)
    finally:
        release.uninstall()
        c.kubectl("delete", "taskqueue", "--all", "-n", other, "--wait=false")
