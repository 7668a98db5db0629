"""Conditions in the metav1.Condition shape, and writing status only when it changed."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sluiceway_operator.conditions import (
    VOLATILE_FIELDS,
    ConditionReason,
    ConditionType,
    condition,
    find,
    merge_conditions,
    rfc3339,
    set_condition,
    status_patch,
)


def test_condition_shape() -> None:
    c = condition(ConditionType.READY, True, ConditionReason.WORKERS_READY, "3/3 live", generation=4, now=0)
    assert c == {
        "type": "Ready",
        "status": "True",
        "observedGeneration": 4,
        "lastTransitionTime": "1970-01-01T00:00:00Z",
        "reason": "WorkersReady",
        "message": "3/3 live",
    }


def test_rfc3339() -> None:
    assert rfc3339(1_700_000_000.9) == "2023-11-14T22:13:20Z"


def test_unchanged_status_keeps_the_transition_time() -> None:
    first = set_condition([], condition("Ready", True, "WorkersReady", "a", generation=1, now=100))
    later = set_condition(first, condition("Ready", True, "WorkersReady", "b", generation=2, now=500))
    (c,) = later
    assert c["lastTransitionTime"] == rfc3339(100)
    assert c["message"] == "b"
    assert c["observedGeneration"] == 2


def test_changed_status_moves_the_transition_time() -> None:
    first = set_condition([], condition("Ready", True, "WorkersReady", generation=1, now=100))
    later = set_condition(first, condition("Ready", False, "WaitingForWorkers", generation=1, now=500))
    assert later[0]["lastTransitionTime"] == rfc3339(500)


def test_other_conditions_are_kept_in_order_and_input_untouched() -> None:
    old = [
        condition("Ready", True, "WorkersReady", generation=1, now=1),
        condition("Throttled", False, "BelowCeiling", generation=1, now=1),
    ]
    snapshot = [dict(c) for c in old]
    new = set_condition(old, condition("Throttled", True, "QPSCeiling", generation=2, now=9))
    assert [c["type"] for c in new] == ["Ready", "Throttled"]
    assert new[1]["status"] == "True"
    assert old == snapshot


def test_merge_conditions_and_find() -> None:
    merged = merge_conditions(
        [],
        [
            condition(t, "Unknown", "Pending", generation=1, now=0)
            for t in (
                ConditionType.READY,
                ConditionType.SCALING,
                ConditionType.THROTTLED,
                ConditionType.DEGRADED,
            )
        ],
    )
    assert [c["type"] for c in merged] == ["Ready", "Scaling", "Throttled", "Degraded"]
    found = find(merged, ConditionType.THROTTLED)
    assert found is not None
    assert found["status"] == "Unknown"
    assert find(merged, "Nope") is None


def test_status_patch_none_when_equal() -> None:
    s = {"replicas": 3, "backlog": 10, "conditions": []}
    assert status_patch(s, dict(s)) is None


def test_status_patch_none_when_only_volatile_fields_changed() -> None:
    old = {"replicas": 3, "throughput": 49.8, "observedQPS": 50.1, "etaSeconds": 24}
    new = {"replicas": 3, "throughput": 50.2, "observedQPS": 49.9, "etaSeconds": 23}
    assert status_patch(old, new) is None


def test_status_patch_carries_volatile_fields_along_with_a_real_change() -> None:
    old = {"replicas": 3, "throughput": 49.8}
    new = {"replicas": 4, "throughput": 50.2}
    assert status_patch(old, new) == {"replicas": 4, "throughput": 50.2}


def test_status_patch_removes_dropped_keys_and_ignores_kopf() -> None:
    old = {"replicas": 3, "lastScale": {"to": 3}, "kopf": {"progress": {}}}
    assert status_patch(old, {"replicas": 3}) == {"lastScale": None}


def test_status_patch_from_nothing() -> None:
    assert status_patch(None, {"replicas": 0}) == {"replicas": 0}


status_values = st.dictionaries(
    st.sampled_from(["replicas", "backlog", "inFlight", "selector", *sorted(VOLATILE_FIELDS)]),
    st.integers(0, 5) | st.text(max_size=2),
)


@given(status_values, status_values)
def test_property_applying_the_patch_gives_the_new_status(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = status_patch(old, new)
    changed = {k for k in set(old) | set(new) if old.get(k, object()) != new.get(k, object())}
    if patch is None:
        assert changed <= VOLATILE_FIELDS
        return
    merged = {**old, **patch}
    merged = {k: v for k, v in merged.items() if v is not None}
    assert merged == new
