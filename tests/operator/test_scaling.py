"""The scaling decision, rule by rule, then as properties over random observations and tick sequences.

Each ``test_rule_*`` pins one rule of ``docs/scaling.md`` with a worked example; the hypothesis tests
check the invariants for any input: bounds, the QPS ceiling, one-step scale-up, the busy floor, the
zero gate and the wake-up.
"""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sluiceway.contract import Heartbeat
from sluiceway_operator.scaling import (
    LATENCY_WARMUP_SECONDS,
    Decision,
    LatencySource,
    Observation,
    PodInfo,
    Policy,
    Reason,
    Recommendation,
    ScalingState,
    WorkerSample,
    decide,
    deletion_costs,
    drain_need,
    qps_ceiling,
    scale_in_order,
    silent_pods,
    worker_sample,
)


def worker(
    name: str = "w",
    *,
    busy: int = 0,
    live: bool = True,
    draining: bool = False,
    concurrency: int = 8,
    rate: float = 8.0,
    latency: float = 1.0,
    in_flight: int | None = None,
) -> WorkerSample:
    return WorkerSample(
        worker=name,
        pod=name,
        live=live and not draining,
        draining=draining,
        busy=busy,
        in_flight=busy if in_flight is None else in_flight,
        concurrency=concurrency,
        rate=rate,
        latency_p50=latency,
        age=0.0 if live else 60.0,
    )


def obs(
    *,
    now: float = 1000.0,
    backlog: int = 0,
    in_flight: int = 0,
    workers: tuple[WorkerSample, ...] = (),
    current: int = 0,
) -> Observation:
    return Observation(
        now=now, backlog=backlog, in_flight=in_flight, workers=workers, current_replicas=current
    )


def busy_fleet(n: int, busy: int = 8, latency: float = 1.0) -> tuple[WorkerSample, ...]:
    return tuple(worker(f"w{i}", busy=busy, rate=busy / latency, latency=latency) for i in range(n))


def idle_fleet(n: int, latency: float = 1.0) -> tuple[WorkerSample, ...]:
    return tuple(worker(f"w{i}", busy=0, rate=1.0, latency=latency) for i in range(n))


POLICY = Policy(min_replicas=0, max_replicas=50, target_drain_seconds=30, per_pod=8)


# --- Formulas ---------------------------------------------------------------------------------------


def test_drain_need_is_littles_law() -> None:
    # 1200 messages x 1 s / (8 per pod x 30 s) = 5 pods.
    assert drain_need(1200, latency=1.0, per_pod=8, target_drain_seconds=30) == 5
    assert drain_need(1201, latency=1.0, per_pod=8, target_drain_seconds=30) == 6
    assert drain_need(1, latency=0.001, per_pod=8, target_drain_seconds=30) == 1
    assert drain_need(0, latency=9.0, per_pod=8, target_drain_seconds=30) == 0


def test_qps_ceiling_formula_and_floor_of_one() -> None:
    # 50 qps x 1 s / 8 per pod x 1.1 = 6.875 -> 7.
    assert qps_ceiling(50, latency=1.0, per_pod=8, headroom=0.1) == 7
    assert qps_ceiling(0.01, latency=0.01, per_pod=8, headroom=0.1) == 1
    assert qps_ceiling(None, latency=1.0, per_pod=8, headroom=0.1) is None


def test_latency_is_measured_when_heartbeats_report_it() -> None:
    d = decide(obs(backlog=100, workers=busy_fleet(2, latency=0.5), current=2), POLICY, ScalingState())
    assert d.latency_source is LatencySource.MEASURED
    assert d.latency_seconds == 0.5


def test_latency_falls_back_to_the_assumed_value_on_cold_start() -> None:
    d = decide(obs(backlog=100), replace(POLICY, assumed_task_seconds=2.5), ScalingState())
    assert d.latency_source is LatencySource.ASSUMED
    assert d.latency_seconds == 2.5


def test_stale_workers_do_not_count_for_latency() -> None:
    stale = worker("old", busy=8, live=False, latency=100.0, rate=1.0)
    d = decide(obs(backlog=100, workers=(stale,), current=1), POLICY, ScalingState())
    assert d.latency_source is LatencySource.ASSUMED


