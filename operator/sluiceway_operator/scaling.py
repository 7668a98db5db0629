"""The autoscaling decision: pure, deterministic, and explained.

One call of ``decide`` is one tick of a TaskQueue's scaling loop. It takes what the operator observed
(broker backlog, leases in flight, worker heartbeats, the Deployment's replicas), the policy from the
spec, and the state carried over from the previous tick; it returns the replica count to apply, the
bound that decided it, a sentence for humans, and the next state. It reads no clock and keeps nothing
in globals, so a test can replay any sequence of ticks.

The rules, in the order they apply (``docs/scaling.md`` has the formulas and the reasoning):

1. ``spec.paused`` means zero pods; otherwise a pin (``spec.replicas``) wins over everything.
2. Need: enough pods to drain backlog + in-flight work within ``targetDrainSeconds``, with per-pod
   throughput from Little's law (``concurrency / task latency``).
3. QPS ceiling: never more pods than the fleet-wide QPS limit can keep busy
   (``ceil(qps * latency / concurrency * (1 + headroom))``, at least 1). Need above it = Throttled.
4. Clamp to ``[minReplicas, maxReplicas]``.
5. Up: at once, in one step, no ramp. Leaving zero is just an up-step straight to the need.
6. Down: the highest recommendation of the stabilization window, without a rate limit never below
   the busy workers, N -> 1 before 1 -> 0, and 0 only after ``cooldownSeconds`` with no backlog, no
   in-flight work and no busy worker.

Liveness: only workers whose heartbeat is fresh count as capacity or as busy. A backlog with no live
worker raises ``no_live_workers_alarm`` and the fleet is never shrunk while it is raised.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from sluiceway.contract import Heartbeat

from .spec import DEFAULTS, TaskQueueSpec

# The annotation the ReplicaSet controller reads to choose which pods to delete first.
POD_DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"

# A worker's latency counts for sizing once it has run this long. Its p50 covers the tasks of its
# recent window (10 s), so in its first seconds it holds a few tasks that ran while the pods were
# still starting on the same cores. Seen on the local cluster: 60.6 ms for 50 ms tasks about 80
# tasks into a burst, 58 ms four seconds later. The first figure crossed a pod boundary of the QPS
# ceiling, so the fleet grew by a pod the limit could not use and shrank again seconds later.
LATENCY_WARMUP_SECONDS: Final = 5.0


class Reason(StrEnum):
    """The bound that decided a scaling decision. Stable strings: they appear in status and Events."""

    PINNED = "Pinned"
    PAUSED = "Paused"
    DRAIN = "DrainTarget"
    QPS_CEILING = "QPSCeiling"
    MIN_REPLICAS = "MinReplicas"
    MAX_REPLICAS = "MaxReplicas"
    MAX_USEFUL = "MaxUsefulReplicas"  # the broker keeps no more pods busy (Kafka: partitions)
    WAKE = "WakeFromZero"
    NO_LIVE_WORKERS = "NoLiveWorkers"
    STABILIZATION = "ScaleDownStabilization"
    BUSY_WORKERS = "BusyWorkers"
    STEP_TO_ONE = "StepToOne"
    COOLDOWN = "Cooldown"
    IDLE = "Idle"


class LatencySource(StrEnum):
    """Where the task latency used for sizing came from."""

    MEASURED = "measured"  # rate-weighted p50 from live heartbeats
    # The last measurement of the same workload, kept in ``ScalingState`` while no live worker has
    # one of its own (a rollout's new pods, a wake-up): new pods must not fall back to the guess.
    REMEMBERED = "remembered"
    ASSUMED = "assumed"  # scaling.assumedTaskSeconds: nothing measured yet


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One worker as the scaler sees it, derived from its latest heartbeat."""

    worker: str
    pod: str
    live: bool  # heartbeat fresh and not draining: counts as capacity
    draining: bool
    busy: int
    in_flight: int
    concurrency: int
    rate: float  # completions per second
    latency_p50: float  # seconds; 0 = not measured yet
    age: float  # seconds since its last heartbeat
    uptime: float = math.inf  # seconds the worker had run at its last heartbeat


