"""GitOps end to end: Argo CD's own application-controller and repo-server sync a TaskQueue from a git
repository on the local file system into the real local control plane, with the real operator.

The story, in one test (each step needs the one before):

1. Git holds a TaskQueue pinned to one worker whose image is not built yet: synced, and its health
   (our Lua script, in Argo CD's VM) is Progressing, since the worker never becomes ready.
2. A commit fixes the image: Healthy once Ready. The time from the commit to Healthy is the
   benchmark figure (the Application is refreshed at once, as a Git webhook would).
3. A manual edit of the TaskQueue is reverted by selfHeal.
4. The TaskQueue is removed from Git and pruned under ``deletionPolicy: Retain`` (the default) with
   200 messages queued: the queue keeps all 200, and re-adding the file runs every one of them.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from localcluster.argocd import ArgoCD, GitOps, bootstrap_objects, ensure_argocd
from localcluster.cluster import LocalCluster
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from support import ROOT, Operator, get_tq, taskqueue, until

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.timeout(900)]

APP = "taskqueues"


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

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    def write(self, name: str, obj: dict[str, Any] | None, message: str) -> float:
        """Write (or, with None, remove) taskqueues/<name>.yaml, commit and push; the push time."""
        path = self.work / "taskqueues" / f"{name}.yaml"
        if obj is None:
            git(self.work, "rm", "-q", str(path.relative_to(self.work)))
        else:
            path.write_text(yaml.safe_dump(obj, sort_keys=False))
            git(self.work, "add", str(path.relative_to(self.work)))
        git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        git(self.work, "push", "-q", "origin", "main")
        return time.monotonic()


def test_the_example_manifests_pass_server_side_validation(
    kube_cluster: LocalCluster, operator: Operator, gitops: GitOps, ns: str
) -> None:
    """deploy/argocd's Applications and TaskQueue against the real API server's schemas (the
    operator fixture installs the TaskQueue CRD, the gitops fixture Argo CD's)."""
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
        # `kubectl wait` fails outright while a just-created CRD has no status yet; poll instead.
        c.wait_for(lambda n=name: established(c, n), 60, f"CRD {name} established")
    namespace = c.fresh_namespace("argocd")
    c.apply(bootstrap_objects(namespace))
    g = GitOps(argocd, c.kubeconfig, namespace, tmp_path_factory.mktemp("argocd"))
    g.start()
    yield g
    g.stop()


def established(c: LocalCluster, name: str) -> bool:
    crd = c.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    conds = (crd.get("status") or {}).get("conditions") or []
    return any(x.get("type") == "Established" and x.get("status") == "True" for x in conds)


def application(namespace: str, repo: Repo, destination: str) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": APP, "namespace": namespace},
        "spec": {
            "project": "default",
            "source": {"repoURL": repo.url, "targetRevision": "main", "path": "taskqueues"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": destination},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True}},
        },
    }


def app_path(g: GitOps) -> str:
    return f"/apis/argoproj.io/v1alpha1/namespaces/{g.namespace}/applications/{APP}"


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


def refresh(c: LocalCluster, g: GitOps) -> None:
    # What a Git webhook does: ask for a refresh now instead of at the next resync.
    c.api.merge_patch(app_path(g), {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}})


def test_sync_health_self_heal_and_a_prune_that_loses_nothing(
    kube_cluster: LocalCluster,
    operator: Operator,
    gitops: GitOps,
    ns: str,
    redis_url: str,
    r: redis.Redis,
    tmp_path: Path,
) -> None:
    c = kube_cluster
    repo = Repo(tmp_path)

    def waiting(check: Any, timeout: float, what: str) -> Any:
        def guarded() -> Any:
            assert gitops.alive(), f"an Argo CD process exited\n{gitops.tail()}"
            return check()

        try:
            return until(operator, guarded, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{gitops.tail()}") from None

    # An image not built yet: the pinned worker can never start, so the TaskQueue stays Progressing.
    broken = taskqueue("orders", redis_url, replicas=1, image="sluiceway/orders-not-built-yet:1")
    broken["metadata"]["namespace"] = ns
    # A second, idle TaskQueue in the folder: removing "orders" later must not empty the
    # Application (automated sync never prunes everything unless allowEmpty is set).
    keeper = taskqueue("keeper", redis_url)
    keeper["metadata"]["namespace"] = ns
    repo.write("keeper", keeper, "keeper: an idle TaskQueue")
    repo.write("orders", broken, "orders: a TaskQueue whose image is not built yet")
    c.apply(application(gitops.namespace, repo, ns))

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
    before = c.get(app_path(gitops))["status"].get("reconciledAt")
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
    before = c.get(app_path(gitops))["status"].get("reconciledAt")
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