def test_a_young_worker_s_latency_does_not_move_the_qps_ceiling() -> None:
    """The e2e faults flake (replicas 0 -> 2 -> 3 -> 2): 50 ms tasks at 150 QPS, 5 per pod, read
    60.6 ms (rounded) from pods about 80 tasks into the burst, and the ceiling went from 2 pods to
    3, a pod the limit could not use. A worker's latency counts once it has run
    ``LATENCY_WARMUP_SECONDS``; until then the fleet is sized as before any measurement, and the
    same figure from warmed-up workers still moves the ceiling."""
    policy = replace(
        POLICY, qps=150, per_pod=5, assumed_task_seconds=0.05, max_replicas=6, target_drain_seconds=5
    )
    assert qps_ceiling(150, latency=0.061, per_pod=5, headroom=policy.qps_headroom) == 3

    def fleet(uptime: float) -> tuple[WorkerSample, ...]:
        return tuple(
            replace(worker(f"w{i}", busy=5, concurrency=5, rate=75.0, latency=0.061), uptime=uptime)
            for i in range(2)
        )

    young = decide(obs(backlog=1417, in_flight=10, workers=fleet(2.0), current=2), policy, ScalingState())
    assert (young.latency_source, young.ceiling, young.desired) == (LatencySource.ASSUMED, 2, 2)
    warm = decide(
        obs(backlog=1417, in_flight=10, workers=fleet(LATENCY_WARMUP_SECONDS), current=2),
        policy,
        ScalingState(),
    )
    assert (warm.latency_source, warm.ceiling, warm.desired) == (LatencySource.MEASURED, 3, 3)


def test_a_rollout_s_young_pods_are_sized_on_the_remembered_latency() -> None:
    policy = replace(POLICY, workload="img f")
    state = ScalingState(measured=("img f", 0.2))
    young = tuple(replace(w, uptime=1.0) for w in busy_fleet(2, latency=0.9))
    d = decide(obs(backlog=100, workers=young, current=2), policy, state)
    assert (d.latency_source, d.latency_seconds) == (LatencySource.REMEMBERED, 0.2)


# --- One test per rule ------------------------------------------------------------------------------


def test_rule_size_to_drain_backlog_plus_in_flight_within_target() -> None:
    d = decide(obs(backlog=1000, in_flight=200, workers=busy_fleet(1), current=1), POLICY, ScalingState())
    assert (d.desired, d.reason) == (5, Reason.DRAIN)
    assert d.need == 5


def test_rule_never_above_the_qps_ceiling_and_report_throttled() -> None:
    policy = replace(POLICY, qps=50.0, qps_headroom=0.1)
    d = decide(obs(backlog=100_000, workers=busy_fleet(2), current=2), policy, ScalingState())
    assert d.ceiling == 7
    assert (d.desired, d.reason) == (7, Reason.QPS_CEILING)
    assert d.throttled
    assert "QPS ceiling" in d.message


def test_rule_not_throttled_when_the_need_fits_under_the_ceiling() -> None:
    policy = replace(POLICY, qps=1000.0)
    d = decide(obs(backlog=1200, workers=busy_fleet(1), current=1), policy, ScalingState())
    assert not d.throttled
    assert d.reason is Reason.DRAIN


def test_rule_clamp_to_max_replicas() -> None:
    d = decide(obs(backlog=1_000_000, workers=busy_fleet(1), current=1), POLICY, ScalingState())
    assert (d.desired, d.reason) == (50, Reason.MAX_REPLICAS)
    assert not d.throttled


def test_rule_max_below_the_qps_ceiling_is_max_not_throttled() -> None:
    policy = replace(POLICY, max_replicas=3, qps=1000.0)
    d = decide(obs(backlog=1_000_000, workers=busy_fleet(1), current=1), policy, ScalingState())
    assert (d.desired, d.reason, d.throttled) == (3, Reason.MAX_REPLICAS, False)


