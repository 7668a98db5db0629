"""kopf handlers: thin adapters from kopf's events to the per-TaskQueue loops.

- Indexes of worker pods and Deployments keep the loops free of per-tick list calls.
- A daemon per TaskQueue runs its ``TaskQueueLoop``; a TaskQueue event with a new generation wakes it.
- A pod DELETED event returns that worker's leases at once.
- The delete handler (our finalizer) purges the TaskQueue's Redis keys, bounded in time.

Handlers return nothing: the status schema does not preserve a ``kopf`` field, and the loops write
status themselves.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import datetime
import time
from collections.abc import Mapping
from typing import Any

import kopf
import structlog

from . import metrics
from .autoscaler import DeploymentView, Deps, PodView, TaskQueueLoop, deployment_view
from .manifests import GROUP, LABEL_MANAGED_BY, LABEL_TASKQUEUE, MANAGER
from .observe import backlog_source, purge, secret_value
from .scaling import POD_DELETION_COST
from .settings import Config
from .spec import SpecError, parse_spec

log = structlog.get_logger("sluiceway_operator")

TQ = (GROUP, "v1alpha1", "taskqueues")
FINALIZER = f"{GROUP}/cleanup"
OURS: dict[str, Any] = {LABEL_TASKQUEUE: kopf.PRESENT, LABEL_MANAGED_BY: MANAGER}


class Runtime:
    """Process-wide state, set by ``__main__`` before kopf starts."""

    config: Config = Config()
    deps: Deps | None = None
    loops: dict[tuple[str, str], TaskQueueLoop] = {}  # noqa: RUF012 - one process, one runtime
    http: metrics.HttpServer | None = None


def configure(config: Config) -> None:
    Runtime.config = config


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's progress and diff-base records go to annotations under our prefix: the status schema
    # prunes unknown fields, so status.kopf would silently vanish.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = 30  # WARNING: kopf's own per-handler Events would drown ours
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60]
    # Redis calls run in threads; the default pool (cores + 4) would queue 1,000 TaskQueues' ticks.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
    from .kube import Kube

    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.PermanentError("no Kubernetes credentials (in-cluster or kubeconfig)")
    Runtime.deps = Deps(kube=Kube.from_kopf(info), config=Runtime.config)
    if Runtime.config.http_port:
        Runtime.http = metrics.HttpServer(Runtime.config.http_port)
        await Runtime.http.start()
        Runtime.http.healthy = True


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if Runtime.http is not None:
        await Runtime.http.stop()
    if Runtime.deps is not None:
        await Runtime.deps.kube.close()
        Runtime.deps.redis.close()


# --- Indexes ---------------------------------------------------------------------------------------


def _started(status: Mapping[str, Any]) -> float | None:
    if status.get("phase") != "Running":
        return None
    for cs in status.get("containerStatuses") or []:
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        if started:
            return float(calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")))
    return None


@kopf.index("pods", labels=OURS)
def worker_pods(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    meta: kopf.Meta,
    status: kopf.Status,
    **_: Any,
) -> dict[tuple[str, str], PodView]:
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    view = PodView(
        name=name,
        running_since=_started(status),
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        cost=(meta.get("annotations") or {}).get(POD_DELETION_COST),
    )
    return {(namespace or "", labels[LABEL_TASKQUEUE]): view}


@kopf.index("deployments", labels=OURS)
def worker_deployments(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], DeploymentView]:
    return {(namespace or "", labels[LABEL_TASKQUEUE]): deployment_view(body)}


# --- TaskQueues ------------------------------------------------------------------------------------


@kopf.daemon(*TQ, cancellation_timeout=5.0)
async def taskqueue_loop(
    name: str, namespace: str | None, body: kopf.Body, stopped: kopf.DaemonStopped, **kwargs: Any
) -> None:
    assert Runtime.deps is not None
    worker_pods: kopf.Index[tuple[str, str], PodView] = kwargs["worker_pods"]
    worker_deployments: kopf.Index[tuple[str, str], DeploymentView] = kwargs["worker_deployments"]
    namespace = namespace or ""
    key = (namespace, name)

    def deployment() -> DeploymentView | None:
        found = list(worker_deployments.get(key, ()))
        return found[0] if found else None

    loop = TaskQueueLoop(
        namespace, name, Runtime.deps, pods=lambda: list(worker_pods.get(key, ())), deployment=deployment
    )
    Runtime.loops[key] = loop
    try:
        await loop.run(lambda: body, lambda: bool(stopped))
    finally:
        if Runtime.loops.get(key) is loop:
            del Runtime.loops[key]


@kopf.on.event(*TQ)
def taskqueue_changed(name: str, namespace: str | None, meta: kopf.Meta, **_: Any) -> None:
    # A new generation is a spec change (our status writes do not bump it): reconcile now.
    loop = Runtime.loops.get((namespace or "", name))
    if loop is not None and meta.get("generation") != loop.seen_generation:
        loop.wake.set()


@kopf.on.event("pods", labels=OURS)
async def worker_pod_event(
    type: str, name: str, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> None:
    if type != "DELETED":
        return
    loop = Runtime.loops.get((namespace or "", labels[LABEL_TASKQUEUE]))
    if loop is None:
        return
    try:
        await loop.pod_deleted(name)
    except Exception as exc:  # leases still expire on their own; never fail the watch
        log.warning("could not return a deleted pod's leases", pod=name, error=str(exc))


@kopf.on.delete(*TQ, retries=5, backoff=2.0, timeout=120)
async def taskqueue_deleted(
    name: str, namespace: str | None, spec: kopf.Spec, retry: int, runtime: datetime.timedelta, **_: Any
) -> None:
    """Purge the queue's Redis keys. Never blocks deletion forever: gives up after the timeout."""
    namespace = namespace or ""
    metrics.forget(namespace, name)
    deps = Runtime.deps
    assert deps is not None
    try:
        parsed = parse_spec(spec, name=name)
        ref = parsed.coordination_secret_ref or deps.config.default_secret
        if ref is None:
            return
        url = await secret_value(deps.kube, namespace, ref)
        source = await backlog_source(deps.kube, deps.redis, namespace, parsed, deps.redis.get(url), url)
        removed = await asyncio.wait_for(purge(source), timeout=deps.config.finalizer_timeout / 2)
        log.info("purged the queue's Redis keys", namespace=namespace, taskqueue=name, keys=removed)
    except SpecError:
        return  # an invalid spec never reached Redis
    except Exception as exc:
        if runtime.total_seconds() >= deps.config.finalizer_timeout or retry >= 4:
            log.error("giving up the Redis cleanup; deleting anyway", taskqueue=name, error=str(exc))
            return
        raise kopf.TemporaryError(f"Redis cleanup failed, retrying: {exc}", delay=2.0) from exc
