"""The worker Deployment and the operator's RBAC, as the operator will apply them."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from sluiceway import contract
from sluiceway_operator.manifests import (
    CONFIG_HASH_ANNOTATION,
    OperatorSettings,
    config_hash,
    deployment_name,
    operator_rbac,
    status_selector,
    worker_deployment,
)
from sluiceway_operator.spec import SecretKeyRef, SpecError, TaskQueueSpec, parse_spec

META: dict[str, Any] = {
    "name": "thumbs",
    "namespace": "media",
    "uid": "1234-abcd",
    # The TaskQueue's own labels must never reach the Deployment (Argo CD tracks by label).
    "labels": {"app.kubernetes.io/instance": "argo-app", "team": "media"},
}
SETTINGS = OperatorSettings(default_coordination_secret=SecretKeyRef("sluiceway-redis", "url"))
RAW: dict[str, Any] = {
    "image": "registry.example/thumbs:1.4.2",
    "function": "thumbs.tasks:make_thumbnail",
    "broker": {"type": "redis"},
    "rateLimit": {"qps": 50},
    "timeoutSeconds": 120,
}


def spec(**changes: Any) -> TaskQueueSpec:
    raw = copy.deepcopy(RAW)
    raw.update(changes)
    return parse_spec(raw, name="thumbs")


def deployment(s: TaskQueueSpec | None = None, replicas: int = 3, **kw: Any) -> dict[str, Any]:
    return worker_deployment(META, s or spec(), replicas, kw.pop("settings", SETTINGS), **kw)


def container(d: dict[str, Any]) -> dict[str, Any]:
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(d)["env"]}


def test_identity_labels_and_owner() -> None:
    d = deployment()
    assert d["metadata"]["name"] == deployment_name("thumbs") == "thumbs-worker"
    assert d["metadata"]["namespace"] == "media"
    labels = d["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "sluiceway-worker",
        "app.kubernetes.io/instance": "thumbs",
        "app.kubernetes.io/managed-by": "sluiceway-operator",
        "sluiceway.dev/taskqueue": "thumbs",
    }
    assert d["spec"]["template"]["metadata"]["labels"] == labels
    (owner,) = d["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "sluiceway.dev/v1alpha1",
        "kind": "TaskQueue",
        "name": "thumbs",
        "uid": "1234-abcd",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_no_taskqueue_labels_are_copied() -> None:
    text = json.dumps(deployment())
    assert "argo-app" not in text
    assert '"team"' not in text


def test_selector_matches_pods_and_status_selector() -> None:
    d = deployment()
    match = d["spec"]["selector"]["matchLabels"]
    assert match.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert status_selector("thumbs") == ",".join(f"{k}={v}" for k, v in sorted(match.items()))


def test_env_carries_every_setting_under_contract_names() -> None:
    e = env(deployment())
    expected_plain = {
        contract.ENV_FUNCTION: "thumbs.tasks:make_thumbnail",
        contract.ENV_NAMESPACE: "media",
        contract.ENV_TASKQUEUE: "thumbs",
        contract.ENV_QUEUE: "thumbs",
        contract.ENV_BROKER: "redis",
        contract.ENV_QPS: "50",
        contract.ENV_QPS_BURST: "0",
        contract.ENV_CONCURRENCY: "8",
        contract.ENV_CONCURRENCY_MODE: "thread",
        contract.ENV_PREFETCH: "-1",
        contract.ENV_MAX_ATTEMPTS: "5",
        contract.ENV_BACKOFF_SECONDS: "1",
        contract.ENV_MAX_BACKOFF_SECONDS: "300",
        contract.ENV_TIMEOUT_SECONDS: "120",
        contract.ENV_LEASE_SECONDS: "15",
        contract.ENV_HEARTBEAT_SECONDS: "2",
        contract.ENV_METRICS_PORT: str(contract.DEFAULT_METRICS_PORT),
        contract.ENV_LOG_FORMAT: "json",
        contract.ENV_LOG_LEVEL: "INFO",
    }
    for name, value in expected_plain.items():
        assert e[name] == {"name": name, "value": value}
    assert e[contract.ENV_POD_NAME]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert all(isinstance(v.get("value", ""), str) for v in e.values())


def test_unlimited_qps_is_zero_and_optional_settings_appear_when_set() -> None:
    e = env(deployment(spec(rateLimit=None, maxMessageAgeSeconds=3600)))
    assert e[contract.ENV_QPS]["value"] == "0"
    assert e[contract.ENV_MAX_MESSAGE_AGE_SECONDS]["value"] == "3600"
    assert contract.ENV_MAX_MESSAGE_AGE_SECONDS not in env(deployment())


def test_urls_come_only_from_secret_refs() -> None:
    s = spec(
        broker={"type": "rabbitmq", "urlSecretRef": {"name": "rabbit", "key": "amqp-url"}},
        coordination={"urlSecretRef": {"name": "redis", "key": "url"}},
    )
    e = env(deployment(s))
    assert e[contract.ENV_BROKER_URL] == {
        "name": contract.ENV_BROKER_URL,
        "valueFrom": {"secretKeyRef": {"name": "rabbit", "key": "amqp-url"}},
    }
    assert e[contract.ENV_REDIS_URL]["valueFrom"] == {"secretKeyRef": {"name": "redis", "key": "url"}}
    for name in (contract.ENV_BROKER_URL, contract.ENV_REDIS_URL):
        assert "value" not in e[name]


def test_redis_broker_defaults_to_the_coordination_redis() -> None:
    e = env(deployment())
    ref = {"secretKeyRef": {"name": "sluiceway-redis", "key": "url"}}
    assert e[contract.ENV_BROKER_URL]["valueFrom"] == ref
    assert e[contract.ENV_REDIS_URL]["valueFrom"] == ref


def test_no_coordination_secret_anywhere_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as err:
        deployment(settings=OperatorSettings())
    assert err.value.field == "spec.coordination.urlSecretRef"


def test_user_env_comes_after_ours() -> None:
    d = deployment(spec(podTemplate={"env": [{"name": "FOO", "value": "bar"}]}))
    names = [v["name"] for v in container(d)["env"]]
    assert names[-1] == "FOO"
    assert all(n.startswith("SLUICEWAY_") for n in names[:-1])


def test_restricted_security_context() -> None:
    d = deployment()
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(d)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # A read-only root needs somewhere to write.
    assert {"name": "tmp", "mountPath": "/tmp"} in container(d)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


def test_security_overrides_keep_the_profile() -> None:
    d = deployment(spec(podTemplate={"securityContext": {"runAsUser": 1000, "fsGroup": 2000}}))
    psc = d["spec"]["template"]["spec"]["securityContext"]
    assert (psc["runAsUser"], psc["fsGroup"], psc["runAsNonRoot"]) == (1000, 2000, True)


def test_grace_period_follows_the_task_timeout() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120 + SETTINGS.termination_margin_seconds


def test_the_grace_margin_holds_what_a_worker_does_after_its_drain() -> None:
    """Past the task timeout (the drain), a worker retries failed settlements for
    SETTLE_AFTER_GRACE, then closes its broker link; Kafka's close() is the longest, bounded by
    CLOSE_SECONDS. Both must fit the margin, or a pod is killed mid-commit."""
    from sluiceway.transports.kafka import CLOSE_SECONDS
    from sluiceway.worker import SETTLE_AFTER_GRACE

    assert SETTINGS.termination_margin_seconds >= SETTLE_AFTER_GRACE + CLOSE_SECONDS


def test_command_probe_and_port() -> None:
    c = container(deployment())
    assert c["command"] == ["sluiceway", "worker"]
    assert c["ports"] == [
        {"name": "metrics", "containerPort": contract.DEFAULT_METRICS_PORT, "protocol": "TCP"}
    ]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_pod_template_fields_are_merged() -> None:
    s = spec(
        podTemplate={
            "resources": {"limits": {"cpu": "1"}},
            "envFrom": [{"configMapRef": {"name": "cfg"}}],
            "nodeSelector": {"pool": "workers"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "serviceAccountName": "thumbs",
            "priorityClassName": "batch",
            "labels": {"team": "media"},
            "annotations": {"note": "x"},
            "imagePullSecrets": [{"name": "regcred"}],
        }
    )
    d = deployment(s)
    pod = d["spec"]["template"]
    assert container(d)["resources"] == {"limits": {"cpu": "1"}}
    assert container(d)["envFrom"] == [{"configMapRef": {"name": "cfg"}}]
    assert pod["spec"]["nodeSelector"] == {"pool": "workers"}
    assert pod["spec"]["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert pod["spec"]["serviceAccountName"] == "thumbs"
    assert pod["spec"]["priorityClassName"] == "batch"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["labels"]["team"] == "media"
    assert pod["metadata"]["annotations"]["note"] == "x"
    # User pod labels never enter the Deployment's own labels or its selector.
    assert "team" not in d["metadata"]["labels"]
    assert "team" not in d["spec"]["selector"]["matchLabels"]


def test_hash_is_stable_and_on_the_pod_template() -> None:
    a, b = deployment(), deployment()
    assert a == b
    h = a["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert h == a["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert len(h) == 16


def pod_hash(d: dict[str, Any]) -> str:
    return str(d["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION])


def test_hash_ignores_replicas() -> None:
    h = pod_hash
    assert h(deployment(replicas=1)) == h(deployment(replicas=40))


@pytest.mark.parametrize(
    "changes",
    [
        {"rateLimit": {"qps": 51}},
        {"image": "registry.example/thumbs:1.4.3"},
        {"timeoutSeconds": 121},
        {"concurrency": {"perPod": 9}},
        {"podTemplate": {"env": [{"name": "A", "value": "1"}]}},
    ],
)
def test_hash_changes_with_configuration(changes: dict[str, Any]) -> None:
    h = pod_hash
    assert h(deployment(spec(**changes))) != h(deployment())


def test_hash_changes_with_extra_inputs_such_as_secret_versions() -> None:
    a = deployment(extra_hash_inputs={"secret/redis": "100"})
    b = deployment(extra_hash_inputs={"secret/redis": "101"})
    assert a["metadata"]["annotations"] != b["metadata"]["annotations"]


def test_config_hash_is_key_order_independent() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_builder_does_not_alias_the_spec() -> None:
    s = spec(podTemplate={"env": [{"name": "A", "value": "1"}], "tolerations": [{"key": "k"}]})
    d = deployment(s)
    container(d)["env"][-1]["value"] = "mutated"
    d["spec"]["template"]["spec"]["tolerations"][0]["key"] = "mutated"
    assert s.pod_template.env[0]["value"] == "1"
    assert s.pod_template.tolerations[0]["key"] == "k"


# --- RBAC ------------------------------------------------------------------------------------------


def rules() -> dict[tuple[str, str], set[str]]:
    (role,) = [d for d in operator_rbac() if d["kind"] == "ClusterRole"]
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_rbac_kinds_and_namespace() -> None:
    docs = operator_rbac("ops")
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    assert docs[0]["metadata"]["namespace"] == "ops"
    assert docs[2]["subjects"][0]["namespace"] == "ops"
    assert docs[2]["subjects"][0]["name"] == docs[0]["metadata"]["name"]
    assert docs[2]["roleRef"]["name"] == docs[1]["metadata"]["name"]


def test_rbac_is_least_privilege() -> None:
    r = rules()
    assert r[("sluiceway.dev", "taskqueues")] == {"get", "list", "watch", "patch"}
    assert r[("sluiceway.dev", "taskqueues/status")] == {"get", "patch"}
    # Server-side apply creates through PATCH, which is authorized as create too.
    assert r[("apps", "deployments")] == {"get", "list", "watch", "create", "patch"}
    assert r[("", "pods")] == {"get", "list", "watch", "patch", "delete"}
    assert r[("", "secrets")] == {"get"}
    assert r[("apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    assert r[("", "namespaces")] == {"list", "watch"}
    assert r[("", "events")] == {"create", "patch"}
    every_verb = set().union(*r.values())
    assert not every_verb & {"*", "update", "deletecollection", "escalate", "bind", "impersonate"}
    assert not any(g == "*" or res == "*" for g, res in r)


def test_process_mode_reaches_the_worker_as_its_setting() -> None:
    from sluiceway import settings as worker_settings

    e = env(deployment(spec(concurrency={"mode": "process", "perPod": 2})))
    assert e[contract.ENV_CONCURRENCY_MODE]["value"] == "process"
    values = worker_settings.env_values({k: v["value"] for k, v in e.items() if "value" in v})
    s = worker_settings.from_env({}, **values)
    assert (s.concurrency_mode, s.concurrency) == ("process", 2)