def test_rule_clamp_to_min_replicas() -> None:
    policy = replace(POLICY, min_replicas=2)
    d = decide(obs(current=2, now=10_000), policy, ScalingState(last_active=0))
    assert (d.desired, d.reason) == (2, Reason.MIN_REPLICAS)


def test_rule_scale_up_at_once_in_one_step() -> None:
    d = decide(obs(backlog=12_000, workers=busy_fleet(1), current=1), POLICY, ScalingState())
    assert d.desired == 50  # 1 -> 50 in one tick: no +4 / +100 % ramp as in the HPA


def test_rule_scale_down_waits_for_the_stabilization_window() -> None:
    state = ScalingState()
    d = decide(obs(now=0, backlog=2400, workers=busy_fleet(10), current=1), POLICY, state)
    assert d.desired == 10
    # The backlog is gone but the workers are idle: the window still remembers 10.
    d = decide(obs(now=30, backlog=0, workers=idle_fleet(10), current=10), POLICY, d.state)
    assert (d.desired, d.reason) == (10, Reason.STABILIZATION)
    assert d.message.startswith("stay at 10: held at the highest recommendation of the last 60 s")
    d = decide(obs(now=61, backlog=0, workers=idle_fleet(10), current=10), POLICY, d.state)
    assert d.desired < 10


def test_rule_stabilization_takes_the_highest_recommendation_in_the_window() -> None:
    state = ScalingState(window=(Recommendation(10, 8), Recommendation(40, 4)), last_active=60)
    d = decide(obs(now=60, backlog=100, workers=idle_fleet(9), current=9), POLICY, state)
    assert (d.desired, d.reason) == (8, Reason.STABILIZATION)
    # A step down (the demo's 3 -> 1) is not "held": it says where it stopped and why.
    assert d.message.startswith("9 -> 8: down to the highest recommendation of the last 60 s")
    d = decide(obs(now=75, backlog=100, workers=idle_fleet(8), current=8), POLICY, d.state)
    assert d.desired == 4  # 8 (t=10) has left the 60 s window; 4 (t=40) is the highest left


def test_rule_never_below_busy_workers() -> None:
    fleet = busy_fleet(3, busy=1) + idle_fleet(3)
    state = ScalingState(last_active=0)
    policy = replace(POLICY, stabilization_seconds=0)
    d = decide(obs(now=1000, backlog=0, workers=fleet, current=6), policy, state)
    assert (d.desired, d.reason) == (3, Reason.BUSY_WORKERS)


def test_rule_under_a_rate_limit_busy_workers_do_not_hold_the_fleet() -> None:
    # Issue 10 item 4: QPS 20, 0.5 s tasks, 4 per pod. The fleet woke to 6 on the assumed 1 s; once
    # 0.5 s is measured the ceiling is 3. The limit spreads starts over all 6 pods, so every pod is
    # busy: a busy floor would hold 6 for the whole drain. A removed pod drains on SIGTERM.
    policy = replace(POLICY, qps=20.0, per_pod=4, stabilization_seconds=10, target_drain_seconds=5)
    fleet = tuple(worker(f"w{i}", busy=2, rate=20 / 6, latency=0.5, concurrency=4) for i in range(6))
    state = ScalingState(window=(Recommendation(990, 6),), last_active=990)
    d = decide(obs(now=995, backlog=500, workers=fleet, current=6), policy, state)
    assert (d.ceiling, d.desired, d.reason) == (3, 6, Reason.STABILIZATION)
    d = decide(obs(now=1001, backlog=450, workers=fleet, current=6), policy, d.state)
    assert (d.desired, d.reason) == (3, Reason.QPS_CEILING)
    assert d.throttled
    assert "QPS ceiling 3" in d.message


def test_rule_without_a_rate_limit_busy_workers_still_hold_the_fleet() -> None:
    fleet = busy_fleet(3, busy=1) + idle_fleet(3)
    policy = replace(POLICY, stabilization_seconds=0)
    d = decide(obs(now=1000, backlog=0, workers=fleet, current=6), policy, ScalingState(last_active=0))
    assert (d.desired, d.reason) == (3, Reason.BUSY_WORKERS)
    d = decide(obs(now=1000, backlog=0, workers=fleet, current=6), replace(policy, qps=1000.0), d.state)
    assert d.desired == 1


