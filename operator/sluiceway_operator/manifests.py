"""Pure builders for what the operator applies: the worker Deployment, and its own RBAC.

``worker_deployment`` renders the whole desired Deployment for server-side apply, so the operator
owns exactly the fields it sets. Everything the workers need reaches them as ``SLUICEWAY_*``
variables named in ``sluiceway.contract``; URLs come only from Secrets. The labels are our own and
never copied from the TaskQueue: Argo CD's label tracking would otherwise claim the Deployment as a
resource of its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import yaml

from sluiceway import contract

from .spec import SecretKeyRef, SpecError, TaskQueueSpec

GROUP: Final = "sluiceway.dev"
VERSION: Final = "v1alpha1"
KIND: Final = "TaskQueue"
API_VERSION: Final = f"{GROUP}/{VERSION}"

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_TASKQUEUE: Final = f"{GROUP}/taskqueue"
WORKER_APP: Final = "sluiceway-worker"
MANAGER: Final = "sluiceway-operator"
CONFIG_HASH_ANNOTATION: Final = f"{GROUP}/config-hash"
CONTAINER_NAME: Final = "worker"
TMP_VOLUME: Final = "tmp"


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """Operator-wide settings that shape every worker Deployment."""

    # The Secret (in each TaskQueue's namespace) with the coordination Redis URL, used when a
    # TaskQueue names none. None = every TaskQueue must set spec.coordination.urlSecretRef.
    default_coordination_secret: SecretKeyRef | None = None
    run_as_user: int = 65532  # the worker base image's non-root user
    termination_margin_seconds: int = 15  # on top of the task timeout: drain, hand back, exit
    metrics_port: int = contract.DEFAULT_METRICS_PORT
    log_format: str = "json"
    log_level: str = "INFO"
    revision_history_limit: int = 3


def deployment_name(taskqueue: str) -> str:
    return f"{taskqueue}-worker"


def selector_labels(taskqueue: str) -> dict[str, str]:
    """The Deployment's (immutable) selector: our app label plus the TaskQueue's name."""
    return {LABEL_NAME: WORKER_APP, LABEL_TASKQUEUE: taskqueue}


def status_selector(taskqueue: str) -> str:
    """``status.selector`` for the /scale subresource: the selector serialized as the API expects."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(taskqueue).items()))


def worker_labels(taskqueue: str) -> dict[str, str]:
    return {
        **selector_labels(taskqueue),
        LABEL_INSTANCE: taskqueue,
        LABEL_MANAGED_BY: MANAGER,
    }


