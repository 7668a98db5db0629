"""The TaskQueue's ``status``: conditions with stable messages, plus the observed numbers.

Condition messages never carry live counters (backlog, ETA, ...): those live in their own status
fields, and a message that changed every tick would make ``status_patch`` write every tick.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .conditions import Condition, ConditionReason, ConditionType, condition, merge_conditions
from .scaling import Decision, Reason


@dataclass(frozen=True, slots=True)
class Fault:
    """Why a tick could not complete; goes to Degraded (and Ready for an invalid spec)."""

    reason: str  # CamelCase: InvalidSpec, SecretMissing, RedisUnreachable, ReconcileFailed, ...
    message: str


# The bounds that clamp a decision, each with its ScalingLimited reason (owned by ConditionReason) and
# message. A message names only spec values and the clamped size, never a live counter.
_LIMITED: Final[Mapping[Reason, tuple[ConditionReason, str]]] = {
    Reason.MAX_REPLICAS: (
        ConditionReason.MAX_REPLICAS,
        "The fleet would grow past maxReplicas {max_replicas}.",
    ),
    Reason.MAX_USEFUL: (
        ConditionReason.MAX_USEFUL_REPLICAS,
        "The broker can keep at most {desired} pods busy (on Kafka, the topic's partitions).",
    ),
    Reason.MIN_REPLICAS: (
        ConditionReason.MIN_REPLICAS,
        "The fleet would shrink below minReplicas {min_replicas}.",
    ),
}


def conditions_for(
    decision: Decision,
    *,
    generation: int,
    now: float,
    ready_replicas: int,
    qps: float | None,
    silent: Sequence[str],
    no_live_alarm: bool,
    min_replicas: int,
    max_replicas: int,
) -> list[Condition]:
    """Ready, Scaling, Throttled, ScalingLimited and Degraded for a tick that observed and decided."""
    desired = decision.desired

    def c(t: ConditionType, status: bool, reason: ConditionReason, message: str) -> Condition:
        return condition(t, status, reason, message, generation=generation, now=now)

    if decision.reason is Reason.PAUSED:
        ready = condition(
            ConditionType.READY,
            True,
            Reason.PAUSED,
            "Paused by spec.paused: no workers; messages stay queued and schedules do not publish.",
            generation=generation,
            now=now,
        )
    elif desired == 0:
        ready = c(ConditionType.READY, True, ConditionReason.IDLE_AT_ZERO, "No work: scaled to zero.")
    elif ready_replicas >= desired:
        ready = c(ConditionType.READY, True, ConditionReason.WORKERS_READY, "All desired workers are ready.")
    else:
        ready = c(
            ConditionType.READY,
            False,
            ConditionReason.WAITING_FOR_WORKERS,
            "Waiting for workers to be ready.",
        )

    if decision.reason is Reason.PINNED:
        scaling = c(
            ConditionType.SCALING, False, ConditionReason.PINNED, f"Pinned by spec.replicas to {desired}."
        )
    elif desired > ready_replicas and desired >= decision.current:
        scaling = c(ConditionType.SCALING, True, ConditionReason.SCALING_UP, f"Scaling up to {desired}.")
    elif desired < decision.current:
        scaling = c(ConditionType.SCALING, True, ConditionReason.SCALING_DOWN, f"Scaling down to {desired}.")
    else:
        # Name the rule that holds the size now, so "Stable" never hides a bound that lets go later.
        scaling = c(
            ConditionType.SCALING,
            False,
            ConditionReason.STABLE,
            f"Stable at {desired}, held by {decision.reason}.",
        )

    if qps is None:
        throttled = c(ConditionType.THROTTLED, False, ConditionReason.UNLIMITED, "No rate limit.")
    elif decision.throttled and decision.ceiling is not None and decision.need > decision.ceiling:
        throttled = c(
            ConditionType.THROTTLED,
            True,
            ConditionReason.QPS_CEILING,
            f"Work waits and the {qps:g} QPS limit holds it back: more pods would only wait for it.",
        )
    elif decision.throttled:
        throttled = c(
            ConditionType.THROTTLED,
            True,
            ConditionReason.RATE_LIMITED,
            f"Work waits and the fleet runs at the {qps:g} QPS limit, not at its own speed.",
        )
    else:
        throttled = c(
            ConditionType.THROTTLED,
            False,
            ConditionReason.NOT_LIMITED,
            f"The {qps:g} QPS limit holds nothing back: no work waits, or the fleet runs below it.",
        )

    clamp = _LIMITED.get(decision.limited) if decision.limited is not None else None
    if clamp is None:
        limited = c(
            ConditionType.SCALING_LIMITED,
            False,
            ConditionReason.WITHIN_RANGE,
            "The recommended size is within minReplicas and maxReplicas.",
        )
    else:
        reason, template = clamp
        message = template.format(max_replicas=max_replicas, min_replicas=min_replicas, desired=desired)
        limited = c(ConditionType.SCALING_LIMITED, True, reason, message)

    if silent:
        degraded = c(
            ConditionType.DEGRADED,
            True,
            ConditionReason.SILENT_PODS,
            "Running but not heartbeating, being replaced: " + ", ".join(silent),
        )
    elif no_live_alarm:
        degraded = c(
            ConditionType.DEGRADED,
            True,
            ConditionReason.NO_LIVE_WORKERS,
            "Work is waiting and no worker heartbeats.",
        )
    else:
        degraded = c(ConditionType.DEGRADED, False, ConditionReason.HEALTHY, "Healthy.")
    return [ready, scaling, throttled, limited, degraded]


def fault_conditions(fault: Fault, *, generation: int, now: float) -> list[Condition]:
    """Every fault makes Ready False and sets Degraded, both with its reason.

    A tick that could not complete (bad spec, missing Secret, Redis down, API error) can neither
    observe nor scale the fleet, so it is not Ready: `kubectl get tq` must print False, never blank.
    """
    return [
        condition(ConditionType.READY, False, fault.reason, fault.message, generation=generation, now=now),
        condition(ConditionType.DEGRADED, True, fault.reason, fault.message, generation=generation, now=now),
    ]


def observed_status(
    old: Mapping[str, Any],
    decision: Decision,
    conditions: Sequence[Condition],
    *,
    generation: int,
    queue: str,
    selector: str,
    replicas: int,
    ready_replicas: int,
    observed_qps: float | None,
    last_scale: Mapping[str, Any] | None,
) -> dict[str, Any]:
    new: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge_conditions(old.get("conditions") or [], conditions),
        "queue": queue,
        "replicas": replicas,
        "desiredReplicas": decision.desired,
        "readyReplicas": ready_replicas,
        "selector": selector,
        "backlog": decision.backlog,
        "inFlight": decision.in_flight,
        "liveWorkers": decision.live_workers,
        "busyWorkers": decision.busy_workers,
        "throughput": round(decision.throughput, 2),
    }
    if observed_qps is not None:
        new["observedQPS"] = round(observed_qps, 2)
    if decision.eta_seconds is not None:
        new["etaSeconds"] = round(decision.eta_seconds, 1)
    # The rule holding the size now, beside lastScale (the last change, which may be long past).
    new["decision"] = {
        "reason": str(decision.reason),
        "message": decision.message,
        "inputs": decision.inputs(),
    }
    scale = last_scale if last_scale is not None else old.get("lastScale")
    if scale:
        new["lastScale"] = dict(scale)
    _keep_foreign(old, new)
    return new


def fault_status(old: Mapping[str, Any], fault: Fault, *, generation: int, now: float) -> dict[str, Any]:
    """The old status with the fault's conditions; the numbers stay as last observed."""
    new = {k: v for k, v in old.items() if k != "kopf"}
    new["conditions"] = merge_conditions(
        old.get("conditions") or [], fault_conditions(fault, generation=generation, now=now)
    )
    new["observedGeneration"] = generation
    return new


def _keep_foreign(old: Mapping[str, Any], new: dict[str, Any]) -> None:
    # Fields other parts of the operator own (the scheduler's status.schedules) are not ours to drop.
    for key in ("schedules",):
        if key in old and key not in new:
            new[key] = old[key]