def test_rule_a_rollout_keeps_the_measured_latency_of_the_same_workload() -> None:
    # Issue 10 item 5: qps 8 -> 32 mid-run rolls the pods. The old pods drain (not live), the new
    # ones have measured nothing: they must not fall back to the assumed 1 s and jump to max.
    policy = replace(POLICY, qps=8.0, per_pod=4, max_replicas=20, workload="img tasks:f")
    fleet = tuple(worker(f"w{i}", busy=1, rate=4.0, latency=0.2, concurrency=4) for i in range(2))
    d = decide(obs(backlog=5000, workers=fleet, current=2), policy, ScalingState())
    assert d.latency_source is LatencySource.MEASURED
    faster = replace(policy, qps=32.0)
    new_pods = tuple(worker(f"n{i}", busy=0, rate=0.0, latency=0.0, concurrency=4) for i in range(2))
    old_pods = tuple(replace(w, live=False, draining=True) for w in fleet)
    d = decide(obs(backlog=5000, workers=new_pods + old_pods, current=2), faster, d.state)
    assert (d.latency_source, d.latency_seconds) == (LatencySource.REMEMBERED, 0.2)
    # 32 qps x 0.2 s / 4 x 1.1 = 1.76 -> 2 pods; the assumed 1 s would have said 9.
    assert d.ceiling == 2
    assert d.desired == 2
    # Another workload (a new function or image) measures afresh.
    other = replace(faster, workload="img tasks:g")
    d = decide(obs(backlog=5000, workers=new_pods, current=2), other, d.state)
    assert d.latency_source is LatencySource.ASSUMED


def test_rule_throttled_when_the_fleet_runs_at_the_limit_with_a_backlog() -> None:
    # Issue 10 item 3: 20 qps, 200 queued, the need fits under the ceiling, the fleet runs at 20/s.
    policy = replace(POLICY, qps=20.0, per_pod=4)
    fleet = tuple(worker(f"w{i}", busy=4, rate=20 / 3, latency=0.5, concurrency=4) for i in range(3))
    d = decide(obs(backlog=200, workers=fleet, current=3), policy, ScalingState())
    assert d.need <= d.ceiling  # type: ignore[operator]
    assert d.throttled  # 3 pods x 4 / 0.5 s = 24 starts/s possible > 20
    assert not decide(obs(backlog=0, workers=fleet, current=3), policy, ScalingState()).throttled
    slow = tuple(replace(w, latency_p50=5.0) for w in fleet)  # 2.4 starts/s possible: the pods bound it
    assert not decide(obs(backlog=200, workers=slow, current=3), policy, ScalingState()).throttled


def test_rule_limited_names_the_replica_bound_that_clamped() -> None:
    d = decide(obs(backlog=1_000_000, workers=busy_fleet(1), current=1), POLICY, ScalingState())
    assert d.limited is Reason.MAX_REPLICAS
    d = decide(obs(backlog=0), replace(POLICY, min_replicas=2), ScalingState())
    assert d.limited is Reason.MIN_REPLICAS
    d = decide(obs(backlog=100, workers=busy_fleet(1), current=1), POLICY, ScalingState())
    assert d.limited is None


def test_rule_busy_workers_above_current_never_cause_a_scale_up() -> None:
    # During a rollout old pods still heartbeat: busy may exceed the Deployment's replicas.
    policy = replace(POLICY, stabilization_seconds=0)
    d = decide(obs(backlog=0, workers=busy_fleet(6, busy=1), current=4), policy, ScalingState())
    assert d.desired <= 4


def test_rule_scale_in_removes_idle_pods_first() -> None:
    fleet = (
        worker("busy-2", busy=2),
        worker("idle", busy=0),
        worker("busy-7", busy=7),
        worker("stale", busy=3, live=False),
        worker("leaving", busy=1, draining=True),
    )
    costs = deletion_costs(fleet)
    assert costs == {"busy-2": 2, "idle": 0, "busy-7": 7, "stale": -1}
    assert scale_in_order(fleet) == ["stale", "idle", "busy-2", "busy-7"]


