"""GitOps end to end: Argo CD's own application-controller and repo-server sync the Helm chart and
TaskQueues from a git repository on the local file system into the real local control plane.

The git repository holds what deploy/argocd/ shows: an app of apps whose ``apps/`` folder has an
Application for ``charts/sluiceway`` (sync wave -1, so Argo CD itself installs the CRD and the
operator) and one for the ``taskqueues/`` folder (wave 0). The chart's symlinked ``crds/`` and
``files/`` point inside the repository, which Argo CD's out-of-bounds symlink check allows. The
operator that Argo CD installs is the only one running: no operator fixture here.

The story, in one test (each step needs the one before):

0. The chart is synced and Healthy (its operator pod ready) before the TaskQueues are synced.
1. Git holds a TaskQueue pinned to one worker whose image is not built yet: synced, and its health
   (our Lua script, in Argo CD's VM) is Progressing, since the worker never becomes ready.
2. A commit fixes the image: Healthy once Ready. The time from the commit to Healthy is the
   benchmark figure (the Application is refreshed at once, as a Git webhook would). The chart's
   operator drains a burst of 50 messages.
3. A manual edit of the TaskQueue is reverted by selfHeal.
4. The TaskQueue is removed from Git and pruned under ``deletionPolicy: Retain`` (the default) with
   200 messages queued: the queue keeps all 200, and re-adding the file runs every one of them.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from helmsupport import CHART, token_kubeconfig
from localcluster.argocd import ArgoCD, GitOps, bootstrap_objects, ensure_argocd
from localcluster.cluster import LocalCluster
from localcluster.helm import ensure_helm
from localcluster.procs import free_port
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from support import CRD, ROOT, get_tq, install_crd, taskqueue

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(900)]

APP = "taskqueues"
CHART_APP = "sluiceway-operator"
ROOT_APP = "sluiceway-root"
RELEASE = "sluiceway"  # the chart names its ServiceAccount and Deployment "sluiceway-operator"
# What the chart's symlinks point at, copied into the test repository at the same relative paths.
CHART_SOURCES = (CRD, ROOT / "operator" / "sluiceway_operator" / "rbac.yaml")


def git(cwd: Path, *args: str) -> str:
    env_args = [
        "-c",
        "user.name=sluiceway-test",
        "-c",
        "user.email=test@sluiceway.invalid",
        "-c",
        "commit.gpgsign=false",
    ]
    return subprocess.run(
        ["git", *env_args, *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


class Repo:
    """A bare repository (what Argo CD reads, over file://) and a working clone that commits to it."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "repo.git"
        self.work = root / "work"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        subprocess.run(
            ["git", "clone", "-q", str(self.bare), str(self.work)], check=True, capture_output=True
        )
        git(self.work, "checkout", "-q", "-b", "main")
        (self.work / "taskqueues").mkdir()
        (self.work / "apps").mkdir()
        # The chart as it is in this repository, its symlinks kept as symlinks (git stores them so).
        shutil.copytree(CHART, self.work / CHART.relative_to(ROOT), symlinks=True)
        for src in CHART_SOURCES:
            dest = self.work / src.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        git(self.work, "add", "-A")

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def write(self, name: str, obj: dict[str, Any] | None, message: str, folder: str = "taskqueues") -> float:
        """Write (or, with None, remove) <folder>/<name>.yaml, commit and push; the push time."""
        path = self.work / folder / f"{name}.yaml"
        if obj is None:
            git(self.work, "rm", "-q", str(path.relative_to(self.work)))
        else:
            path.write_text(yaml.safe_dump(obj, sort_keys=False))
            git(self.work, "add", str(path.relative_to(self.work)))
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", "main")
        return time.monotonic()


def test_the_example_manifests_pass_server_side_validation(
    kube_cluster: LocalCluster, gitops: GitOps, ns: str
) -> None:
    """deploy/argocd's Applications and TaskQueue against the real API server's schemas (the
    gitops fixture installs Argo CD's CRDs)."""
    install_crd(kube_cluster)
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "deploy" / "argocd").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Application", "TaskQueue"):
                doc["metadata"]["namespace"] = gitops.namespace if doc["kind"] == "Application" else ns
                docs.append(doc)
    assert {d["kind"] for d in docs} == {"Application", "TaskQueue"} and len(docs) == 4
    out = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs))
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def argocd() -> ArgoCD:
    return ensure_argocd()


