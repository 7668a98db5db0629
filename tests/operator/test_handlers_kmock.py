"""The per-TaskQueue loop against a mock API server (kmock) and a real Redis: fast feedback on what
the operator writes, how often, and with which field manager."""

from __future__ import annotations

import base64
from typing import Any

import kmock as km
import pytest
import redis

from sluiceway.contract import Keys
from sluiceway_operator.autoscaler import Deps, PodView, TaskQueueLoop
from sluiceway_operator.kube import Credentials, Kube
from sluiceway_operator.settings import Config

pytestmark = pytest.mark.redis

NS = "team"
DEP = f"/apis/apps/v1/namespaces/{NS}/deployments/jobs-worker"
STATUS = f"/apis/sluiceway.dev/v1alpha1/namespaces/{NS}/taskqueues/jobs/status"
SECRET = f"/api/v1/namespaces/{NS}/secrets/sluiceway-redis"
EVENTS = f"/api/v1/namespaces/{NS}/events"


def body(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "jobs", "namespace": NS, "uid": "u-1", "generation": 1},
        "spec": {
            "image": "sluiceway/worker:1",
            "function": "app.tasks:run",
            "broker": {"type": "redis"},
            "scaling": {"targetDrainSeconds": 10, "assumedTaskSeconds": 1, "maxReplicas": 20},
            "concurrency": {"perPod": 5},
            **spec,
        },
    }


def requests(server: km.RawHandler, method: str, path: str) -> list[Any]:
    return [r for r in server if r.method.upper() == method and r.url.path == path]


@pytest.fixture
def api(kmock: km.KubernetesEmulator, redis_url: str) -> km.KubernetesEmulator:
    for res in (
        "v1/secrets",
        "v1/events",
        "v1/pods",
        "apps/v1/deployments",
        "sluiceway.dev/v1alpha1/taskqueues",
    ):
        kmock.resources[res] = {}  # type: ignore[assignment]
    url = base64.b64encode(redis_url.encode()).decode()
    kmock.objects["v1/secrets", NS, "sluiceway-redis"] = {
        "metadata": {"name": "sluiceway-redis"},
        "data": {"url": url},
    }
    kmock.objects["sluiceway.dev/v1alpha1/taskqueues", NS, "jobs"] = body()
    # The emulator cannot create by apply: the Deployment exists at 0, as after a first reconcile.
    kmock.objects["apps/v1/deployments", NS, "jobs-worker"] = {
        "metadata": {"name": "jobs-worker"},
        "spec": {"replicas": 0},
    }
    for pod in ("p-a", "p-b"):
        kmock.objects["v1/pods", NS, pod] = {"metadata": {"name": pod}}
    return kmock


@pytest.fixture
async def loop(api: km.KubernetesEmulator) -> Any:
    kube = Kube(Credentials(str(api.url), insecure=True))
    pods: list[PodView] = []
    yield TaskQueueLoop(NS, "jobs", Deps(kube=kube, config=Config()), pods=lambda: pods)
    await kube.close()