def test_rule_n_to_one_before_one_to_zero() -> None:
    policy = replace(POLICY, stabilization_seconds=0, cooldown_seconds=0)
    d = decide(obs(now=1000, workers=idle_fleet(5), current=5), policy, ScalingState(last_active=0))
    assert (d.desired, d.reason) == (1, Reason.STEP_TO_ONE)
    d = decide(obs(now=1002, workers=idle_fleet(1), current=1), policy, d.state)
    assert (d.desired, d.reason) == (0, Reason.IDLE)


def test_rule_zero_only_after_cooldown() -> None:
    policy = replace(POLICY, stabilization_seconds=0, cooldown_seconds=120)
    state = ScalingState(last_active=1000)
    d = decide(obs(now=1100, workers=idle_fleet(1), current=1), policy, state)
    assert (d.desired, d.reason) == (1, Reason.COOLDOWN)
    assert "idle 100 s" in d.message
    d = decide(obs(now=1121, workers=idle_fleet(1), current=1), policy, d.state)
    assert d.desired == 0


def test_rule_zero_never_with_in_flight_work_or_busy_workers() -> None:
    policy = replace(POLICY, stabilization_seconds=0, cooldown_seconds=0)
    old = ScalingState(last_active=0)
    d = decide(obs(now=1000, in_flight=1, workers=idle_fleet(1), current=1), policy, old)
    assert d.desired == 1
    d = decide(obs(now=1000, workers=busy_fleet(1, busy=1), current=1), policy, old)
    assert d.desired == 1


def test_rule_first_tick_counts_as_active_so_a_restart_never_skips_cooldown() -> None:
    policy = replace(POLICY, stabilization_seconds=0, cooldown_seconds=120)
    d = decide(obs(now=5000, workers=idle_fleet(1), current=1), policy, ScalingState())
    assert (d.desired, d.reason) == (1, Reason.COOLDOWN)


def test_rule_leave_zero_at_once_straight_to_need() -> None:
    d = decide(obs(backlog=4000, current=0), POLICY, ScalingState(last_active=0))
    assert (d.desired, d.reason) == (math.ceil(4000 / 240), Reason.WAKE)


def test_rule_leave_zero_for_a_single_message() -> None:
    d = decide(obs(backlog=1, current=0), POLICY, ScalingState())
    assert (d.desired, d.reason) == (1, Reason.WAKE)


def test_rule_no_live_worker_with_backlog_is_an_alarm_and_never_shrinks() -> None:
    stale = tuple(worker(f"s{i}", live=False) for i in range(4))
    policy = replace(POLICY, stabilization_seconds=0)
    d = decide(obs(backlog=10, workers=stale, current=4), policy, ScalingState(last_active=0))
    assert d.no_live_workers_alarm
    assert (d.desired, d.reason) == (4, Reason.NO_LIVE_WORKERS)
    assert d.stale_workers == 4


def test_rule_no_live_worker_alarm_scales_up_immediately() -> None:
    d = decide(obs(backlog=2400, current=1), POLICY, ScalingState())
    assert d.no_live_workers_alarm
    assert (d.desired, d.reason) == (10, Reason.NO_LIVE_WORKERS)


def test_rule_stale_workers_are_not_busy() -> None:
    policy = replace(POLICY, stabilization_seconds=0, cooldown_seconds=0)
    fleet = (worker("live"), worker("stale", busy=8, live=False))
    d = decide(obs(workers=fleet, current=2), policy, ScalingState(last_active=0))
    assert d.busy_workers == 0
    assert d.desired == 1


def test_rule_pin_wins_over_everything() -> None:
    policy = replace(POLICY, pinned=5, qps=1.0)
    d = decide(obs(backlog=1_000_000, current=1), policy, ScalingState())
    assert (d.desired, d.reason) == (5, Reason.PINNED)
    d = decide(obs(backlog=0, current=5), replace(policy, pinned=0), ScalingState())
    assert d.desired == 0