@pytest.fixture(scope="module")
def gitops(
    kube_cluster: LocalCluster, argocd: ArgoCD, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GitOps]:
    c = kube_cluster
    for crd in argocd.crds:
        c.kubectl("apply", "--server-side", "-f", str(crd), check=True)
    for name in ("applications.argoproj.io", "appprojects.argoproj.io"):
        c.wait_established(name)
    namespace = c.fresh_namespace("argocd")
    c.apply(bootstrap_objects(namespace, application_health=True))
    g = GitOps(argocd, c.kubeconfig, namespace, tmp_path_factory.mktemp("argocd"), helm=ensure_helm())
    g.start()
    yield g
    g.stop()


def application(
    name: str, namespace: str, wave: int, source: dict[str, Any], destination: str
) -> dict[str, Any]:
    """An Application as deploy/argocd/apps/ has them: automated, pruning, self-healing, in a wave."""
    sync: dict[str, Any] = {"automated": {"prune": True, "selfHeal": True}}
    if "helm" in source:
        sync["syncOptions"] = ["ServerSideApply=true"]  # the CRD is too large for client-side apply
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {"argocd.argoproj.io/sync-wave": str(wave)},
        },
        "spec": {
            "project": "default",
            "source": source,
            "destination": {"server": "https://kubernetes.default.svc", "namespace": destination},
            "syncPolicy": sync,
        },
    }


def root_application(namespace: str, repo: Repo) -> dict[str, Any]:
    """The app of apps (deploy/argocd/root-app.yaml). No selfHeal, so the test's own patch of the
    TaskQueues Application (ignoreDifferences) holds until the next commit."""
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": ROOT_APP, "namespace": namespace},
        "spec": {
            "project": "default",
            "source": {"repoURL": repo.url, "targetRevision": "main", "path": "apps"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": namespace},
            "syncPolicy": {"automated": {"prune": True}},
        },
    }


def chart_values(c: LocalCluster, operator_ns: str, tmp_path: Path) -> dict[str, Any]:
    """The chart's values for the local cluster (as helmsupport.Release sets them)."""
    kubeconfig = token_kubeconfig(c, tmp_path, operator_ns, f"{RELEASE}-operator")
    return {
        "image": {"repository": "sluiceway/operator"},
        "metrics": {"port": free_port()},
        "config": {"workerMetricsPort": 0},  # pods share the host network here
        "log": {"format": "console"},
        "extraEnv": [{"name": "KUBECONFIG", "value": str(kubeconfig)}],
    }


def app_path(g: GitOps, name: str = APP) -> str:
    return f"/apis/argoproj.io/v1alpha1/namespaces/{g.namespace}/applications/{name}"


def app_state(c: LocalCluster, g: GitOps, name: str) -> tuple[str, str]:
    """(sync status, health) of an Application, ("", "") while it does not exist."""
    got = c.kubectl("get", "application", name, "-n", g.namespace, "-o", "json")
    if got.returncode != 0:
        return "", ""
    status = yaml.safe_load(got.stdout).get("status") or {}
    return (
        str((status.get("sync") or {}).get("status", "")),
        str((status.get("health") or {}).get("status", "")),
    )


def tq_health(c: LocalCluster, g: GitOps, name: str) -> tuple[str, str]:
    """(the TaskQueue's sync status, the Application's health) as the Application reports them.

    Argo CD 3.x no longer persists each resource's health in the Application
    (``controller.resource.health.persist`` is false by default); the Application's own health is the
    aggregate of its top-level resources, here the one TaskQueue (its Deployment is a child).
    """
    status = c.get(app_path(g)).get("status") or {}
    for res in status.get("resources") or []:
        if res.get("kind") == "TaskQueue" and res.get("name") == name:
            return str(res.get("status", "")), str((status.get("health") or {}).get("status", ""))
    return "", ""


def compared_since(c: LocalCluster, g: GitOps, before: str | None) -> bool:
    app = c.get(app_path(g))
    pending = "argocd.argoproj.io/refresh" in (app["metadata"].get("annotations") or {})
    return not pending and (app.get("status") or {}).get("reconciledAt") != before


def last_comparison(c: LocalCluster, g: GitOps) -> str | None:
    """The Application's ``reconciledAt``, once the wall clock has left its second.

    ``reconciledAt`` has one-second resolution: a comparison made in the same second as the one
    read here would leave it unchanged, and ``compared_since`` would wait for a change that never
    comes. Waiting for the next second first makes any later comparison show."""
    before: str | None = (c.get(app_path(g)).get("status") or {}).get("reconciledAt")
    if before:
        stamp = datetime.datetime.fromisoformat(before.replace("Z", "+00:00")).timestamp()
        while time.time() < stamp + 1.0:
            time.sleep(0.05)
    return before