def worker_sample(heartbeat: Heartbeat, *, now: float, missed_heartbeats: int) -> WorkerSample:
    """Judge one heartbeat's liveness at ``now``.

    A worker is stale once ``missed_heartbeats`` of its own announced intervals have passed without a
    heartbeat: using the worker's interval rather than the spec's keeps the verdict right while a
    configuration change rolls out and old and new pods beat at different rates.
    """
    age = max(0.0, now - heartbeat["time"])
    interval = max(heartbeat["interval"], 0.001)
    draining = heartbeat["state"] == "draining"
    fresh = age <= missed_heartbeats * interval
    return WorkerSample(
        worker=heartbeat["worker"],
        pod=heartbeat["pod"],
        live=fresh and not draining,
        draining=draining,
        busy=max(0, heartbeat["busy"]),
        in_flight=max(0, heartbeat["in_flight"]),
        concurrency=max(1, heartbeat["concurrency"]),
        rate=max(0.0, heartbeat["rate"]),
        latency_p50=max(0.0, heartbeat["latency_p50"]),
        age=age,
        uptime=max(0.0, heartbeat["time"] - heartbeat["started"]),
    )


@dataclass(frozen=True, slots=True)
class Observation:
    """What the operator saw on this tick."""

    now: float  # unix seconds
    backlog: int  # ready messages in the broker
    in_flight: int  # messages leased by workers (running plus prefetched)
    workers: tuple[WorkerSample, ...]  # every heartbeat found, live or stale
    current_replicas: int  # the Deployment's spec.replicas now
    pods: int = 0
    ready_pods: int = 0
    # The most pods the broker can keep busy (Kafka: the topic's partitions); None = no bound.
    max_useful: int | None = None

    @property
    def live_workers(self) -> tuple[WorkerSample, ...]:
        return tuple(w for w in self.workers if w.live)

    @property
    def busy_workers(self) -> int:
        """Live workers running at least one task: the pods a scale-down must not take away."""
        return sum(1 for w in self.workers if w.live and w.busy > 0)

    @property
    def busy_tasks(self) -> int:
        return sum(w.busy for w in self.workers if w.live)

    @property
    def has_work(self) -> bool:
        return self.backlog > 0 or self.in_flight > 0 or self.busy_tasks > 0

    @property
    def throughput(self) -> float:
        """Completions per second, fleet-wide, from live workers."""
        return sum(w.rate for w in self.workers if w.live)


_SCALING: Final = DEFAULTS["scaling"]


@dataclass(frozen=True, slots=True)
class Policy:
    """The scaling knobs, from ``TaskQueueSpec``; ``qps=None`` means no fleet-wide limit.

    The defaults are ``spec.DEFAULTS``, their one owner. ``workload`` names what the workers run
    (image and function): a latency measured for one workload is remembered for the same one only.
    """

    min_replicas: int = _SCALING["minReplicas"]
    max_replicas: int = _SCALING["maxReplicas"]
    target_drain_seconds: float = _SCALING["targetDrainSeconds"]
    stabilization_seconds: float = _SCALING["scaleDownStabilizationSeconds"]
    cooldown_seconds: float = _SCALING["cooldownSeconds"]
    per_pod: int = DEFAULTS["concurrency"]["perPod"]
    qps: float | None = None
    qps_headroom: float = _SCALING["qpsHeadroom"]
    assumed_task_seconds: float = _SCALING["assumedTaskSeconds"]
    pinned: int | None = None
    paused: bool = False  # spec.paused: zero pods, whatever else holds
    workload: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        if self.per_pod < 1 or self.target_drain_seconds <= 0 or self.assumed_task_seconds <= 0:
            raise ValueError("per_pod, target_drain_seconds and assumed_task_seconds must be positive")
        if self.qps is not None and not self.qps > 0:
            raise ValueError("qps must be positive or None")

    @classmethod
    def from_spec(cls, spec: TaskQueueSpec) -> Policy:
        s = spec.scaling
        return cls(
            min_replicas=s.min_replicas,
            max_replicas=s.max_replicas,
            target_drain_seconds=s.target_drain_seconds,
            stabilization_seconds=s.scale_down_stabilization_seconds,
            cooldown_seconds=s.cooldown_seconds,
            per_pod=spec.concurrency.per_pod,
            qps=spec.rate_limit.qps,
            qps_headroom=s.qps_headroom,
            assumed_task_seconds=s.assumed_task_seconds,
            pinned=spec.replicas,
            paused=spec.paused,
            workload=f"{spec.image} {spec.function}",
        )


