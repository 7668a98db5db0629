"""Spec parsing: defaults, the field named in every error, and agreement with the CRD's defaults."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluiceway_operator.spec import (
    DEFAULTS,
    BrokerType,
    ConcurrencyMode,
    SecretKeyRef,
    SpecError,
    keys_for,
    parse_spec,
)

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "taskqueue.yaml"
MINIMAL: dict[str, Any] = {"image": "img:1", "function": "thumbs.tasks:make", "broker": {"type": "redis"}}


def parse(**changes: Any) -> Any:
    raw = copy.deepcopy(MINIMAL)
    raw.update(changes)
    return parse_spec(raw, name="thumbs")


def crd_schema() -> Mapping[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    schema: Mapping[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def crd_defaults(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf ``default`` in the schema, by dotted path (``schedules[]`` for list items)."""
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        if "default" in prop and prop["default"] != {}:
            yield path, prop["default"]
        if prop.get("type") == "object":
            yield from crd_defaults(prop, path + ".")
        if prop.get("type") == "array" and "items" in prop:
            yield from crd_defaults(prop["items"], path + "[].")


def flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_crd_and_python_defaults_agree() -> None:
    assert dict(crd_defaults(crd_schema())) == dict(flatten(DEFAULTS))


def test_crd_objects_with_defaulted_children_default_to_empty_objects() -> None:
    # Without `default: {}` on the parent, a spec that omits `scaling` would get no nested defaults.
    props = crd_schema()["properties"]
    for section in ("concurrency", "retry", "liveness", "scaling"):
        assert props[section]["default"] == {}, section


def test_minimal_spec_gets_every_default() -> None:
    spec = parse()
    assert spec.broker.type is BrokerType.REDIS
    assert spec.broker.queue == "thumbs"  # defaults to the TaskQueue's name
    assert spec.broker.url_secret_ref is None
    assert spec.rate_limit.qps is None
    assert spec.concurrency.mode is ConcurrencyMode.THREAD
    assert spec.concurrency.per_pod == 8
    assert spec.retry.max_attempts == 5
    assert spec.timeout_seconds == 300
    assert spec.scaling.min_replicas == 0
    assert spec.scaling.max_replicas == 10
    assert spec.scaling.qps_headroom == 0.1
    assert spec.liveness.lease_seconds == 15
    assert spec.replicas is None
    assert spec.schedules == ()
    assert spec.pod_template.automount_service_account_token is False


def test_the_parsed_defaults_are_the_crd_defaults() -> None:
    spec = parse()
    scaling = DEFAULTS["scaling"]
    assert spec.scaling.target_drain_seconds == scaling["targetDrainSeconds"]
    assert spec.scaling.cooldown_seconds == scaling["cooldownSeconds"]
    assert spec.scaling.scale_down_stabilization_seconds == scaling["scaleDownStabilizationSeconds"]
    assert spec.scaling.poll_interval_seconds == scaling["pollIntervalSeconds"]
    assert spec.scaling.assumed_task_seconds == scaling["assumedTaskSeconds"]