def refresh(c: LocalCluster, g: GitOps) -> None:
    # What a Git webhook does: ask for a refresh now instead of at the next resync.
    c.api.merge_patch(app_path(g), {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}})


@pytest.fixture
def operator_ns(kube_cluster: LocalCluster, gitops: GitOps) -> Iterator[str]:
    """The chart's namespace. Torn down after ``ns`` (the test asks for it first), so the chart's
    operator still runs the TaskQueues' finalizers; then the Applications go, and the operator with
    them, so that no later test module meets a second operator."""
    c = kube_cluster
    name = c.fresh_namespace("gitops-op")
    yield name
    for app in (ROOT_APP, CHART_APP, APP):
        c.kubectl("delete", "application", app, "-n", gitops.namespace, "--wait=true", "--timeout=60s")
    c.kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s")


def test_sync_the_chart_then_health_self_heal_and_a_prune_that_loses_nothing(
    kube_cluster: LocalCluster,
    gitops: GitOps,
    operator_ns: str,
    ns: str,
    redis_url: str,
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    c = kube_cluster
    repo = Repo(tmp_path / "git")

    def operator_log() -> str:
        pods = c.get(f"/api/v1/namespaces/{operator_ns}/pods")["items"]
        return "\n".join(c.pod_log(operator_ns, p["metadata"]["name"])[-3000:] for p in pods)

    def waiting(check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert gitops.alive(), f"an Argo CD process exited\n{gitops.tail()}"
            try:
                last = check()
            except Exception as exc:  # a transient API error is just another poll
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.3)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what} (last: {last!r})\n{gitops.tail()}\n"
            f"--- the chart's operator ---\n{operator_log()}"
        )

    # An image not built yet: the pinned worker can never start, so the TaskQueue stays Progressing.
    broken = taskqueue("orders", redis_url, replicas=1, image="sluiceway/orders-not-built-yet:1")
    broken["metadata"]["namespace"] = ns
    # A second, idle TaskQueue in the folder: removing "orders" later must not empty the
    # Application (automated sync never prunes everything unless allowEmpty is set).
    keeper = taskqueue("keeper", redis_url)
    keeper["metadata"]["namespace"] = ns
    repo.write("keeper", keeper, "keeper: an idle TaskQueue")
    repo.write("orders", broken, "orders: a TaskQueue whose image is not built yet")
    chart_source = {
        "repoURL": repo.url,
        "targetRevision": "main",
        "path": "charts/sluiceway",
        "helm": {"releaseName": RELEASE, "valuesObject": chart_values(c, operator_ns, tmp_path / "sa")},
    }
    tq_source = {"repoURL": repo.url, "targetRevision": "main", "path": "taskqueues"}
    apps = (
        application(CHART_APP, gitops.namespace, -1, chart_source, operator_ns),
        application(APP, gitops.namespace, 0, tq_source, ns),
    )
    for app in apps:
        repo.write(app["metadata"]["name"], app, f"{app['metadata']['name']}: Application", "apps")
    started = time.monotonic()
    c.apply(root_application(gitops.namespace, repo))

    # 0. Wave -1 first: Argo CD installs the chart (CRD, RBAC, operator) and waits for it to be
    # Healthy, which needs the operator pod ready, before it creates the TaskQueues' Application.
    waiting(lambda: app_state(c, gitops, CHART_APP)[0] == "Synced", 180, "the chart synced")
    if app_state(c, gitops, CHART_APP)[1] != "Healthy":
        assert app_state(c, gitops, APP) == ("", ""), "wave 0 synced before wave -1 was Healthy"
    waiting(lambda: app_state(c, gitops, CHART_APP) == ("Synced", "Healthy"), 180, "the chart Healthy")
    print(f"\n[gitops figures] root Application to chart synced+Healthy: {time.monotonic() - started:.1f} s")
    deployments = c.get(f"/apis/apps/v1/namespaces/{operator_ns}/deployments")["items"]
    assert [d["metadata"]["name"] for d in deployments] == [f"{RELEASE}-operator"]

    # 1. Synced, and Progressing while the one pinned worker cannot become ready.
    waiting(lambda: tq_health(c, gitops, "orders") == ("Synced", "Progressing"), 180, "Synced + Progressing")
    assert get_tq(c, ns, "orders")["spec"]["deletionPolicy"] == "Retain"

    # 2. The fix lands in Git: Healthy once Ready.
    fixed = taskqueue("orders", redis_url, replicas=1)
    fixed["metadata"]["namespace"] = ns
    committed = repo.write("orders", fixed, "orders: the real image")
    refresh(c, gitops)
    waiting(lambda: tq_health(c, gitops, "orders") == ("Synced", "Healthy"), 120, "Healthy after the fix")
    print(f"[gitops figures] commit to synced+Healthy TaskQueue: {time.monotonic() - committed:.1f} s")
    # The operator Argo CD installed (the only one running) made it Ready; it drains a burst.
    burst = [str(1000 + i) for i in range(50)]
    Publisher(redis_url).publish_batch(f"{ns}/orders", ({"n": int(n)} for n in burst))
    waiting(lambda: all(r.hget("test:done", n) for n in burst), 180, "the burst of 50 drained")

    # 3. A manual edit is reverted by selfHeal.
    c.kubectl(
        "patch",
        "taskqueue",
        "orders",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec":{"timeoutSeconds":77}}',
        check=True,
    )
    edited = time.monotonic()
    waiting(lambda: get_tq(c, ns, "orders")["spec"]["timeoutSeconds"] == 5, 120, "the manual edit reverted")
    print(f"[gitops figures] manual edit self-healed in {time.monotonic() - edited:.1f} s")

    # kubectl scale on a TaskQueue whose spec.replicas is in Git: selfHeal puts Git's value back...
    c.kubectl("scale", "taskqueue/orders", "-n", ns, "--replicas=2", check=True)
    waiting(lambda: get_tq(c, ns, "orders")["spec"]["replicas"] == 1, 60, "the hand scale reverted")
    # ...unless the Application ignores the field and syncs respecting that (docs/gitops.md).
    ignoring = {
        "spec": {
            "ignoreDifferences": [
                {"group": "sluiceway.dev", "kind": "TaskQueue", "jsonPointers": ["/spec/replicas"]}
            ],
            "syncPolicy": {"syncOptions": ["RespectIgnoreDifferences=true"]},
        }
    }
    c.api.merge_patch(app_path(gitops), ignoring)
    before = last_comparison(c, gitops)
    c.kubectl("scale", "taskqueue/orders", "-n", ns, "--replicas=2", check=True)
    refresh(c, gitops)
    waiting(lambda: compared_since(c, gitops, before), 60, "a full comparison after the scale")
    assert get_tq(c, ns, "orders")["spec"]["replicas"] == 2
    assert tq_health(c, gitops, "orders")[0] == "Synced"
    c.api.merge_patch(
        app_path(gitops), {"spec": {"ignoreDifferences": None, "syncPolicy": {"syncOptions": None}}}
    )
    waiting(lambda: get_tq(c, ns, "orders")["spec"]["replicas"] == 1, 60, "Git's replicas back")

    # kubectl scale on a TaskQueue whose Git manifest leaves spec.replicas out: not a diff, so a full
    # comparison keeps the hand-set pin (docs/gitops.md, "Scaling by hand").
    before = last_comparison(c, gitops)
    c.kubectl("scale", "taskqueue/keeper", "-n", ns, "--replicas=1", check=True)
    refresh(c, gitops)
    waiting(lambda: compared_since(c, gitops, before), 60, "a full comparison after the scale")
    assert get_tq(c, ns, "keeper")["spec"]["replicas"] == 1
    assert tq_health(c, gitops, "keeper")[0] == "Synced"
    c.kubectl(
        "patch",
        "taskqueue",
        "keeper",
        "-n",
        ns,
        "--type=json",
        "-p",
        '[{"op":"remove","path":"/spec/replicas"}]',
        check=True,
    )

    # 4. Park the fleet at zero (Suspended), queue 200 messages, then prune the TaskQueue from Git.
    parked = taskqueue("orders", redis_url, replicas=0)
    parked["metadata"]["namespace"] = ns
    repo.write("orders", parked, "orders: park at zero")
    refresh(c, gitops)
    waiting(lambda: tq_health(c, gitops, "orders")[1] == "Suspended", 120, "Suspended at zero")
    Publisher(redis_url).publish_batch(f"{ns}/orders", ({"n": i} for i in range(200)))
    repo.write("orders", None, "remove orders")
    refresh(c, gitops)
    waiting(lambda: c.kubectl("get", "taskqueue", "orders", "-n", ns).returncode != 0, 120, "the prune")
    assert r.llen(Keys(ns, "orders").ready) == 200, "the prune lost queued messages"

    # Back in Git (autoscaling now): every queued message runs.
    back = taskqueue("orders", redis_url)
    back["metadata"]["namespace"] = ns
    repo.write("orders", back, "orders: back")
    refresh(c, gitops)
    waiting(lambda: all(r.hget("test:done", str(i)) for i in range(200)), 180, "all 200 messages done")
