"""deploy/argocd/health.lua against TaskQueue status built by the operator's own status code, via lupa.

Fast and cluster-free. The golden cases from real API objects, evaluated by Argo CD itself, are in
e2e/test_argocd_health.py; the two must agree, and that test checks this oracle too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from localcluster.argocd import ARGOCD_CM, HEALTH_KEY, HEALTH_LUA, render_cm
from sluiceway_operator.conditions import Condition, ConditionReason, ConditionType, condition
from sluiceway_operator.scaling import Decision, Policy, ScalingState, decide
from sluiceway_operator.scaling import Observation as Obs
from sluiceway_operator.spec import parse_spec
from sluiceway_operator.status import Fault, conditions_for, fault_status, observed_status
from tests.argocd.oracle import evaluate

NOW = 1_800_000_000.0
SPEC: dict[str, Any] = {"image": "i", "function": "m:f", "broker": {"type": "redis"}}


def _decision(backlog: int, ready: int, current: int, spec: dict[str, Any]) -> Decision:
    obs = Obs(
        now=NOW,
        backlog=backlog,
        in_flight=0,
        workers=(),
        current_replicas=current,
        pods=ready,
        ready_pods=ready,
    )
    return decide(obs, Policy.from_spec(parse_spec(spec, name="tq")), ScalingState())


def tq(
    *,
    generation: int = 1,
    observed: int | None = 1,
    backlog: int = 0,
    ready: int = 0,
    current: int = 0,
    no_live: bool = False,
    extra: Sequence[Condition] = (),
    fault: Fault | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A TaskQueue whose status comes from ``status.py``, as the operator would write it."""
    full = {**SPEC, **spec}
    obj: dict[str, Any] = {
        "apiVersion": "sluiceway.dev/v1alpha1",
        "kind": "TaskQueue",
        "metadata": {"name": "tq", "namespace": "ns", "generation": generation},
        "spec": full,
    }
    if observed is None:
        return obj
    d = _decision(backlog, ready, current, full)
    conds = conditions_for(
        d,
        generation=observed,
        now=NOW,
        ready_replicas=ready,
        qps=None,
        silent=(),
        no_live_alarm=no_live,
        min_replicas=int(full.get("scaling", {}).get("minReplicas", 0)),
        max_replicas=int(full.get("scaling", {}).get("maxReplicas", 10)),
    )
    status = observed_status(
        {},
        d,
        [*conds, *extra],
        generation=observed,
        queue="tq",
        selector="s",
        replicas=current,
        ready_replicas=ready,
        observed_qps=None,
        last_scale=None,
    )
    if fault is not None:
        status = fault_status(status, fault, generation=observed, now=NOW)
    obj["status"] = status
    return obj


CONFLICT = condition(
    ConditionType.CONFLICT,
    True,
    ConditionReason.QUEUE_SHARED,
    "Queue 'tq' is also used by 'a'",
    generation=1,
    now=NOW,
)


@pytest.mark.parametrize(
    ("obj", "status", "fragment"),
    [
        (tq(observed=None), "Progressing", "observe this TaskQueue"),
        (tq(generation=2, observed=1), "Progressing", "generation 2"),
        (tq(), "Healthy", "scaled to zero"),
        (tq(backlog=100, ready=0, current=0), "Progressing", "Waiting for workers"),
        (tq(backlog=100, ready=4, current=4, scaling={"maxReplicas": 4}), "Healthy", "ready"),
        (tq(backlog=100, no_live=True, current=2), "Degraded", "no worker heartbeats"),
        (tq(extra=[CONFLICT]), "Degraded", "also used by"),
        (tq(fault=Fault("SecretMissing", "Secret ns/x not found")), "Degraded", "Secret ns/x not found"),
        (tq(fault=Fault(ConditionReason.INVALID_SPEC, "spec.image: bad")), "Degraded", "spec.image: bad"),
        (tq(replicas=0), "Suspended", "Pinned to zero"),
        (tq(paused=True), "Suspended", "Paused"),
    ],
    ids=[
        "no-status",
        "stale-generation",
        "idle-at-zero",
        "waiting-for-workers",
        "workers-ready",
        "no-live-workers-with-backlog",
        "conflict",
        "secret-missing",
        "invalid-spec",
        "pinned-to-zero",
        "paused",
    ],
)
def test_health(obj: dict[str, Any], status: str, fragment: str) -> None:
    got, message = evaluate(obj)
    assert (got, fragment.lower() in message.lower()) == (status, True), message


def test_no_live_workers_without_backlog_is_not_degraded() -> None:
    obj = tq()
    for c in obj["status"]["conditions"]:
        if c["type"] == "Degraded":
            c.update(
                status="True", reason="NoLiveWorkers", message="Work is waiting and no worker heartbeats."
            )
    assert evaluate(obj)[0] == "Healthy"


def test_the_oracle_has_no_string_library_like_argocd() -> None:
    with pytest.raises(Exception, match="string"):
        evaluate(tq(), "return {status = string.format('%s', 'Healthy'), message = ''}")


def test_argocd_cm_carries_the_script_verbatim() -> None:
    text = ARGOCD_CM.read_text()
    assert text == render_cm(HEALTH_LUA.read_text()), (
        "run: cd e2e && python -m localcluster.argocd --write-cm"
    )
    assert yaml.safe_load(text)["data"][HEALTH_KEY] == HEALTH_LUA.read_text()