def test_full_spec() -> None:
    spec = parse(
        broker={"type": "kafka", "queue": "thumbs.v1", "urlSecretRef": {"name": "kafka", "key": "url"}},
        coordination={"urlSecretRef": {"name": "redis", "key": "url"}},
        rateLimit={"qps": 50, "burst": 5},
        replicas=3,
        schedules=[
            {"name": "nightly", "cron": "0 3 * * mon-fri", "timeZone": "Europe/Berlin", "message": {"a": 1}}
        ],
        podTemplate={"labels": {"team": "media"}, "securityContext": {"runAsUser": 1000}},
    )
    assert spec.broker.url_secret_ref == SecretKeyRef("kafka", "url")
    assert spec.coordination_secret_ref == SecretKeyRef("redis", "url")
    assert spec.rate_limit.qps == 50.0
    assert spec.replicas == 3
    assert spec.schedules[0].time_zone == "Europe/Berlin"
    assert spec.schedules[0].suspend is False
    assert spec.pod_template.security_context.run_as_user == 1000
    assert keys_for("media", spec).prefix == "sluiceway:{media/thumbs.v1}:"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"function": "no_colon"}, "spec.function"),
        ({"function": "a..b:c"}, "spec.function"),
        ({"image": ""}, "spec.image"),
        ({"broker": {"type": "sqs"}}, "spec.broker.type"),
        ({"broker": {"type": "kafka"}}, "spec.broker.urlSecretRef"),
        (
            {"broker": {"type": "rabbitmq", "queue": "amq.x", "urlSecretRef": {"name": "a", "key": "b"}}},
            "spec.broker.queue",
        ),
        ({"broker": {"type": "redis", "queue": "{braces}"}}, "spec.broker.queue"),
        ({"broker": {"type": "redis", "urlSecretRef": {"name": "a"}}}, "spec.broker.urlSecretRef.key"),
        ({"rateLimit": {"qps": 0}}, "spec.rateLimit.qps"),
        ({"rateLimit": {}}, "spec.rateLimit.qps"),
        ({"concurrency": {"perPod": 0}}, "spec.concurrency.perPod"),
        ({"concurrency": {"mode": "fork"}}, "spec.concurrency.mode"),
        ({"retry": {"backoffSeconds": 10, "maxBackoffSeconds": 5}}, "spec.retry.maxBackoffSeconds"),
        ({"liveness": {"heartbeatSeconds": 10}}, "spec.liveness.leaseSeconds"),
        ({"scaling": {"minReplicas": 5, "maxReplicas": 4}}, "spec.scaling.minReplicas"),
        ({"scaling": {"maxReplicas": 0}}, "spec.scaling.maxReplicas"),
        ({"scaling": {"maxReplicas": True}}, "spec.scaling.maxReplicas"),
        ({"scaling": {"qpsHeadroom": "lots"}}, "spec.scaling.qpsHeadroom"),
        ({"replicas": -1}, "spec.replicas"),
        ({"timeoutSeconds": 0}, "spec.timeoutSeconds"),
        ({"schedules": [{"name": "Bad_Name", "cron": "* * * * *"}]}, "spec.schedules[0].name"),
        (
            {"schedules": [{"name": "x", "cron": "* * * * *"}, {"name": "x", "cron": "0 * * * *"}]},
            "spec.schedules[1].name",
        ),
        ({"podTemplate": {"env": [{"name": "SLUICEWAY_QPS", "value": "1"}]}}, "spec.podTemplate.env[0].name"),
        ({"podTemplate": {"labels": {"app.kubernetes.io/name": "x"}}}, "spec.podTemplate.labels"),
        ({"podTemplate": {"labels": {"sluiceway.dev/taskqueue": "x"}}}, "spec.podTemplate.labels"),
        (
            {"podTemplate": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "1"}}},
            "spec.podTemplate.annotations",
        ),
        (
            {"podTemplate": {"securityContext": {"runAsUser": 0}}},
            "spec.podTemplate.securityContext.runAsUser",
        ),
        ({"podTemplate": "nope"}, "spec.podTemplate"),
    ],
)
def test_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(**changes)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")


def test_missing_required_fields() -> None:
    for key in ("image", "function", "broker"):
        raw = {k: v for k, v in MINIMAL.items() if k != key}
        with pytest.raises(SpecError, match=f"spec.{key}: is required"):
            parse_spec(raw, name="x")


def test_name_must_fit_a_label() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(MINIMAL, name="x" * 64)
    assert err.value.field == "metadata.name"