def owner_reference(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def config_hash(config: Any) -> str:
    """A stable digest of any JSON-able value: sorted keys, no whitespace, SHA-256, first 16 hex."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _num(value: float) -> str:
    # "50" rather than "50.0": the worker parses either, humans read the shorter one.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def worker_env(
    meta: Mapping[str, Any], spec: TaskQueueSpec, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The worker container's environment: every ``SLUICEWAY_*`` setting, then the user's variables."""
    coordination = spec.coordination_secret_ref or settings.default_coordination_secret
    if coordination is None:
        raise SpecError(
            "spec.coordination.urlSecretRef",
            "is required: the operator has no default coordination Redis configured",
        )
    # A Redis broker without its own URL is the coordination Redis.
    broker_ref = spec.broker.url_secret_ref or coordination
    plain: list[tuple[str, str]] = [
        (contract.ENV_FUNCTION, spec.function),
        (contract.ENV_NAMESPACE, str(meta.get("namespace") or contract.DEFAULT_NAMESPACE)),
        (contract.ENV_TASKQUEUE, str(meta["name"])),
        (contract.ENV_QUEUE, spec.broker.queue),
        (contract.ENV_BROKER, str(spec.broker.type)),
        # 0 = unlimited, said explicitly so `kubectl describe` shows it.
        (contract.ENV_QPS, _num(spec.rate_limit.qps or 0)),
        (contract.ENV_QPS_BURST, str(spec.rate_limit.burst)),
        (contract.ENV_CONCURRENCY, str(spec.concurrency.per_pod)),
        (contract.ENV_CONCURRENCY_MODE, str(spec.concurrency.mode)),
        (contract.ENV_PREFETCH, str(spec.concurrency.prefetch)),
        (contract.ENV_MAX_ATTEMPTS, str(spec.retry.max_attempts)),
        (contract.ENV_BACKOFF_SECONDS, _num(spec.retry.backoff_seconds)),
        (contract.ENV_MAX_BACKOFF_SECONDS, _num(spec.retry.max_backoff_seconds)),
        (contract.ENV_TIMEOUT_SECONDS, str(spec.timeout_seconds)),
        (contract.ENV_RESULT_TTL, str(spec.result_ttl_seconds)),
        (contract.ENV_LEASE_SECONDS, _num(spec.liveness.lease_seconds)),
        (contract.ENV_HEARTBEAT_SECONDS, _num(spec.liveness.heartbeat_seconds)),
        (contract.ENV_METRICS_PORT, str(settings.metrics_port)),
        (contract.ENV_LOG_FORMAT, settings.log_format),
        (contract.ENV_LOG_LEVEL, settings.log_level),
    ]
    if spec.max_message_age_seconds is not None:
        plain.append((contract.ENV_MAX_MESSAGE_AGE_SECONDS, str(spec.max_message_age_seconds)))
    if spec.broker.kafka is not None and spec.broker.kafka.ordering == "key":
        plain.append((contract.ENV_ORDERING, "key"))
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain]
    env.append(_secret_env(contract.ENV_BROKER_URL, broker_ref))
    env.append(_secret_env(contract.ENV_REDIS_URL, coordination))
    # The pod name is the worker id: the operator returns a deleted pod's leases by its name.
    env.append({"name": contract.ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    env.extend(copy.deepcopy(dict(v)) for v in spec.pod_template.env)
    return env


def _pod_security_context(spec: TaskQueueSpec, settings: OperatorSettings) -> dict[str, Any]:
    sc = spec.pod_template.security_context
    user = sc.run_as_user if sc.run_as_user is not None else settings.run_as_user
    out: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": sc.run_as_group if sc.run_as_group is not None else user,
        "fsGroup": sc.fs_group if sc.fs_group is not None else user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if sc.supplemental_groups:
        out["supplementalGroups"] = list(sc.supplemental_groups)
    return out


CONTAINER_SECURITY_CONTEXT: Final[Mapping[str, Any]] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_template(meta: Mapping[str, Any], spec: TaskQueueSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The pod template without the config-hash annotation (the hash is computed over this)."""
    name = str(meta["name"])
    pt = spec.pod_template
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["sluiceway", "worker"],
        "env": worker_env(meta, spec, settings),
        "securityContext": copy.deepcopy(dict(CONTAINER_SECURITY_CONTEXT)),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }
    if settings.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"}]
        container["readinessProbe"] = {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        }
    # metrics_port 0: no endpoint, so no port and no probe (pods are ready once running). Only for
    # clusters whose pods share one network, like the local test cluster.
    if pt.resources:
        container["resources"] = copy.deepcopy(dict(pt.resources))
    if pt.env_from:
        container["envFrom"] = [copy.deepcopy(dict(e)) for e in pt.env_from]

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": _pod_security_context(spec, settings),
        "terminationGracePeriodSeconds": spec.timeout_seconds + settings.termination_margin_seconds,
        "automountServiceAccountToken": pt.automount_service_account_token,
        # Service links would add variables for every Service in the namespace: noise at best,
        # a collision with ours at worst.
        "enableServiceLinks": False,
        "volumes": [{"name": TMP_VOLUME, "emptyDir": {}}],
    }
    optional: dict[str, Any] = {
        "serviceAccountName": pt.service_account_name,
        "priorityClassName": pt.priority_class_name,
        "nodeSelector": dict(pt.node_selector) or None,
        "tolerations": [dict(t) for t in pt.tolerations] or None,
        "affinity": dict(pt.affinity) or None,
        "topologySpreadConstraints": [dict(t) for t in pt.topology_spread_constraints] or None,
        "imagePullSecrets": [{"name": s} for s in pt.image_pull_secrets] or None,
    }
    pod_spec.update(copy.deepcopy({k: v for k, v in optional.items() if v is not None}))
    metadata: dict[str, Any] = {"labels": {**pt.labels, **worker_labels(name)}}
    if pt.annotations:
        metadata["annotations"] = dict(pt.annotations)
    return {"metadata": metadata, "spec": pod_spec}


def worker_deployment(
    taskqueue_meta: Mapping[str, Any],
    spec: TaskQueueSpec,
    replicas: int,
    operator_settings: OperatorSettings,
    *,
    extra_hash_inputs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The worker Deployment for server-side apply.

    ``taskqueue_meta`` needs ``name``, ``namespace`` and ``uid``. ``extra_hash_inputs`` feeds the
    config hash with things outside the pod template that should roll the pods when they change,
    e.g. the resourceVersions of the referenced Secrets, so a rotated URL reaches every worker.
    """
    name = str(taskqueue_meta["name"])
    template = pod_template(taskqueue_meta, spec, operator_settings)
    digest = config_hash({"template": template, "extra": dict(extra_hash_inputs or {})})
    template["metadata"].setdefault("annotations", {})[CONFIG_HASH_ANNOTATION] = digest
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name),
            "namespace": taskqueue_meta.get("namespace") or contract.DEFAULT_NAMESPACE,
            "labels": worker_labels(name),
            "annotations": {CONFIG_HASH_ANNOTATION: digest},
            "ownerReferences": [owner_reference(taskqueue_meta)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "revisionHistoryLimit": operator_settings.revision_history_limit,
            # Never lose capacity during a rollout: new pods start before old ones drain.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": template,
        },
    }


# --- The operator's own RBAC ---------------------------------------------------------------------

RBAC_RESOURCE: Final = "rbac.yaml"
DEFAULT_OPERATOR_NAMESPACE: Final = "sluiceway-system"


def operator_rbac(namespace: str = DEFAULT_OPERATOR_NAMESPACE) -> list[dict[str, Any]]:
    """The ServiceAccount, ClusterRole and ClusterRoleBinding from the packaged ``rbac.yaml``.

    ``rbac.yaml`` is the single source: the tests load it through this function, and the Helm chart
    reads the same file through a link (charts/sluiceway/files/rbac.yaml).
    ``namespace`` replaces the namespace of the ServiceAccount and of the binding's subject.
    """
    text = resources.files(__package__).joinpath(RBAC_RESOURCE).read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if doc["kind"] == "ServiceAccount":
            doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
    return docs
