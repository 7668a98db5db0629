"""``spec.paused`` in the pure scaling decision: zero pods, reason Paused, over everything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway_operator.scaling import Observation, Policy, Reason, ScalingState, decide


@given(
    backlog=st.integers(0, 10_000),
    current=st.integers(0, 50),
    pinned=st.one_of(st.none(), st.integers(0, 50)),
    min_replicas=st.integers(0, 5),
)
@settings(max_examples=200, deadline=None)
def test_paused_is_zero_whatever_else_holds(
    backlog: int, current: int, pinned: int | None, min_replicas: int
) -> None:
    policy = Policy(min_replicas=min_replicas, max_replicas=50, pinned=pinned, paused=True)
    obs = Observation(now=1000.0, backlog=backlog, in_flight=0, workers=(), current_replicas=current)
    d = decide(obs, policy, ScalingState())
    assert d.desired == 0 and d.reason is Reason.PAUSED
    assert "paused by spec.paused" in d.message


def test_unpausing_wakes_the_fleet_for_the_backlog() -> None:
    obs = Observation(now=1000.0, backlog=100, in_flight=0, workers=(), current_replicas=0)
    paused = decide(obs, Policy(paused=True), ScalingState())
    resumed = decide(obs, Policy(), paused.state)
    assert resumed.desired > 0 and resumed.reason is Reason.WAKE
