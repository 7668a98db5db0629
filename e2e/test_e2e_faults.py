"""End to end under faults: a worker killed with SIGKILL, the operator killed and restarted, Redis
restarted, all mid-burst; bad manifests and bad messages.

Same setup as ``test_e2e_burst.py``: real control plane, test kubelet, real Redis, the operator as
its own process with its least-privilege ServiceAccount. Each burst scenario prints its figures
(``[e2e figures] ...``) and asserts them: nothing lost, duplicates counted, the QPS bound held.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from tests.support.redis_server import RedisServer

from localcluster.cluster import LocalCluster
from sluiceway import fleet
from sluiceway.contract import Keys
from sluiceway.publish import Publisher
from sluiceway_operator.scaling import qps_ceiling
from support import (
    Figures,
    MaxReplicas,
    Operator,
    burst_taskqueue,
    cond,
    figures,
    get_dep,
    get_tq,
    install_crd,
    install_operator_rbac,
    replicas,
    start_bound,
    start_operator,
    taskqueue,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(300)]

# The ceiling is sized on the latency the pods measure, and the peak is asserted against the
# ceiling at the nominal TASK_SECONDS, so the nominal figure sits mid-way in its pod interval: at
# 120 QPS, 2 pods up to 75.8 ms. At 150 QPS the boundary was 60.6 ms, and a loaded machine
# measured 61 ms for 50 ms tasks for seconds on end, which by the formula is rightly 3 pods.
QPS = 120
PER_POD = 5
TASK_SECONDS = 0.05
MESSAGES = 1500  # 12.5 s at the limit
CEILING = qps_ceiling(QPS, latency=TASK_SECONDS, per_pod=PER_POD, headroom=0.1)  # 1.32 -> 2 pods


@dataclass
class Harness:
    """The module's operator; a test may replace ``op`` (operator restart)."""

    op: Operator
    kubeconfig: Path
    namespace: str
    log: Path

    def restart(self, sig: int = signal.SIGKILL, down_for: float = 2.0) -> None:
        self.op.proc.send_signal(sig)
        self.op.proc.wait(20)
        # Not a wait: ``down_for`` is the outage the scenario injects (the fleet runs unmanaged).
        time.sleep(down_for)
        self.op = start_operator(self.kubeconfig, self.namespace, self.log)