async def test_backlog_at_zero_applies_the_need_in_one_step_and_explains_it(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    r.lpush(Keys(NS, "jobs").ready, *[b'{"n":1}'] * 250)  # need = ceil(250 * 1 / (5 * 10)) = 5
    delay = await loop.safe_tick(body())
    assert delay == 2.0
    (apply,) = requests(api, "PATCH", DEP)
    assert apply.headers["Content-Type"] == "application/apply-patch+yaml"
    assert apply.params["fieldManager"] == "sluiceway-operator" and apply.params["force"] == "true"
    assert apply.data["spec"]["replicas"] == 5
    assert apply.data["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    (status,) = requests(api, "PATCH", STATUS)
    assert status.headers["Content-Type"] == "application/merge-patch+json"
    st = status.data["status"]
    assert st["lastScale"]["reason"] == "WakeFromZero" and st["lastScale"]["to"] == 5
    assert st["backlog"] == 250 and st["desiredReplicas"] == 5
    assert {c["type"] for c in st["conditions"]} == {
        "Ready",
        "Scaling",
        "Throttled",
        "ScalingLimited",
        "Degraded",
    }
    (event,) = requests(api, "POST", EVENTS)
    assert event.data["reason"] == "WakeFromZero" and event.data["involvedObject"]["kind"] == "TaskQueue"


async def test_a_quiet_tick_writes_nothing(api: km.KubernetesEmulator, loop: TaskQueueLoop) -> None:
    await loop.safe_tick(body())
    writes = len(requests(api, "PATCH", STATUS))
    loop.deployment = lambda: None
    await loop.safe_tick(body())
    await loop.safe_tick(body())
    assert len(requests(api, "PATCH", STATUS)) == writes == 1
    assert requests(api, "POST", EVENTS) == []  # nothing changed size: no Event


async def test_invalid_spec_sets_ready_false_with_the_field_and_touches_no_deployment(
    api: km.KubernetesEmulator, loop: TaskQueueLoop
) -> None:
    # A bad schedule marks only its schedule (test_schedules_kmock.py); a bad scaling field is the spec's.
    bad = body(concurrency={"perPod": 0})
    first = await loop.safe_tick(bad)
    second = await loop.safe_tick(bad)
    assert second > first  # backs off
    assert requests(api, "PATCH", DEP) == []
    (status,) = requests(api, "PATCH", STATUS)  # the second tick changed nothing: no write
    ready = next(c for c in status.data["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.concurrency.perPod" in ready["message"]
    assert len(requests(api, "POST", EVENTS)) == 1  # one Warning, not one per retry


async def test_missing_secret_is_degraded_not_fatal(api: km.KubernetesEmulator, loop: TaskQueueLoop) -> None:
    other = {"coordination": {"urlSecretRef": {"name": "nope", "key": "url"}}}
    await loop.safe_tick(body(**other))
    (status,) = requests(api, "PATCH", STATUS)
    degraded = next(c for c in status.data["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "SecretMissing" and "nope" in degraded["message"]


async def test_scale_down_sets_deletion_costs_only_where_they_changed(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, r: redis.Redis
) -> None:
    import json
    import time

    from sluiceway_operator.autoscaler import DeploymentView

    keys = Keys(NS, "jobs")
    now = time.time()
    for pod, busy in (("p-a", 0), ("p-b", 2)):
        hb = {
            "worker": pod, "pod": pod, "state": "running", "started": now - 60, "time": now, "interval": 2,
            "concurrency": 5, "busy": busy, "in_flight": busy, "processed": 9, "failed": 0,
            "dead_lettered": 0, "rate": 1.0, "latency_p50": 1.0, "latency_p95": 1.0, "latency_p99": 1.0,
            "version": "t",
        }  # fmt: skip
        r.set(keys.heartbeat(pod), json.dumps(hb))
        r.zadd(keys.workers, {pod: int(now * 1000)})
    pods = [PodView("p-a", now - 60, True, False, None), PodView("p-b", now - 60, True, False, "2")]
    loop.pods = lambda: pods
    loop.deployment = lambda: DeploymentView(replicas=3, generation=1, ready_replicas=3, config_hash=None)
    await loop.safe_tick(body(scaling={"scaleDownStabilizationSeconds": 0, "maxReplicas": 20}))
    patched = [q for q in api if q.method.upper() == "PATCH" and "/pods/" in q.url.path]
    assert [q.url.path.rsplit("/", 1)[-1] for q in patched] == ["p-a"]  # p-b already carries 2
    assert patched[0].data == {
        "metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "0"}}
    }
    # The scale-in waits one tick, so the ReplicaSet controller's cache holds the new costs.
    assert [q.data["spec"]["replicas"] for q in requests(api, "PATCH", DEP)] == [3]
    # The next tick sees the pod index before its watch caught up (p-a shows no cost yet): what the
    # loop wrote counts, so p-a is not patched again, and the scale-in goes ahead.
    await loop.safe_tick(body(scaling={"scaleDownStabilizationSeconds": 0, "maxReplicas": 20}))
    assert len([q for q in api if q.method.upper() == "PATCH" and "/pods/" in q.url.path]) == 1
    # busy p-b stays; one pod holds 2 busy tasks
    assert [q.data["spec"]["replicas"] for q in requests(api, "PATCH", DEP)] == [3, 1]


async def test_a_rotated_secret_rolls_the_pods(
    api: km.KubernetesEmulator, loop: TaskQueueLoop, redis_url: str
) -> None:
    # Issue 9 item 5: workers read the URL only at start, so a changed Secret must change the pod
    # template's config hash (a rolling update), and an unchanged one must not.
    from sluiceway_operator.manifests import CONFIG_HASH_ANNOTATION

    def template_hash() -> str:
        last = requests(api, "PATCH", DEP)[-1]
        return str(last.data["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])

    def secret(version: str) -> None:
        meta = {"name": "sluiceway-redis", "resourceVersion": version}
        data = {"url": base64.b64encode(redis_url.encode()).decode()}
        api.objects["v1/secrets", NS, "sluiceway-redis"] = {"metadata": meta, "data": data}

    secret("7")
    await loop.safe_tick(body())
    first = template_hash()
    loop._secret_versions = None  # the cache's TTL has passed
    await loop.safe_tick(body(replicas=1))  # a size change applies, with the same template
    assert template_hash() == first
    secret("8")
    loop._secret_versions = None
    await loop.safe_tick(body(replicas=1))
    assert template_hash() != first