@pytest.mark.parametrize(
    ("schedule", "fragment"),
    [
        ({"cron": "* * * * *", "at": "2030-01-01T00:00:00Z"}, "exactly one of cron, interval and at"),
        ({}, "exactly one"),
        ({"interval": {"seconds": 0}}, "spec.schedules[1].interval.seconds"),
        ({"interval": {}}, "spec.schedules[1].interval.seconds: is required"),
        ({"at": "tomorrow"}, "spec.schedules[1].at"),
        ({"at": "2030-01-01T00:00:00"}, "with an offset"),
        ({"interval": {"seconds": 5, "start": "soon"}}, "spec.schedules[1].interval.start"),
    ],
)
def test_a_bad_schedule_marks_only_itself(schedule: dict[str, Any], fragment: str) -> None:
    # Admission rejects these (CEL); an object stored before a CRD upgrade may still hold one, and
    # it must not stop the TaskQueue or its other schedules.
    spec = parse(schedules=[{"name": "good", "cron": "0 3 * * *"}, {"name": "bad", **schedule}])
    good, bad = spec.schedules
    assert good.problem is None and good.cron == "0 3 * * *"
    assert bad.name == "bad" and bad.problem is not None and fragment in bad.problem


def test_cron_and_zone_are_left_to_their_owner() -> None:
    # spec.py has no cron parser: cron.parse checks the expression and the zone where it is used.
    spec = parse(schedules=[{"name": "x", "cron": "61 25 * * *", "timeZone": "Mars/Phobos"}])
    assert spec.schedules[0].problem is None and spec.schedules[0].cron == "61 25 * * *"


def test_interval_and_at() -> None:
    spec = parse(
        schedules=[
            {"name": "every", "interval": {"seconds": 30, "start": "2026-12-01T10:00:05+01:00"}},
            {"name": "plain", "interval": {"seconds": 7}},
            {"name": "once", "at": "2026-12-24T18:00:00Z"},
        ]
    )
    every, plain, once = spec.schedules
    assert every.interval is not None and every.interval.seconds == 30
    assert every.interval.start == dt.datetime(2026, 12, 1, 9, 0, 5, tzinfo=dt.UTC)
    assert plain.interval is not None and plain.interval.start is None
    assert once.at == dt.datetime(2026, 12, 24, 18, tzinfo=dt.UTC) and once.cron is None


def test_paused_defaults_to_false() -> None:
    assert parse().paused is False
    assert parse(paused=True).paused is True


def test_parse_does_not_mutate_or_alias_the_input() -> None:
    raw = copy.deepcopy(MINIMAL)
    raw["podTemplate"] = {"env": [{"name": "A", "value": "1"}], "labels": {"a": "b"}}
    before = copy.deepcopy(raw)
    spec = parse_spec(raw, name="x")
    assert raw == before
    raw["podTemplate"]["labels"]["a"] = "changed"
    assert spec.pod_template.labels == {"a": "b"}


# --- One owner per default: the CRD, spec.DEFAULTS, the scaler's Policy and the worker agree -------

# The worker setting each defaulted spec leaf reaches through the pod's environment (manifests.py).
WORKER_FIELDS: Mapping[str, str] = {
    "rateLimit.burst": "qps_burst",
    "concurrency.mode": "concurrency_mode",
    "concurrency.perPod": "concurrency",
    "concurrency.prefetch": "prefetch",
    "retry.maxAttempts": "max_attempts",
    "retry.backoffSeconds": "backoff_seconds",
    "retry.maxBackoffSeconds": "max_backoff_seconds",
    "timeoutSeconds": "timeout_seconds",
    "liveness.heartbeatSeconds": "heartbeat_seconds",
    "liveness.leaseSeconds": "lease_seconds",
}


def test_worker_defaults_are_the_spec_defaults() -> None:
    # A worker run by hand (no operator) behaves like a pod of a default TaskQueue.
    from dataclasses import fields

    from sluiceway.settings import WorkerSettings

    worker = {f.name: f.default for f in fields(WorkerSettings)}
    spec = dict(flatten(DEFAULTS))
    assert {path: worker[name] for path, name in WORKER_FIELDS.items()} == {
        path: spec[path] for path in WORKER_FIELDS
    }


