"""One control loop per TaskQueue: observe, decide (``scaling.decide``), apply, explain.

Every write to a TaskQueue's Deployment happens in its loop, one tick at a time, so reconciling and
scaling can never race. Spec changes wake the loop at once; otherwise it ticks every
``spec.scaling.pollIntervalSeconds``. A failing tick sets Degraded on this TaskQueue only and backs
off exponentially; nothing propagates to other loops.

Restart safety: the in-memory ``ScalingState`` starts empty, and ``decide`` treats the first tick as
activity, so a restart can delay a scale-to-zero by one cooldown but never causes one early. The
current size is read back from the Deployment, so a restart neither re-scales nor recreates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis
import structlog

from sluiceway.contract import Keys

from . import events, metrics
from .backlog.base import BacklogSource
from .conditions import (
    ConditionReason,
    ConditionType,
    condition,
    rfc3339,
    set_condition,
    status_patch,
    without,
)
from .deletion import conflict_message
from .faults import redis_problem, secret_target
from .kube import ApiError, Kube, secret_path, taskqueue_status_path
from .manifests import CONFIG_HASH_ANNOTATION, MANAGER, OperatorSettings, config_hash, status_selector
from .observe import (
    ObservationError,
    RedisPool,
    backlog_source,
    orphaned_workers,
    read_queue,
    requeue_worker,
    secret_value,
)
from .observe import observation as make_observation
from .reconcile import apply_deployment, cost_changes, delete_pod, get_deployment, render, set_deletion_costs
from .scaling import Decision, PodInfo, Policy, ScalingState, decide, deletion_costs, silent_pods
from .schedules import Schedules
from .schedules import degraded as schedules_degraded
from .settings import Config
from .spec import SecretKeyRef, SpecError, TaskQueueSpec, keys_for, parse_spec
from .status import Fault, conditions_for, fault_status, observed_status

log = structlog.get_logger("sluiceway_operator")

ORPHAN_SWEEP_SECONDS = 10.0  # how often a loop looks for leases of workers whose pods are gone


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    running_since: float | None  # unix s the container started; None = not running
    ready: bool
    deleting: bool
    cost: str | None  # current pod-deletion-cost annotation


@dataclass(frozen=True, slots=True)
class DeploymentView:
    replicas: int
    generation: int
    ready_replicas: int
    config_hash: str | None


@dataclass
class Deps:
    kube: Kube
    config: Config
    redis: RedisPool = field(default_factory=RedisPool)

    @property
    def settings(self) -> OperatorSettings:
        return self.config.operator_settings()


PodsFn = Callable[[], Sequence[PodView]]
DeploymentFn = Callable[[], DeploymentView | None]
ConflictFn = Callable[[str], str | None]  # resolved queue -> the older TaskQueue that owns it, if any


def deployment_view(obj: Mapping[str, Any]) -> DeploymentView:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    return DeploymentView(
        replicas=int(spec.get("replicas", 1)),
        generation=int(meta.get("generation", 0)),
        ready_replicas=int(status.get("readyReplicas", 0)),
        config_hash=(meta.get("annotations") or {}).get(CONFIG_HASH_ANNOTATION),
    )


class TaskQueueLoop:
    def __init__(
        self,
        namespace: str,
        name: str,
        deps: Deps,
        *,
        pods: PodsFn,
        deployment: DeploymentFn | None = None,
        conflict: ConflictFn | None = None,
    ) -> None:
        self.namespace, self.name, self.deps = namespace, name, deps
        self.pods = pods
        self.deployment = deployment
        self.conflict = conflict
        self.conflict_owner: str | None = None  # the owner last reported in an Event
        self.wake = asyncio.Event()
        self.state = ScalingState()
        self.status: dict[str, Any] | None = None  # what we last wrote (the watch may lag behind)
        self.applied_hash: str | None = None
        self.applied_generation = 0
        self.applied_replicas: int | None = None
        self.costs_written: dict[str, str] = {}  # pod -> the deletion cost we last wrote
        self.deferred_scale_in: int | None = None  # the size a scale-in was held at for its costs
        self.failures = 0
        self.last_fault: str | None = None
        self.last_reason: str | None = None
        self.alarm_since: float | None = None
        self.seen_generation: int | None = None
        self.client: redis.Redis | None = None
        self.keys: Keys | None = None
        self.source: BacklogSource | None = None
        self._secret: tuple[str, float] | None = None
        self._secret_versions: tuple[dict[str, str], float] | None = None
        self._secret_ref: SecretKeyRef | None = None
        self._acked: tuple[int, float] | None = None
        self.last_sweep = 0.0  # so the first tick after a (re)start sweeps at once
        self.schedules = Schedules(namespace, name, deps.kube, wake=self.wake.set)
        self.log = log.bind(namespace=namespace, taskqueue=name)

    # --- The loop ---------------------------------------------------------------------------------

    async def run(self, body: Callable[[], Mapping[str, Any]], stopped: Callable[[], bool]) -> None:
        try:
            while not stopped():
                self.wake.clear()
                delay = await self.safe_tick(body())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=delay)
        finally:
            self.schedules.close()  # no jobs outlive their TaskQueue's loop

    async def safe_tick(self, body: Mapping[str, Any]) -> float:
        """One tick that never raises: a fault becomes Degraded and a backoff."""
        started = time.perf_counter()
        try:
            delay = await self.tick(body)
            self.failures = 0
            self.last_fault = None
            return delay
        except asyncio.CancelledError:
            raise
        except SpecError as exc:
            return await self._fault(body, Fault(ConditionReason.INVALID_SPEC, str(exc)))
        except ObservationError as exc:
            self._secret = self._secret_versions = None  # maybe the Secret changed: read it again
            if exc.__cause__ is not None:
                cause = exc.__cause__
                self.log.warning("observation failed", error=f"{type(cause).__name__}: {cause}")
            return await self._fault(body, Fault(exc.reason, self._redacted(exc.message)))
        except redis.RedisError as exc:
            # From a schedule's publication or the orphan sweep: the same redaction as observing.
            self._secret = None
            self.log.warning("redis call failed", error=f"{type(exc).__name__}: {exc}")
            message = self._redacted(f"coordination Redis: {redis_problem(exc)}")
            return await self._fault(body, Fault("RedisUnreachable", message))
        except ApiError as exc:
            return await self._fault(body, Fault(ConditionReason.RECONCILE_FAILED, f"API: {exc}"))
        except Exception as exc:
            # Exception text may quote anything, a Secret's URL included: the log has it.
            self.log.exception("tick failed")
            return await self._fault(
                body, Fault("InternalError", f"{type(exc).__name__} (see the operator log)")
            )
        finally:
            metrics.DECISION_LATENCY.observe(time.perf_counter() - started)

    def interval(self, body: Mapping[str, Any]) -> float:
        raw = ((body.get("spec") or {}).get("scaling") or {}).get("pollIntervalSeconds", 2)
        try:
            return max(float(raw), self.deps.config.min_poll_interval)
        except (TypeError, ValueError):
            return 2.0

    async def tick(self, body: Mapping[str, Any]) -> float:
        meta = body["metadata"]
        generation = int(meta.get("generation", 0))
        self.seen_generation = generation
        now = time.time()
        spec = parse_spec(body.get("spec") or {}, name=self.name)
        settings = self.deps.settings
        interval = max(spec.scaling.poll_interval_seconds, self.deps.config.min_poll_interval)
        # Render first: a TaskQueue without a coordination Secret (and no operator default) is a
        # spec error, reported before anything is observed.
        render(meta, spec, 0, settings)

        client, keys = await self._redis(spec)
        # Before observing, so a scheduled message is in this tick's backlog (wakes a fleet at zero).
        old_status = self.status if self.status is not None else dict(body.get("status") or {})
        schedules = await self.schedules.tick(meta, spec, client, keys, now=now, old_status=old_status)
        assert self._secret is not None
        self.source = await backlog_source(
            self.deps.kube, self.deps.redis, self.namespace, spec, client, self._secret[0]
        )
        view = await read_queue(self.source, client, keys, spec)
        dep = self._deployment_view() or await self._fetch_deployment()
        current = dep.replicas if dep is not None else 0
        if dep is not None and dep.generation < self.applied_generation and self.applied_replicas is not None:
            # The watch has not caught up with our own last apply: trust what we applied, or the
            # same scale-in would be decided, announced and costed twice.
            current = self.applied_replicas
        pods = [p for p in self.pods() if not p.deleting]
        ready = sum(1 for p in pods if p.ready)
        obs = make_observation(view, now=now, current=current, pods=len(pods), ready=ready)
        decision = decide(obs, Policy.from_spec(spec), self.state)
        self.state = decision.state

        if decision.desired < current:
            # Just before a scale-in, so the ReplicaSet removes silent and idle pods first.
            # What we wrote counts over a pod index that may not show it yet: each pod is patched
            # once per change of its cost, not once per tick until the watch catches up.
            self.costs_written = {
                p.name: self.costs_written[p.name] for p in pods if p.name in self.costs_written
            }
            known = {p.name: self.costs_written.get(p.name, p.cost) for p in pods}
            changes = cost_changes(deletion_costs(view.workers), known)
            await set_deletion_costs(self.deps.kube, self.namespace, changes)
            self.costs_written.update({pod: str(cost) for pod, cost in changes.items()})
            if changes and self.deferred_scale_in != current:
                # The ReplicaSet controller picks the pods from its own informer cache, which may
                # not hold the costs just written: shrinking in the same instant removed a busy pod
                # (seen on the real API server). Scale in on the next tick, once, instead.
                self.deferred_scale_in = current
                decision = replace(decision, desired=current)
            else:
                self.deferred_scale_in = None
        else:
            self.deferred_scale_in = None

        deployment = render(
            meta, spec, decision.desired, settings, extra_hash_inputs=await self._secret_hash_inputs(spec)
        )
        digest = config_hash(deployment)
        drifted = dep is None or dep.generation > self.applied_generation or current != decision.desired
        if digest != self.applied_hash or drifted:
            applied = await apply_deployment(self.deps.kube, deployment)
            self.applied_hash = digest
            self.applied_generation = int(applied.get("metadata", {}).get("generation", 0))
            self.applied_replicas = decision.desired

        last_scale = None
        if decision.changed:
            last_scale = decision.last_scale(rfc3339(now))
            metrics.DECISIONS.labels(self.namespace, self.name, str(decision.reason)).inc()
            await events.post(self.deps.kube, meta, "Normal", str(decision.reason), decision.message)
            self.log.info(
                "scaled", reason=str(decision.reason), to=decision.desired, message=decision.message
            )

        silent = await self._replace_silent(spec, pods, view.heartbeat_times, now)
        await self._sweep_orphans(client, keys, now)
        await self._write_status(
            body,
            decision,
            spec,
            generation=generation,
            now=now,
            ready=ready,
            replicas=dep.replicas if dep is not None else decision.desired,
            silent=silent,
            acked=view.acked,
            last_scale=last_scale,
            schedules=schedules,
        )
        self._record_metrics(decision, obs.current_replicas)
        return interval

    # --- Pieces -----------------------------------------------------------------------------------

    def _redacted(self, message: str) -> str:
        """``message`` about the coordination Redis, naming where its URL came from, never the URL."""
        if not message.startswith("coordination Redis:") or self._secret_ref is None:
            return message
        ref = self._secret_ref
        return f"{message} ({secret_target(self.namespace, ref.name, ref.key)})"

    async def _redis(self, spec: TaskQueueSpec) -> tuple[redis.Redis, Keys]:
        ref: SecretKeyRef | None = spec.coordination_secret_ref or self.deps.config.default_secret
        if ref is None:  # render() already rejected this; keep mypy and readers sure
            raise SpecError("spec.coordination.urlSecretRef", "is required")
        self._secret_ref = ref
        now = time.monotonic()
        # Re-read every --secret-refresh-interval, and at once after a Redis error.
        if self._secret is None or now - self._secret[1] > self.deps.config.secret_refresh_interval:
            url = await secret_value(self.deps.kube, self.namespace, ref)
            self._secret = (url, now)
        try:
            self.client = self.deps.redis.get(self._secret[0])
        except ValueError as exc:  # redis-py's parse errors quote parts of the URL
            raise ObservationError("RedisUnreachable", f"coordination Redis: {redis_problem(exc)}") from exc
        self.keys = keys_for(self.namespace, spec)
        return self.client, self.keys

    async def _secret_hash_inputs(self, spec: TaskQueueSpec) -> dict[str, str]:
        """The resourceVersions of the Secrets the pods read, for the config hash: a rotated broker
        or coordination URL rolls the pods (they read it only at start). Re-read every
        --secret-refresh-interval, so a rotation rolls within it; a resourceVersion, unlike a hash of the value, says
        nothing about the Secret's content."""
        now = time.monotonic()
        fresh_for = self.deps.config.secret_refresh_interval
        if self._secret_versions is not None and now - self._secret_versions[1] <= fresh_for:
            return self._secret_versions[0]
        refs = {r.name for r in (spec.coordination_secret_ref or self.deps.config.default_secret,
                                 spec.broker.url_secret_ref) if r is not None}  # fmt: skip
        versions: dict[str, str] = {}
        for name in sorted(refs):
            obj = await self.deps.kube.get(secret_path(self.namespace, name))
            versions[f"secret/{name}"] = str(((obj or {}).get("metadata") or {}).get("resourceVersion", ""))
        self._secret_versions = (versions, now)
        return versions

    def _deployment_view(self) -> DeploymentView | None:
        return self.deployment() if self.deployment is not None else None

    async def _fetch_deployment(self) -> DeploymentView | None:
        obj = await get_deployment(self.deps.kube, self.namespace, self.name)
        return deployment_view(obj) if obj is not None else None

    async def _replace_silent(
        self, spec: TaskQueueSpec, pods: Sequence[PodView], beats: Mapping[str, float], now: float
    ) -> list[str]:
        running = [PodInfo(p.name, p.running_since) for p in pods if p.running_since is not None]
        silent = silent_pods(
            running, beats, now=now, replace_after_seconds=spec.liveness.replace_after_seconds
        )
        for pod in silent:
            self.log.warning("replacing a pod that runs but does not heartbeat", pod=pod)
            await delete_pod(self.deps.kube, self.namespace, pod)
        return silent

    async def _write_status(
        self,
        body: Mapping[str, Any],
        decision: Decision,
        spec: TaskQueueSpec,
        *,
        generation: int,
        now: float,
        ready: int,
        replicas: int,
        silent: Sequence[str],
        acked: int,
        last_scale: Mapping[str, Any] | None,
        schedules: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        old = self.status if self.status is not None else dict(body.get("status") or {})
        # The alarm is normal while new pods start; it is Degraded only once it outlasts a start-up.
        grace = max(
            self.deps.config.no_live_workers_grace,
            3 * spec.liveness.missed_heartbeats * spec.liveness.heartbeat_seconds,
        )
        if decision.no_live_workers_alarm and decision.desired > 0:
            self.alarm_since = self.alarm_since or now
        else:
            self.alarm_since = None
        conds = conditions_for(
            decision,
            generation=generation,
            now=now,
            ready_replicas=ready,
            qps=spec.rate_limit.qps,
            min_replicas=spec.scaling.min_replicas,
            max_replicas=spec.scaling.max_replicas,
            silent=silent,
            no_live_alarm=self.alarm_since is not None and now - self.alarm_since > grace,
        )
        conds = schedules_degraded(schedules, conds, generation=generation, now=now)
        new = observed_status(
            old,
            decision,
            conds,
            generation=generation,
            queue=spec.broker.queue,
            selector=status_selector(self.name),
            replicas=replicas,
            ready_replicas=ready,
            observed_qps=self._observed_qps(acked, now),
            last_scale=last_scale,
        )
        await self._conflict(body, spec.broker.queue, new, generation=generation, now=now)
        if schedules:
            new["schedules"] = [dict(s) for s in schedules]
        else:
            new.pop("schedules", None)  # the spec has none left: drop what status still lists
        await self._patch_status(old, new)

    async def _conflict(
        self, body: Mapping[str, Any], queue: str, new: dict[str, Any], *, generation: int, now: float
    ) -> None:
        """Conflict=True (and one Warning Event per owner) while an older TaskQueue uses our queue."""
        owner = self.conflict(queue) if self.conflict is not None else None
        if owner is None:
            new["conditions"] = without(new["conditions"], ConditionType.CONFLICT)
        else:
            message = conflict_message(queue, owner)
            new["conditions"] = set_condition(
                new["conditions"],
                condition(
                    ConditionType.CONFLICT,
                    True,
                    ConditionReason.QUEUE_SHARED,
                    message,
                    generation=generation,
                    now=now,
                ),
            )
            if owner != self.conflict_owner:
                self.log.warning("queue shared with another TaskQueue", owner=owner, queue=queue)
                await events.post(
                    self.deps.kube, body["metadata"], "Warning", ConditionReason.QUEUE_SHARED, message
                )
        self.conflict_owner = owner

    def _observed_qps(self, acked: int, now: float) -> float | None:
        prev, self._acked = self._acked, (acked, now)
        if prev is None or now <= prev[1]:
            return None
        return max(0.0, (acked - prev[0]) / (now - prev[1]))

    async def _patch_status(self, old: Mapping[str, Any], new: dict[str, Any]) -> None:
        patch = status_patch(old, new)
        if patch is None:
            return
        await self.deps.kube.merge_patch(
            taskqueue_status_path(self.namespace, self.name), {"status": patch}, MANAGER
        )
        metrics.STATUS_WRITES.labels(self.namespace, self.name).inc()
        self.status = new

    async def _fault(self, body: Mapping[str, Any], fault: Fault) -> float:
        self.failures += 1
        metrics.ERRORS.labels(self.namespace, self.name, fault.reason).inc()
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation", 0))
        if fault.message != self.last_fault:
            self.last_fault = fault.message
            self.log.warning("taskqueue degraded", reason=fault.reason, message=fault.message)
            await events.post(self.deps.kube, meta, "Warning", fault.reason, fault.message)
        old = self.status if self.status is not None else dict(body.get("status") or {})
        try:
            await self._patch_status(old, fault_status(old, fault, generation=generation, now=time.time()))
        except Exception as exc:
            self.log.warning("status not written", error=str(exc))
        base = self.interval(body)
        return float(min(self.deps.config.max_backoff, base * 2 ** min(self.failures - 1, 16)))

    def _record_metrics(self, decision: Decision, current: int) -> None:
        ns, name = self.namespace, self.name
        metrics.DESIRED.labels(ns, name).set(decision.desired)
        metrics.CURRENT.labels(ns, name).set(current)
        metrics.BACKLOG.labels(ns, name).set(decision.backlog)
        metrics.record_reason(ns, name, str(decision.reason), self.last_reason)
        self.last_reason = str(decision.reason)

    # --- Pod deletion -----------------------------------------------------------------------------

    async def _sweep_orphans(self, client: redis.Redis, keys: Keys, now: float) -> None:
        """Return the leases of workers whose pods vanished while no DELETED event reached us
        (the operator was down, or the watch restarted), instead of waiting for the leases to
        expire. Cheap, but not every tick: one set read, and one EXISTS per unknown holder."""
        if now - self.last_sweep < ORPHAN_SWEEP_SECONDS:
            return
        self.last_sweep = now
        known = {p.name for p in self.pods()}
        if self.source is None:
            return
        for worker in await orphaned_workers(self.source, known):
            await self.pod_deleted(worker)

    async def pod_deleted(self, pod: str) -> int:
        """Return a deleted pod's leases at once: the worker id is the pod name."""
        if self.source is None:
            return 0
        n = await requeue_worker(self.source, pod)
        if n:
            metrics.REQUEUED.labels(self.namespace, self.name).inc(n)
            self.log.info("returned the leases of a deleted pod", pod=pod, messages=n)
        return n