@dataclass(frozen=True, slots=True)
class Recommendation:
    time: float
    replicas: int


@dataclass(frozen=True, slots=True)
class ScalingState:
    """What one tick hands to the next. Start with ``ScalingState()``.

    ``window`` keeps only the recommendations that can still be the maximum of the stabilization
    window (a later, higher-or-equal one makes an earlier one irrelevant), so it stays short.
    ``last_active`` is the last time any work was seen; ``None`` until the first tick, which counts
    as active so that an operator restart never skips a cooldown. ``measured`` is the latest
    measured latency and the workload it was measured for (see ``LatencySource.REMEMBERED``).
    """

    window: tuple[Recommendation, ...] = ()
    last_active: float | None = None
    measured: tuple[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    current: int
    reason: Reason
    message: str
    # Work waits and the rate limit, not the fleet, holds it back: the need is above the QPS
    # ceiling, or the live fleet could start tasks faster than the limit allows.
    throttled: bool
    limited: Reason | None  # MaxReplicas / MinReplicas when that bound clamped the recommendation
    no_live_workers_alarm: bool  # work waits and no worker heartbeats
    need: int  # pods to drain within the target, before any bound
    ceiling: int | None  # QPS ceiling; None without a limit
    recommendation: int  # need after ceiling and clamp: what enters the window
    latency_seconds: float
    latency_source: LatencySource
    per_pod: int
    backlog: int
    in_flight: int
    live_workers: int
    stale_workers: int
    busy_workers: int
    throughput: float
    eta_seconds: float | None  # (backlog + in flight) / throughput; None when nothing completes
    idle_seconds: float  # time since work was last seen
    state: ScalingState = field(repr=False)

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    def last_scale(self, time: str) -> dict[str, Any]:
        """The ``status.lastScale`` value for this decision, stamped with ``time`` (RFC 3339)."""
        return {
            "time": time,
            "from": self.current,
            "to": self.desired,
            "reason": str(self.reason),
            "message": self.message,
            "inputs": self.inputs(),
        }

    def inputs(self) -> dict[str, Any]:
        """Every input and intermediate bound, camelCased for ``status.lastScale.inputs``."""
        return {
            "backlog": self.backlog,
            "inFlight": self.in_flight,
            "liveWorkers": self.live_workers,
            "staleWorkers": self.stale_workers,
            "busyWorkers": self.busy_workers,
            "throughput": round(self.throughput, 3),
            "latencySeconds": round(self.latency_seconds, 4),
            "latencySource": str(self.latency_source),
            "perPod": self.per_pod,
            "need": self.need,
            "qpsCeiling": self.ceiling,
            "recommendation": self.recommendation,
            "throttled": self.throttled,
            "idleSeconds": round(self.idle_seconds, 1),
        }


def task_latency(
    workers: Iterable[WorkerSample], assumed: float, remembered: float | None = None
) -> tuple[float, LatencySource]:
    """The task latency to size with: the rate-weighted p50 of live workers that have run for
    ``LATENCY_WARMUP_SECONDS``, else ``remembered`` (the same workload's last measurement), else
    ``assumed``.

    p50 of execution time rather than time-in-worker: time spent waiting for a QPS token would grow
    with every pod added, and a ceiling computed from it would chase its own tail.
    """
    weighted = [
        (w.latency_p50, w.rate)
        for w in workers
        if w.live and w.latency_p50 > 0 and w.rate > 0 and w.uptime >= LATENCY_WARMUP_SECONDS
    ]
    total = sum(rate for _, rate in weighted)
    if total > 0:
        return sum(lat * rate for lat, rate in weighted) / total, LatencySource.MEASURED
    if remembered is not None and remembered > 0:
        return remembered, LatencySource.REMEMBERED
    return assumed, LatencySource.ASSUMED


def drain_need(work: int, *, latency: float, per_pod: int, target_drain_seconds: float) -> int:
    """Pods that finish ``work`` messages within the target: ``ceil(work * latency / (per_pod * target))``.

    One pod runs ``per_pod / latency`` tasks a second (Little's law), so N pods drain ``work`` in
    ``work * latency / (N * per_pod)`` seconds. Any work at all needs at least one pod.
    """
    if work <= 0:
        return 0
    return max(1, math.ceil(work * latency / (per_pod * target_drain_seconds) - 1e-9))


def qps_ceiling(qps: float | None, *, latency: float, per_pod: int, headroom: float) -> int | None:
    """The most pods a fleet-wide limit of ``qps`` can keep busy, plus headroom; at least 1.

    At ``qps`` starts per second and ``latency`` seconds each, ``qps * latency`` tasks run at once
    (Little's law), which ``qps * latency / per_pod`` pods hold.
    """
    if qps is None:
        return None
    return max(1, math.ceil(qps * latency / per_pod * (1 + headroom) - 1e-9))


def rate_limited(qps: float | None, *, backlog: int, capped: bool, capacity: float) -> bool:
    """Whether the rate limit, not the fleet, holds waiting work back (the ``Throttled`` condition).

    True when messages wait and either the QPS ceiling capped the size (``capped``: more pods would
    only wait for tokens) or the live fleet could start more than ``qps`` tasks a second
    (``capacity``, tasks per second at the sizing latency): it then runs at the limit, not at its
    own speed.
    """
    if qps is None or backlog <= 0:
        return False
    return capped or capacity >= qps


def _capacity(live: Sequence[WorkerSample], latency: float) -> float:
    """Starts per second the live workers could make at ``latency`` (Little's law)."""
    slots = sum(w.concurrency for w in live)
    return slots / latency if latency > 0 else (math.inf if slots else 0.0)


def decide(obs: Observation, policy: Policy, state: ScalingState) -> Decision:
    """One tick of the scaling loop. See the module docstring for the rules."""
    now = obs.now
    live = obs.live_workers
    busy_workers = obs.busy_workers
    work = obs.backlog + obs.in_flight
    last_active = now if obs.has_work or state.last_active is None else state.last_active
    idle_seconds = max(0.0, now - last_active)
    memory = state.measured
    remembered = memory[1] if memory is not None and memory[0] == policy.workload else None
    latency, source = task_latency(live, policy.assumed_task_seconds, remembered)
    measured = (policy.workload, latency) if source is LatencySource.MEASURED else memory
    need = drain_need(
        work, latency=latency, per_pod=policy.per_pod, target_drain_seconds=policy.target_drain_seconds
    )
    ceiling = qps_ceiling(policy.qps, latency=latency, per_pod=policy.per_pod, headroom=policy.qps_headroom)
    alarm = work > 0 and not live
    current = obs.current_replicas

    # Recommendation: need, capped by the QPS ceiling, clamped to [min, max].
    rec, reason = need, Reason.DRAIN
    limited: Reason | None = None
    if ceiling is not None and rec > ceiling:
        rec, reason = ceiling, Reason.QPS_CEILING
    if rec > policy.max_replicas:
        rec, reason = policy.max_replicas, Reason.MAX_REPLICAS
        limited = reason
    if obs.max_useful is not None and rec > max(obs.max_useful, 1):
        rec, reason = max(obs.max_useful, 1), Reason.MAX_USEFUL
        limited = reason
    if rec < policy.min_replicas:
        rec, reason = policy.min_replicas, Reason.MIN_REPLICAS
        limited = reason
    if rec == 0 and reason is Reason.DRAIN:
        reason = Reason.IDLE
    throttled = rate_limited(
        policy.qps,
        backlog=obs.backlog,
        capped=ceiling is not None and need > ceiling and ceiling < policy.max_replicas,
        capacity=_capacity(live, latency),
    )

    window = _push(state.window, Recommendation(now, rec), now - policy.stabilization_seconds)
    next_state = ScalingState(window=window, last_active=last_active, measured=measured)

    if policy.paused:
        # Paused wins over a pin: nothing consumes, and the messages stay queued.
        desired, reason = 0, Reason.PAUSED
    elif policy.pinned is not None:
        desired, reason = policy.pinned, Reason.PINNED
    elif rec >= current:
        # Up (or level): at once and in one step. From zero this is the wake-up, straight to need.
        desired = rec
        if current == 0 and rec > 0 and work > 0:
            reason = Reason.WAKE
        elif alarm and current > 0:
            reason = Reason.NO_LIVE_WORKERS
    elif alarm:
        # Work waits and nobody reports: pods may be starting or wedged. Removing them cannot help;
        # replacing silent pods is the liveness check's job.
        desired, reason = current, Reason.NO_LIVE_WORKERS
        if desired > policy.max_replicas:
            desired, reason = policy.max_replicas, Reason.MAX_REPLICAS
    else:
        desired, reason = _scale_down(rec, reason, current, window, busy_workers, obs, policy, idle_seconds)

    stale = sum(1 for w in obs.workers if not w.live and not w.draining)
    throughput = obs.throughput
    eta = work / throughput if throughput > 0 else (0.0 if work == 0 else None)
    decision = Decision(
        desired=desired,
        current=current,
        reason=reason,
        message="",
        throttled=throttled,
        limited=limited,
        no_live_workers_alarm=alarm,
        need=need,
        ceiling=ceiling,
        recommendation=rec,
        latency_seconds=latency,
        latency_source=source,
        per_pod=policy.per_pod,
        backlog=obs.backlog,
        in_flight=obs.in_flight,
        live_workers=len(live),
        stale_workers=stale,
        busy_workers=busy_workers,
        throughput=throughput,
        eta_seconds=eta,
        idle_seconds=idle_seconds,
        state=next_state,
    )
    return _with_message(decision, policy)


def _scale_down(
    rec: int,
    reason: Reason,
    current: int,
    window: tuple[Recommendation, ...],
    busy_workers: int,
    obs: Observation,
    policy: Policy,
    idle_seconds: float,
) -> tuple[int, Reason]:
    desired = min(current, max(r.replicas for r in window))
    if desired > rec:
        reason = Reason.STABILIZATION
    # Without a rate limit, busy workers are not removed. Under a limit the floor would never let
    # go: the limit spreads starts over every pod, so every pod always holds a task however many
    # there are. A removed pod drains on SIGTERM (running tasks finish within the grace period), so
    # no task is interrupted either way. A busy count above the current size (a rollout's old
    # pods) must not turn a scale-down into a scale-up.
    floor = min(busy_workers, current) if policy.qps is None else 0
    if desired < floor:
        desired, reason = floor, Reason.BUSY_WORKERS
    if desired == 0 and current > 1:
        desired, reason = 1, Reason.STEP_TO_ONE
    elif desired == 0 and (obs.has_work or busy_workers > 0 or idle_seconds < policy.cooldown_seconds):
        desired, reason = 1, Reason.COOLDOWN
    # The max bound is absolute: a lowered maxReplicas shrinks the fleet even past busy workers
    # (they drain on SIGTERM within the task timeout).
    if desired > policy.max_replicas:
        desired, reason = policy.max_replicas, Reason.MAX_REPLICAS
    if desired < policy.min_replicas:
        desired, reason = policy.min_replicas, Reason.MIN_REPLICAS
    return desired, reason


def _push(
    window: tuple[Recommendation, ...], new: Recommendation, horizon: float
) -> tuple[Recommendation, ...]:
    # A monotonic queue: drop expired entries and every entry the newcomer dominates, so the first
    # element is always the window's maximum and the tuple stays small.
    kept = tuple(r for r in window if r.time >= horizon and r.replicas > new.replicas)
    return (*kept, new)


def _with_message(d: Decision, policy: Policy) -> Decision:
    verb = f"{d.current} -> {d.desired}" if d.changed else f"stay at {d.desired}"
    sizing = (
        f"backlog {d.backlog}, in flight {d.in_flight}; {d.latency_source} latency "
        f"{d.latency_seconds:.3g} s, {d.per_pod}/pod, drain target {policy.target_drain_seconds:g} s "
        f"-> need {d.need}"
    )
    if d.ceiling is not None:
        sizing += f", QPS ceiling {d.ceiling}"
    return replace(d, message=f"{verb}: {_why(d, policy)} ({sizing})")


def _why(d: Decision, policy: Policy) -> str:
    match d.reason:
        case Reason.PINNED:
            return f"pinned by spec.replicas to {d.desired}"
        case Reason.PAUSED:
            return "paused by spec.paused: no workers, messages stay queued"
        case Reason.DRAIN:
            return f"sized to drain within {policy.target_drain_seconds:g} s"
        case Reason.QPS_CEILING:
            return f"capped at the QPS ceiling {d.ceiling} for qps {policy.qps or 0:g}: more pods would idle"
        case Reason.MIN_REPLICAS:
            return f"held at minReplicas {policy.min_replicas}"
        case Reason.MAX_REPLICAS:
            return f"capped at maxReplicas {policy.max_replicas}"
        case Reason.MAX_USEFUL:
            return f"capped at {d.desired}: the broker keeps no more pods busy (Kafka: one per partition)"
        case Reason.WAKE:
            return f"work appeared at zero replicas: straight to {d.desired}"
        case Reason.NO_LIVE_WORKERS:
            return f"work waits but no worker heartbeats ({d.stale_workers} stale): not shrinking"
        case Reason.STABILIZATION:
            window = f"the highest recommendation of the last {policy.stabilization_seconds:g} s"
            if d.desired < d.current:  # a step down, only not as far as the latest recommendation
                return f"down to {window} (scale-down stabilization window)"
            return f"held at {window} (scale-down stabilization window)"
        case Reason.BUSY_WORKERS:
            return f"{d.busy_workers} workers are busy: never below them"
        case Reason.STEP_TO_ONE:
            return "stepping down to 1 before 0"
        case Reason.COOLDOWN:
            return f"keeping 1 until idle for {policy.cooldown_seconds:g} s (idle {d.idle_seconds:.0f} s)"
        case Reason.IDLE:
            return "no work: idle"


# --- Scale-in order and silent pods --------------------------------------------------------------


def deletion_costs(workers: Sequence[WorkerSample]) -> dict[str, int]:
    """``controller.kubernetes.io/pod-deletion-cost`` per pod, so the ReplicaSet removes idle pods first.

    Stale (silent) workers cost -1, idle live workers 0, busy workers their number of running tasks:
    the ReplicaSet deletes the lowest cost first, so a scale-in takes silent pods, then idle ones, then
    the least busy. Draining workers are already leaving and get no value. Kubernetes warns that
    updating this annotation often is expensive, so apply these just before a scale-down and patch
    only pods whose value differs.
    """
    costs: dict[str, int] = {}
    for w in workers:
        if w.draining or not w.pod:
            continue
        cost = -1 if not w.live else w.busy
        # One pod may show up under two worker ids after a container restart; keep the busier.
        costs[w.pod] = max(cost, costs.get(w.pod, cost))
    return costs


def scale_in_order(workers: Sequence[WorkerSample]) -> list[str]:
    """Pods in the order a scale-in should remove them (cheapest first, ties by name for stability)."""
    costs = deletion_costs(workers)
    return sorted(costs, key=lambda pod: (costs[pod], pod))


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A running worker pod, from the API: its name and since when it has been running."""

    name: str
    running_since: float  # unix seconds the container started (Running phase)


def silent_pods(
    pods: Sequence[PodInfo],
    heartbeats: Mapping[str, float],
    *,
    now: float,
    replace_after_seconds: float,
) -> list[str]:
    """Running pods whose worker has not heartbeated for ``replace_after_seconds``.

    ``heartbeats`` maps a pod name to the time of its latest heartbeat. A pod that never beat is
    measured from when it started running, so slow starts get the whole bound. 0 disables.
    """
    if replace_after_seconds <= 0:
        return []
    out: list[str] = []
    for pod in pods:
        last = max(pod.running_since, heartbeats.get(pod.name, pod.running_since))
        if now - last > replace_after_seconds:
            out.append(pod.name)
    return sorted(out)