def test_rule_explain_every_decision() -> None:
    d = decide(obs(backlog=1200, current=0), replace(POLICY, qps=50.0), ScalingState())
    assert d.message.startswith("0 -> 5: ")
    assert "backlog 1200" in d.message
    last = d.last_scale("2026-01-01T00:00:00Z")
    assert last["from"] == 0
    assert last["to"] == 5
    assert last["reason"] == "WakeFromZero"
    assert last["inputs"]["need"] == 5
    assert last["inputs"]["qpsCeiling"] == 7
    assert last["inputs"]["latencySource"] == "assumed"


def test_eta_is_work_over_throughput() -> None:
    d = decide(obs(backlog=160, in_flight=16, workers=busy_fleet(2), current=2), POLICY, ScalingState())
    assert d.throughput == 16.0
    assert d.eta_seconds == 11.0
    assert decide(obs(backlog=5), POLICY, ScalingState()).eta_seconds is None


def test_window_stays_small() -> None:
    state = ScalingState()
    for t in range(1000):
        d = decide(obs(now=t * 2.0, backlog=(t * 37) % 5000, current=3), POLICY, state)
        state = d.state
    # Only the strictly decreasing suffix of the last 60 s can remain.
    assert len(state.window) <= 31


def test_decision_is_deterministic() -> None:
    o = obs(backlog=999, workers=busy_fleet(3), current=3)
    assert decide(o, POLICY, ScalingState()) == decide(o, POLICY, ScalingState())


# --- Heartbeats and silent pods --------------------------------------------------------------------


def heartbeat(**kw: object) -> Heartbeat:
    hb: Heartbeat = {
        "worker": "pod-a",
        "pod": "pod-a",
        "state": "running",
        "started": 0.0,
        "time": 100.0,
        "interval": 2.0,
        "concurrency": 8,
        "busy": 3,
        "in_flight": 4,
        "processed": 10,
        "failed": 0,
        "dead_lettered": 0,
        "rate": 3.0,
        "latency_p50": 1.0,
        "latency_p95": 2.0,
        "latency_p99": 3.0,
        "version": "0.1.0",
    }
    hb.update(kw)  # type: ignore[typeddict-item]
    return hb


def test_worker_is_live_within_missed_heartbeats_of_its_own_interval() -> None:
    assert worker_sample(heartbeat(), now=106.0, missed_heartbeats=3).live
    assert not worker_sample(heartbeat(), now=106.1, missed_heartbeats=3).live
    assert worker_sample(heartbeat(interval=10.0), now=129.0, missed_heartbeats=3).live


def test_a_worker_s_uptime_is_taken_at_its_heartbeat() -> None:
    assert worker_sample(heartbeat(started=97.5), now=101.0, missed_heartbeats=3).uptime == 2.5
    assert worker_sample(heartbeat(started=101.0), now=101.0, missed_heartbeats=3).uptime == 0.0


def test_draining_worker_is_not_capacity() -> None:
    s = worker_sample(heartbeat(state="draining"), now=100.0, missed_heartbeats=3)
    assert s.draining
    assert not s.live


def test_silent_pods_are_measured_from_start_or_last_heartbeat() -> None:
    pods = [PodInfo("never", running_since=0), PodInfo("quiet", 0), PodInfo("fine", 0), PodInfo("young", 90)]
    beats = {"quiet": 50.0, "fine": 199.0}
    assert silent_pods(pods, beats, now=200, replace_after_seconds=120) == ["never", "quiet"]
    assert silent_pods(pods, beats, now=200, replace_after_seconds=0) == []


# --- Properties ------------------------------------------------------------------------------------

workers_st = st.builds(
    worker,
    name=st.text("abcdefgh", min_size=1, max_size=6),
    busy=st.integers(0, 16),
    live=st.booleans(),
    draining=st.booleans(),
    rate=st.floats(0, 500, allow_nan=False),
    latency=st.floats(0, 120, allow_nan=False),
)


