"""Status conditions in the ``metav1.Condition`` shape, and the decision whether to write status at all.

Conditions follow the Kubernetes API conventions: ``type``, ``status`` (True/False/Unknown),
``observedGeneration``, ``lastTransitionTime`` (moves only when ``status`` changes), a CamelCase
``reason`` and a ``message``. The list is keyed by ``type``.

``status_patch`` keeps the operator from writing status on every 2-second tick: it returns ``None``
when nothing a reader cares about changed, so a quiet TaskQueue costs no API writes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, Final, Literal, TypedDict

ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionType(StrEnum):
    READY = "Ready"  # workers are deployed and, when work waits, heartbeating
    SCALING = "Scaling"  # the fleet is changing size (True while desired != ready)
    THROTTLED = "Throttled"  # work waits and the QPS limit, not the fleet size, holds it back
    SCALING_LIMITED = "ScalingLimited"  # minReplicas or maxReplicas clamped the size (as in the HPA)
    DEGRADED = "Degraded"  # something needs a human: silent pods, no live worker, bad config
    # Present only while True: another, older TaskQueue in the namespace uses the same queue.
    CONFLICT = "Conflict"


class ConditionReason(StrEnum):
    # Ready
    WORKERS_READY = "WorkersReady"
    IDLE_AT_ZERO = "IdleAtZero"
    WAITING_FOR_WORKERS = "WaitingForWorkers"
    INVALID_SPEC = "InvalidSpec"
    RECONCILE_FAILED = "ReconcileFailed"
    # Scaling
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    STABLE = "Stable"
    PINNED = "Pinned"
    # Throttled
    QPS_CEILING = "QPSCeiling"  # the need is above the QPS ceiling: more pods would only wait
    RATE_LIMITED = "RateLimited"  # the fleet could start tasks faster than the limit allows
    NOT_LIMITED = "NotLimited"  # nothing waits, or the fleet runs below the limit
    UNLIMITED = "Unlimited"
    # ScalingLimited
    MAX_REPLICAS = "MaxReplicas"
    MAX_USEFUL_REPLICAS = "MaxUsefulReplicas"
    MIN_REPLICAS = "MinReplicas"
    WITHIN_RANGE = "WithinRange"
    # Degraded
    NO_LIVE_WORKERS = "NoLiveWorkers"
    SILENT_PODS = "SilentPods"
    OBSERVATION_FAILED = "ObservationFailed"
    HEALTHY = "Healthy"
    # Conflict
    QUEUE_SHARED = "QueueShared"


class Condition(TypedDict):
    type: str
    status: ConditionStatus
    observedGeneration: int
    lastTransitionTime: str
    reason: str
    message: str


# Rapidly changing measurements: a change in these alone does not justify a write. They are still
# written, fresh, whenever something else changes. Integers (backlog, inFlight, workers, replicas)
# and conditions are not volatile: `kubectl get tq` should show them current.
VOLATILE_FIELDS: Final = frozenset({"throughput", "observedQPS", "etaSeconds", "lastObservedTime"})
# The same for parts of an object: ``status.decision`` is worth a write when the rule holding the
# size (its reason) changes, not when only the measurements in its sentence and inputs moved.
VOLATILE_SUBFIELDS: Final[Mapping[str, frozenset[str]]] = {"decision": frozenset({"message", "inputs"})}


def rfc3339(timestamp: float) -> str:
    """Unix seconds as the RFC 3339 UTC form the API uses (second precision, trailing Z)."""
    moment = dt.datetime.fromtimestamp(int(timestamp), tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type: ConditionType | str,
    status: ConditionStatus | bool,
    reason: ConditionReason | str,
    message: str = "",
    *,
    generation: int,
    now: float,
) -> Condition:
    """A new condition; ``status`` may be a bool for True/False."""
    if isinstance(status, bool):
        status = "True" if status else "False"
    return {
        "type": str(type),
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": rfc3339(now),
        "reason": str(reason),
        "message": message,
    }


def find(conditions: Iterable[Mapping[str, Any]], type: ConditionType | str) -> Mapping[str, Any] | None:
    for c in conditions:
        if c.get("type") == str(type):
            return c
    return None


def set_condition(conditions: Sequence[Mapping[str, Any]], new: Condition) -> list[Condition]:
    """``conditions`` with ``new`` upserted by type; the input is not modified.

    ``lastTransitionTime`` is kept from the old entry when the status did not change: it records when
    the condition last flipped, not when the operator last looked.
    """
    out: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.get("type") != new["type"]:
            out.append(_as_condition(old))
            continue
        replaced = True
        if old.get("status") == new["status"] and old.get("lastTransitionTime"):
            out.append({**new, "lastTransitionTime": str(old["lastTransitionTime"])})
        else:
            out.append(new)
    if not replaced:
        out.append(new)
    return out


def merge_conditions(conditions: Sequence[Mapping[str, Any]], new: Iterable[Condition]) -> list[Condition]:
    """Upsert several conditions at once, in order; types not mentioned are kept as they were."""
    out = [_as_condition(c) for c in conditions]
    for c in new:
        out = set_condition(out, c)
    return out


def without(conditions: Sequence[Mapping[str, Any]], type: ConditionType | str) -> list[Condition]:
    """``conditions`` minus the one of ``type`` (for conditions that exist only while True)."""
    return [_as_condition(c) for c in conditions if c.get("type") != str(type)]


def _as_condition(c: Mapping[str, Any]) -> Condition:
    status = c.get("status", "Unknown")
    return {
        "type": str(c.get("type", "")),
        "status": status if status in ("True", "False") else "Unknown",
        "observedGeneration": int(c.get("observedGeneration", 0)),
        "lastTransitionTime": str(c.get("lastTransitionTime", "")),
        "reason": str(c.get("reason", "")),
        "message": str(c.get("message", "")),
    }


def status_patch(
    old_status: Mapping[str, Any] | None,
    new_status: Mapping[str, Any],
    *,
    volatile: frozenset[str] = VOLATILE_FIELDS,
) -> dict[str, Any] | None:
    """A JSON merge patch taking ``old_status`` to ``new_status``, or ``None`` if nothing relevant changed.

    A change in a ``volatile`` field alone returns ``None``; once anything else changed, the patch
    carries every differing field, volatile ones included, so the written status is coherent. Keys in
    ``old_status`` but not in ``new_status`` are removed (``None`` in a merge patch); nested objects
    and lists are replaced whole (lists are in merge patches anyway, and ``lastScale`` is one unit).
    Keys kopf keeps in status (``kopf``) are left alone.
    """
    old = dict(old_status or {})
    old.pop("kopf", None)
    patch: dict[str, Any] = {}
    for key, value in new_status.items():
        if old.get(key) != value or key not in old:
            patch[key] = value
    for key in old:
        if key not in new_status:
            patch[key] = None
    if not patch or all(k in volatile or _only_volatile_parts(k, old.get(k), patch[k]) for k in patch):
        return None
    return patch


def _only_volatile_parts(key: str, old: Any, new: Any) -> bool:
    parts = VOLATILE_SUBFIELDS.get(key)
    if parts is None or not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return False
    return {k: v for k, v in old.items() if k not in parts} == {
        k: v for k, v in new.items() if k not in parts
    }