@pytest.fixture(scope="module")
def harness(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    install_crd(kube_cluster)
    ns = kube_cluster.fresh_namespace("op")
    kubeconfig = install_operator_rbac(kube_cluster, ns)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    h = Harness(start_operator(kubeconfig, ns, log), kubeconfig, ns, log)
    yield h
    h.op.stop()


def burst_queue(name: str, redis_url: str, **over: Any) -> dict[str, Any]:
    return burst_taskqueue(
        name,
        redis_url,
        qps=QPS,
        per_pod=PER_POD,
        task_seconds=TASK_SECONDS,
        max_replicas=6,
        drain_seconds=5,
        # Task failures caused by a fault (Redis down) are retried quickly and often enough.
        retry={"maxAttempts": 10, "backoffSeconds": 0.2, "maxBackoffSeconds": 1},
        liveness={"heartbeatSeconds": 0.5, "leaseSeconds": 5},
        **over,
    )


class Burst:
    """Publish a burst into a fresh TaskQueue and collect its figures at the end."""

    def __init__(self, c: LocalCluster, h: Harness, ns: str, name: str, redis_url: str) -> None:
        self.c, self.h, self.ns, self.name, self.redis_url = c, h, ns, name, redis_url
        c.apply(burst_queue(name, redis_url), ns)
        until(h.op, lambda: replicas(c, ns, name) == 0, 30, "the worker Deployment at 0")
        self.sampler = MaxReplicas(c, ns, name)
        self.t0 = time.monotonic()
        Publisher(redis_url).publish_batch(
            f"{ns}/{name}", ({"n": i, "sleep": TASK_SECONDS} for i in range(MESSAGES))
        )

    def wait_done(self, r: redis.Redis, at_least: int, timeout: float = 120) -> None:
        until(self.h.op, lambda: r.hlen("test:done") >= at_least, timeout, f"{at_least} messages done")

    def finish(self, scenario: str, r: redis.Redis) -> Figures:
        self.wait_done(r, MESSAGES, 180)
        drained = time.monotonic() - self.t0
        until(self.h.op, lambda: replicas(self.c, self.ns, self.name) == 0, 90, "the fleet back at zero")
        at_zero = time.monotonic() - self.t0
        seen = self.sampler.stop()
        stats = fleet.queue_stats(r, Keys(self.ns, self.name))
        f = figures(
            scenario,
            r,
            MESSAGES,
            seen_replicas=seen,
            ceiling=CEILING,
            limit=start_bound(QPS),
            drain_seconds=drained,
            zero_seconds=at_zero,
            dead=stats.dead,
        )
        print(f"\n{f.line()}\nreplicas over time: {seen}")
        assert (stats.backlog, stats.in_flight) == (0, 0)
        assert f.lost == 0 and f.dead == 0 and f.processed == MESSAGES, f.line()
        assert f.worst_window <= start_bound(QPS), f.line()
        assert f.peak_replicas <= CEILING, seen
        self.c.kubectl("delete", "taskqueue", self.name, "-n", self.ns, "--wait=false")
        return f


def test_worker_killed_with_sigkill_mid_burst_loses_nothing(
    kube_cluster: LocalCluster, harness: Harness, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    b = Burst(c, harness, ns, "crash", redis_url)
    b.wait_done(r, MESSAGES // 5)
    victim, pids = next((pod, pids) for pod, pids in c.pods_processes(ns).items() if pids)
    in_flight_before = fleet.queue_stats(r, Keys(ns, "crash")).in_flight
    os.kill(pids[0], signal.SIGKILL)
    killed_at = r.hlen("test:done")
    f = b.finish("worker kill -9 mid-burst", r)
    exits = [e for e in c.require_kubelet().exits(ns) if e.pod == victim and e.pid == pids[0]]
    print(
        f"killed {victim} (pid {pids[0]}) after {killed_at} messages; fleet in-flight then: {in_flight_before}"
    )
    assert exits and exits[0].signal == signal.SIGKILL and exits[0].exit_code == 137, exits
    pod = c.get(f"/api/v1/namespaces/{ns}/pods/{victim}") if _pod_exists(c, ns, victim) else None
    if pod is not None:  # the container restarted in place, same worker id
        assert pod["status"]["containerStatuses"][0]["restartCount"] >= 1
    # Only what the dead process held can run twice: at most its concurrency.
    assert f.duplicates <= PER_POD, f.line()


def _pod_exists(c: LocalCluster, ns: str, pod: str) -> bool:
    try:
        c.get(f"/api/v1/namespaces/{ns}/pods/{pod}")
    except Exception:
        return False
    return True


def test_operator_restart_mid_burst_duplicates_nothing(
    kube_cluster: LocalCluster, harness: Harness, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    b = Burst(c, harness, ns, "oprestart", redis_url)
    until(harness.op, lambda: replicas(c, ns, "oprestart") == CEILING, 30, f"{CEILING} replicas")
    b.wait_done(r, MESSAGES // 5)
    dep = get_dep(c, ns, "oprestart")
    assert dep is not None
    uid, generation = dep["metadata"]["uid"], dep["metadata"]["generation"]
    harness.restart(signal.SIGKILL, down_for=2)
    restarted_at = r.hlen("test:done")
    # Read the Deployment while the TaskQueue still owns it: finish() deletes the TaskQueue and
    # garbage collection then removes the Deployment.
    b.wait_done(r, MESSAGES, 180)
    dep = get_dep(c, ns, "oprestart")
    assert dep is not None
    f = b.finish("operator kill -9 + restart mid-burst", r)
    seen = b.sampler.seen
    print(f"operator restarted after {restarted_at} messages; Deployment uid kept, generation {generation}")
    # The restarted operator adopted the same Deployment: not recreated, not re-scaled from 0,
    # its pod template untouched (the generation moves only with replica changes).
    assert dep["metadata"]["uid"] == uid
    assert seen[:2] == [0, CEILING], seen
    assert 0 not in seen[1:-1], f"the fleet dropped to zero mid-burst: {seen}"
    assert f.duplicates == 0, f.line()
    assert harness.op.proc.poll() is None


def test_redis_restart_mid_burst_workers_and_operator_recover(
    kube_cluster: LocalCluster,
    harness: Harness,
    ns: str,
    redis_url: str,
    r: redis.Redis,
    redis_server: RedisServer,
) -> None:
    c = kube_cluster
    b = Burst(c, harness, ns, "redisrestart", redis_url)
    until(harness.op, lambda: replicas(c, ns, "redisrestart") == CEILING, 30, f"{CEILING} replicas")
    b.wait_done(r, MESSAGES // 5)
    redis_server.restart(down_for=3)  # the scenario: a 3 s Redis outage mid-burst
    # Check the condition while the TaskQueue still exists: finish() deletes it.
    b.wait_done(r, MESSAGES, 180)
    until(
        harness.op,
        lambda: cond(get_tq(c, ns, "redisrestart"), "Degraded").get("status") == "False",
        30,
        "Degraded cleared",
    )
    assert b"RedisUnreachable" in harness.log.read_bytes(), "the outage was reported as Degraded"
    f = b.finish("Redis restart (3 s down) mid-burst", r)
    # Only a message a pod held when Redis went down can start again (its task cut off by the
    # outage and retried, or its lease expired meanwhile), once: under a rate limit a pod holds
    # at most perPod messages (no prefetch).
    assert f.duplicates <= f.peak_replicas * PER_POD, f.line()
    assert harness.op.proc.poll() is None


BAD_MANIFESTS: list[tuple[str, dict[str, Any], str]] = [
    ("function", {"function": "not a function"}, "spec.function"),
    ("qps", {"rateLimit": {"qps": 0}}, "spec.rateLimit.qps"),
    ("perpod", {"concurrency": {"perPod": 0}}, "spec.concurrency.perPod"),
    ("minmax", {"scaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.scaling"),
    ("lease", {"liveness": {"heartbeatSeconds": 5, "leaseSeconds": 6}}, "spec.liveness"),
    ("broker", {"broker": {"type": "kafka"}}, "spec.broker"),
]


def test_bad_manifests_are_rejected_with_field_level_messages(
    kube_cluster: LocalCluster, harness: Harness, ns: str, redis_url: str
) -> None:
    c = kube_cluster
    for name, spec, field in BAD_MANIFESTS:
        body = taskqueue(f"bad-{name}", redis_url, **spec)
        done = c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
        print(f"bad manifest {name}: {done.stderr.strip()}")
        assert done.returncode != 0, name
        assert field in done.stderr, (name, done.stderr)
    assert "must not exceed scaling.maxReplicas" in _stderr_of(c, ns, redis_url, "minmax")
    # Nothing was stored, so the operator never saw them.
    listed = c.kubectl("get", "taskqueues", "-n", ns, "-o", "name", check=True).stdout
    assert listed.strip() == ""


def _stderr_of(c: LocalCluster, ns: str, redis_url: str, which: str) -> str:
    spec = next(s for n, s, _ in BAD_MANIFESTS if n == which)
    body = taskqueue(f"bad-{which}", redis_url, **spec)
    return c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body)).stderr


def test_poison_messages_are_dead_lettered_with_reasons_and_the_fleet_keeps_going(
    kube_cluster: LocalCluster, harness: Harness, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    c.apply(
        taskqueue(
            "poison",
            redis_url,
            function="tests.tasks:misbehave",
            rateLimit={"qps": 100},
            retry={"maxAttempts": 2, "backoffSeconds": 0.1, "maxBackoffSeconds": 0.2},
            scaling={"maxReplicas": 3, "assumedTaskSeconds": 0.05, "targetDrainSeconds": 2},
        ),
        ns,
    )
    until(harness.op, lambda: replicas(c, ns, "poison") == 0, 30, "the worker Deployment at 0")
    keys = Keys(ns, "poison")
    good = 300
    modes = {0: "reject", 1: "raise", 2: "flaky"}  # per 20 messages; the rest are "ok"
    messages = [{"n": i, "mode": modes.get(i % 20, "ok")} for i in range(good)]
    t0 = time.monotonic()
    pub = Publisher(redis_url)
    pub.publish_batch(f"{ns}/poison", messages[: good // 2])
    r.lpush(keys.ready, b"{malformed json", b"[1, 2, 3]")
    pub.publish(f"{ns}/poison", {"n": 9999, "unexpected": True})
    pub.publish_batch(f"{ns}/poison", messages[good // 2 :])
    expected_dead = {"rejected": good // 20, "error": good // 20, "invalid_json": 1}
    expected_dead.update({"not_an_object": 1, "bad_arguments": 1})
    ok = [m["n"] for m in messages if m["mode"] in ("ok", "flaky")]
    until(
        harness.op,
        lambda: r.llen(keys.dead) == sum(expected_dead.values()) and r.hlen("test:done") == len(ok),
        120,
        "every message done or dead-lettered",
    )
    drained = time.monotonic() - t0
    until(harness.op, lambda: replicas(c, ns, "poison") == 0, 60, "zero replicas")
    dead = fleet.dead_letters(r, keys, 1000)
    by_reason: dict[str, int] = {}
    for e in dead:
        by_reason[str(e["reason"])] = by_reason.get(str(e["reason"]), 0) + 1
        assert e["detail"], e
    done = {int(k) for k in r.hkeys("test:done")}
    print(
        f"\n[e2e figures] poison messages: messages={good + 3} processed={len(done)} "
        f"dead-lettered={len(dead)} {by_reason} drain={drained:.1f} s to-zero={time.monotonic() - t0:.1f} s"
    )
    assert by_reason == expected_dead
    assert done == set(ok)  # the fleet kept going: every good message, flaky ones on their retry
    raised = next(e for e in dead if e["reason"] == "error")
    assert "ValueError" in str(raised["detail"]) and raised["attempts"] == 2
    rejected = next(e for e in dead if e["reason"] == "rejected")
    assert "poison" in str(rejected["detail"]) and rejected["attempts"] == 1
    c.kubectl("delete", "taskqueue", "poison", "-n", ns, "--wait=false")


def test_pod_deleted_while_the_operator_is_down_gets_its_messages_back_on_restart(
    kube_cluster: LocalCluster, harness: Harness, ns: str, redis_url: str, r: redis.Redis
) -> None:
    c = kube_cluster
    # Leases last 60 s and tasks 30 s: only the operator's sweep can bring them back quickly.
    c.apply(
        taskqueue(
            "orphans",
            redis_url,
            timeoutSeconds=60,
            scaling={"minReplicas": 2, "maxReplicas": 2},
        ),
        ns,
    )
    Publisher(redis_url).publish_batch(f"{ns}/orphans", ({"n": i, "sleep": 30} for i in range(4)))
    until(harness.op, lambda: sum(int(v) for v in r.hvals("test:seen")) == 4, 60, "4 messages started")
    keys = Keys(ns, "orphans")
    victim = until(
        harness.op,
        lambda: next((b["pod"] for b in fleet.heartbeats(r, keys) if b["busy"] == 2), None),
        30,
        "a heartbeat showing 2 running tasks",
    )
    harness.op.proc.send_signal(signal.SIGKILL)
    harness.op.proc.wait(20)
    c.kubectl("delete", "pod", victim, "-n", ns, "--grace-period=0", "--force", check=True)
    # The pod is gone from the API while no operator watched; then the operator comes back.
    c.wait_for(lambda: victim not in c.pods_processes(ns), 30, "the victim's process gone")
    deleted_at = time.monotonic()
    harness.restart(signal.SIGKILL, down_for=0)
    until(
        harness.op,
        lambda: sum(int(v) for v in r.hvals("test:seen")) >= 6,
        45,
        "the victim's messages restarted",
    )
    back_after = time.monotonic() - deleted_at
    print(
        f"\n[e2e figures] pod deleted while the operator was down: its 2 messages restarted "
        f"{back_after:.1f} s after the restart (lease 60 s)"
    )
    assert b"returned the leases of a deleted pod" in harness.log.read_bytes()
    assert r.zcard(keys.inflight(victim)) == 0