@st.composite
def policies(draw: st.DrawFn, pinned: bool = False) -> Policy:
    low = draw(st.integers(0, 20))
    return Policy(
        min_replicas=low,
        max_replicas=draw(st.integers(max(1, low), 60)),
        target_drain_seconds=draw(st.floats(1, 600)),
        stabilization_seconds=draw(st.sampled_from([0.0, 2.0, 60.0, 300.0])),
        cooldown_seconds=draw(st.sampled_from([0.0, 30.0, 120.0])),
        per_pod=draw(st.integers(1, 64)),
        qps=draw(st.none() | st.floats(0.01, 10_000)),
        qps_headroom=draw(st.floats(0, 1)),
        assumed_task_seconds=draw(st.floats(0.001, 60)),
        pinned=draw(st.integers(0, 100)) if pinned else None,
    )


observations = st.builds(
    obs,
    now=st.floats(0, 10_000),
    backlog=st.integers(0, 1_000_000) | st.just(0),
    in_flight=st.integers(0, 1000) | st.just(0),
    workers=st.lists(workers_st, max_size=12).map(tuple),
    current=st.integers(0, 80),
)


@st.composite
def states(draw: st.DrawFn) -> ScalingState:
    recs = draw(st.lists(st.tuples(st.floats(0, 10_000), st.integers(0, 80)), max_size=8))
    return ScalingState(
        window=tuple(Recommendation(t, r) for t, r in sorted(recs)),
        last_active=draw(st.none() | st.floats(0, 10_000)),
    )


@given(observations, policies(), states())
def test_property_within_min_and_max(o: Observation, p: Policy, s: ScalingState) -> None:
    assert p.min_replicas <= decide(o, p, s).desired <= p.max_replicas


@given(observations, policies(pinned=True), states())
def test_property_pin_is_exact(o: Observation, p: Policy, s: ScalingState) -> None:
    d = decide(o, p, s)
    assert d.desired == p.pinned
    assert d.reason is Reason.PINNED


@given(observations, policies(), states())
def test_property_throttled_never_adds_pods_above_the_ceiling(
    o: Observation, p: Policy, s: ScalingState
) -> None:
    d = decide(o, p, s)
    if d.throttled:
        assert d.ceiling is not None
        assert o.backlog > 0
    if d.ceiling is not None and d.need > d.ceiling and d.desired > d.current:
        assert d.desired == min(max(d.ceiling, p.min_replicas), p.max_replicas)


@given(observations, policies(), st.floats(0.01, 10_000))
def test_property_fresh_throttled_decision_is_exactly_the_ceiling(
    o: Observation, p: Policy, qps: float
) -> None:
    # With no history to hold it up, a fleet whose need is above the ceiling sits at the ceiling
    # (+0), however busy its workers are: under a rate limit there is no busy floor.
    p = replace(p, qps=qps, min_replicas=0, stabilization_seconds=0)
    d = decide(o, p, ScalingState())
    capped = d.ceiling is not None and d.need > d.ceiling and d.ceiling < p.max_replicas
    if capped and not d.no_live_workers_alarm:
        assert d.desired == d.ceiling


@given(observations, policies(), states())
def test_property_scale_up_is_one_step_to_the_recommendation(
    o: Observation, p: Policy, s: ScalingState
) -> None:
    d = decide(o, p, s)
    if d.desired > d.current:
        assert d.desired == d.recommendation
        # Applying the decision and deciding again at the same instant does not step further.
        again = decide(replace(o, current_replicas=d.desired), p, d.state)
        assert again.desired == d.desired


@given(observations, policies(), states())
def test_property_scale_down_never_below_busy_workers(o: Observation, p: Policy, s: ScalingState) -> None:
    d = decide(o, p, s)
    if d.desired < d.current and p.qps is None:
        assert d.desired >= min(o.busy_workers, d.current, p.max_replicas)


@given(observations, policies(), states())
def test_property_never_shrinks_during_the_no_live_worker_alarm(
    o: Observation, p: Policy, s: ScalingState
) -> None:
    d = decide(o, p, s)
    if d.no_live_workers_alarm:
        assert d.desired >= min(d.current, p.max_replicas)


