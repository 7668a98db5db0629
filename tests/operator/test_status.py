"""The TaskQueue status built from a decision: conditions that say what happens, and the rule holding
the size now beside the last change. The same cases run against the real API server in
``e2e/test_e2e_status.py``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sluiceway_operator.conditions import ConditionReason, ConditionType, find, status_patch
from sluiceway_operator.scaling import (
    Decision,
    Observation,
    Policy,
    Reason,
    ScalingState,
    WorkerSample,
    decide,
)
from sluiceway_operator.status import Fault, conditions_for, fault_status, observed_status


def live(n: int, *, busy: int, latency: float, per_pod: int) -> tuple[WorkerSample, ...]:
    return tuple(
        WorkerSample(f"w{i}", f"w{i}", True, False, busy, busy, per_pod, per_pod / latency, latency, 0.0)
        for i in range(n)
    )


def decision(policy: Policy, *, backlog: int, workers: tuple[WorkerSample, ...], current: int) -> Decision:
    o = Observation(now=1000.0, backlog=backlog, in_flight=0, workers=workers, current_replicas=current)
    return decide(o, policy, ScalingState())


def conds(d: Decision, policy: Policy) -> dict[str, dict[str, Any]]:
    out = conditions_for(
        d,
        generation=1,
        now=1000.0,
        ready_replicas=d.current,
        qps=policy.qps,
        silent=(),
        no_live_alarm=False,
        min_replicas=policy.min_replicas,
        max_replicas=policy.max_replicas,
    )
    return {c["type"]: dict(c) for c in out}


def test_throttled_is_true_at_the_limit_with_a_backlog_below_the_ceiling() -> None:
    # The case: 20 QPS, 200 queued, the fleet running at exactly 20/s.
    policy = Policy(qps=20.0, per_pod=4, max_replicas=10)
    d = decision(policy, backlog=200, workers=live(3, busy=4, latency=0.5, per_pod=4), current=3)
    t = conds(d, policy)[ConditionType.THROTTLED]
    assert (t["status"], t["reason"]) == ("True", ConditionReason.RATE_LIMITED)
    assert "20 QPS" in t["message"]


def test_throttled_says_qps_ceiling_when_more_pods_would_only_wait() -> None:
    policy = Policy(qps=20.0, per_pod=4, max_replicas=10, target_drain_seconds=5)
    d = decision(policy, backlog=5000, workers=live(3, busy=4, latency=0.5, per_pod=4), current=3)
    t = conds(d, policy)[ConditionType.THROTTLED]
    assert (t["status"], t["reason"]) == ("True", ConditionReason.QPS_CEILING)


def test_throttled_is_false_with_nothing_waiting_and_unlimited_without_a_limit() -> None:
    policy = Policy(qps=20.0, per_pod=4)
    d = decision(policy, backlog=0, workers=live(3, busy=4, latency=0.5, per_pod=4), current=3)
    t = conds(d, policy)[ConditionType.THROTTLED]
    assert (t["status"], t["reason"]) == ("False", ConditionReason.NOT_LIMITED)
    unlimited = replace(policy, qps=None)
    d = decision(unlimited, backlog=200, workers=live(3, busy=4, latency=0.5, per_pod=4), current=3)
    assert conds(d, unlimited)[ConditionType.THROTTLED]["reason"] == ConditionReason.UNLIMITED


def test_the_pod_cap_is_its_own_condition() -> None:
    policy = Policy(max_replicas=2, per_pod=1)
    d = decision(policy, backlog=10_000, workers=live(2, busy=1, latency=1.0, per_pod=1), current=2)
    c = conds(d, policy)
    assert (c["ScalingLimited"]["status"], c["ScalingLimited"]["reason"]) == ("True", "MaxReplicas")
    assert "maxReplicas 2" in c["ScalingLimited"]["message"]
    assert c[ConditionType.THROTTLED]["status"] == "False"
    low = Policy(min_replicas=1)
    c = conds(decision(low, backlog=0, workers=(), current=1), low)
    assert (c["ScalingLimited"]["status"], c["ScalingLimited"]["reason"]) == ("True", "MinReplicas")
    free = Policy()
    c = conds(decision(free, backlog=10, workers=live(1, busy=1, latency=1.0, per_pod=8), current=1), free)
    assert (c["ScalingLimited"]["status"], c["ScalingLimited"]["reason"]) == ("False", "WithinRange")


def test_the_broker_bound_names_the_size_it_allows() -> None:
    policy = Policy(max_replicas=10, per_pod=1)
    d = decision(policy, backlog=10_000, workers=live(3, busy=1, latency=1.0, per_pod=1), current=3)
    c = conds(replace(d, desired=3, limited=Reason.MAX_USEFUL), policy)
    limited = c[ConditionType.SCALING_LIMITED]
    assert (limited["status"], limited["reason"]) == ("True", ConditionReason.MAX_USEFUL_REPLICAS)
    assert "at most 3 pods" in limited["message"]


def test_every_fault_makes_ready_false_never_blank() -> None:
    for reason in ("SecretMissing", "RedisUnreachable", "InvalidSpec", "ReconcileFailed", "InternalError"):
        status = fault_status({}, Fault(reason, "broken"), generation=3, now=0)
        ready = find(status["conditions"], ConditionType.READY)
        degraded = find(status["conditions"], ConditionType.DEGRADED)
        assert ready is not None and degraded is not None, reason
        assert (ready["status"], ready["reason"]) == ("False", reason)
        assert (degraded["status"], degraded["reason"]) == ("True", reason)


def test_status_shows_the_rule_holding_the_size_beside_the_last_change() -> None:
    policy = Policy(qps=20.0, per_pod=4, target_drain_seconds=5)
    d = decision(policy, backlog=200, workers=live(3, busy=4, latency=0.5, per_pod=4), current=3)
    woke = {"reason": "WakeFromZero", "from": 0, "to": 6}
    status = observed_status(
        {"lastScale": woke},
        d,
        [],
        generation=1,
        queue="q",
        selector="s",
        replicas=3,
        ready_replicas=3,
        observed_qps=None,
        last_scale=None,
    )
    assert status["lastScale"] == woke
    assert status["decision"]["reason"] == "QPSCeiling"
    assert status["decision"]["inputs"]["latencySource"] == "measured"
    assert status["decision"]["inputs"]["throttled"] is True
    assert status["decision"]["message"] == d.message
    scaling = conds(d, policy)[ConditionType.SCALING]
    assert scaling["message"] == "Stable at 3, held by QPSCeiling."


def test_a_decision_whose_inputs_alone_moved_is_not_a_write() -> None:
    old = {
        "replicas": 3,
        "decision": {"reason": "QPSCeiling", "message": "a (backlog 9)", "inputs": {"b": 9}},
    }
    new = {
        "replicas": 3,
        "decision": {"reason": "QPSCeiling", "message": "a (backlog 8)", "inputs": {"b": 8}},
    }
    assert status_patch(old, new) is None
    changed = {"replicas": 3, "decision": {**new["decision"], "reason": Reason.DRAIN.value}}  # type: ignore[dict-item]
    assert status_patch(old, changed) == {"decision": changed["decision"]}