def test_default_prefetch_is_automatic_so_default_pods_get_the_fast_path() -> None:
    # Issue 9 item 3: 0 switched off prefetch and the send-ahead round trip in every default pod.
    assert parse().concurrency.prefetch == -1
    assert dict(crd_defaults(crd_schema()))["concurrency.prefetch"] == -1
    with pytest.raises(SpecError, match=r"spec\.concurrency\.prefetch"):
        parse(concurrency={"prefetch": -2})


def test_policy_defaults_are_the_spec_defaults() -> None:
    from sluiceway_operator.scaling import Policy

    spec = parse()
    assert Policy() == Policy.from_spec(spec).__class__(workload=Policy().workload)
    p, s = Policy(), spec.scaling
    assert (p.min_replicas, p.max_replicas, p.per_pod) == (s.min_replicas, s.max_replicas, 8)
    assert p.target_drain_seconds == s.target_drain_seconds
    assert p.stabilization_seconds == s.scale_down_stabilization_seconds
    assert p.cooldown_seconds == s.cooldown_seconds
    assert p.qps_headroom == s.qps_headroom
    assert p.assumed_task_seconds == s.assumed_task_seconds


def crd_ranges(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        if prop.get("type") in ("integer", "number") and "minimum" in prop and "maximum" in prop:
            yield path, prop
        if prop.get("type") == "object":
            yield from crd_ranges(prop, path + ".")


RANGED = [
    p
    for p in crd_ranges(crd_schema())
    if p[0].split(".")[0] in ("concurrency", "retry", "liveness", "scaling", "timeoutSeconds", "rateLimit")
]


@pytest.mark.parametrize(("path", "prop"), RANGED, ids=[p for p, _ in RANGED])
def test_crd_ranges_and_the_parser_agree(path: str, prop: Mapping[str, Any]) -> None:
    def at(value: Any) -> dict[str, Any]:
        *parents, leaf = path.split(".")
        spec: dict[str, Any] = {"rateLimit": {"qps": 1}} if parents[:1] == ["rateLimit"] else {}
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        return spec

    step = 1 if prop["type"] == "integer" else 0.001
    low, high = prop["minimum"], prop["maximum"]
    for inside in (high,) if prop.get("exclusiveMinimum") else (low, high):
        try:
            parse(**at(inside))
        except SpecError as exc:  # only a rule tying this field to another may object
            assert "between" not in exc.problem and "at most" not in exc.problem, exc
    for outside in (low - step if not prop.get("exclusiveMinimum") else low, high + step):
        with pytest.raises(SpecError) as err:
            parse(**at(outside))
        assert err.value.field == f"spec.{path}"


def crd_leaves(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path, prop
        if prop.get("type") == "object":
            yield from crd_leaves(prop, path + ".")
        if prop.get("type") == "array" and "items" in prop:
            yield from crd_leaves(prop["items"], path + "[].")


def test_kubectl_explain_shows_every_default_and_range() -> None:
    # Issue 10 item 8: `kubectl explain tq.spec.concurrency.perPod` must say 1-10000, default 8.
    missing = []
    for path, prop in crd_leaves(crd_schema()):
        if prop.get("type") not in ("integer", "number", "string", "boolean"):
            continue
        text = prop.get("description", "")
        if "default" in prop:
            value = prop["default"]
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            if f"Default: {shown}." not in text:
                missing.append(f"{path}: default {shown}")
        if "minimum" in prop and "maximum" in prop and "Range:" not in text:
            missing.append(f"{path}: range")
    assert not missing, missing


def test_status_conditions_are_described() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert "ScalingLimited" in conditions["description"] and "Throttled" in conditions["description"]
    for name, field in conditions["items"]["properties"].items():
        assert field.get("description"), f"status.conditions[].{name} has no description"