@given(observations, policies(), states())
def test_property_zero_only_from_one_after_cooldown_when_idle(
    o: Observation, p: Policy, s: ScalingState
) -> None:
    d = decide(o, p, s)
    if d.desired == 0 and d.current > 0:
        assert d.current == 1
        assert o.backlog == 0
        assert o.in_flight == 0
        assert o.busy_workers == 0
        # The first tick counts as active: no history means idle for 0 s.
        last_active = o.now if s.last_active is None else s.last_active
        assert o.now - last_active >= p.cooldown_seconds


@given(observations, policies(), states())
def test_property_from_zero_jumps_straight_to_need(o: Observation, p: Policy, s: ScalingState) -> None:
    o = replace(o, current_replicas=0)
    d = decide(o, p, s)
    if o.backlog + o.in_flight > 0:
        expected = max(p.min_replicas, min(d.need, d.ceiling or d.need, p.max_replicas))
        assert d.desired == expected
        assert d.desired >= 1


@given(observations, policies(), states())
def test_property_decision_is_explained(o: Observation, p: Policy, s: ScalingState) -> None:
    d = decide(o, p, s)
    assert d.message
    assert str(d.desired) in d.message.split(":")[0]
    assert set(d.inputs()) >= {"backlog", "inFlight", "need", "qpsCeiling", "liveWorkers", "busyWorkers"}


@settings(max_examples=60)
@given(
    policies(),
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 12)), min_size=1, max_size=60),
)
def test_property_simulated_run_respects_every_rule(p: Policy, ticks: list[tuple[int, int]]) -> None:
    """Replay a tick sequence, applying each decision, and check the rules that span ticks."""
    state = ScalingState()
    current = 0
    now = 0.0
    last_work: float | None = None
    for backlog, busy in ticks:
        now += 2.0
        fleet = tuple(worker(f"w{i}", busy=1 if i < busy else 0) for i in range(current))
        o = obs(now=now, backlog=backlog, workers=fleet, current=current)
        if o.has_work:
            last_work = now
        d = decide(o, p, state)
        assert p.min_replicas <= d.desired <= p.max_replicas
        if d.desired == 0 and current > 0:
            assert current == 1
            assert last_work is None or now - last_work >= p.cooldown_seconds
        if current == 0 and backlog > 0:
            assert d.desired >= 1
        state, current = d.state, d.desired


def test_decision_fields_are_frozen() -> None:
    d: Decision = decide(obs(backlog=1), POLICY, ScalingState())
    try:
        d.desired = 3  # type: ignore[misc]
    except AttributeError:
        return
    raise AssertionError("Decision must be immutable")


# Pod names are unique in a namespace; a fleet with two samples for one pod is not a real input.
@given(st.lists(workers_st, max_size=20, unique_by=lambda w: w.pod))
def test_property_idle_pods_cost_less_than_busy_ones(fleet: list[WorkerSample]) -> None:
    assume(fleet)
    costs = deletion_costs(fleet)
    for w in fleet:
        if w.live and w.busy == 0 and w.pod in costs:
            busy_costs = [costs[x.pod] for x in fleet if x.live and x.busy > 0 and x.pod != w.pod]
            assert all(costs[w.pod] <= c for c in busy_costs)


def test_policy_from_spec() -> None:
    from sluiceway_operator.spec import parse_spec

    raw = {
        "image": "i",
        "function": "m:f",
        "broker": {"type": "redis"},
        "rateLimit": {"qps": 50},
        "concurrency": {"perPod": 16},
        "scaling": {"minReplicas": 1, "maxReplicas": 20, "cooldownSeconds": 30},
        "replicas": 4,
    }
    p = Policy.from_spec(parse_spec(raw, name="q"))
    assert (p.min_replicas, p.max_replicas, p.per_pod, p.qps, p.pinned) == (1, 20, 16, 50.0, 4)
    assert (p.cooldown_seconds, p.stabilization_seconds, p.target_drain_seconds) == (30, 60, 30)
    assert (p.qps_headroom, p.assumed_task_seconds) == (0.1, 1.0)
