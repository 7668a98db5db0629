"""Writes to the worker Deployment and its pods.

Field ownership: every write to the Deployment is one server-side apply of the WHOLE rendered object
under the field manager ``sluiceway-operator`` with ``force``, and that object always carries
``spec.replicas``: the autoscaler's latest decision. There is a single owner and a single code path,
so the reconcile and the scaler never fight, no field is ever dropped by an apply that omitted it
(which would reset ``replicas`` to its default of 1), and a ``kubectl scale deployment`` or an edit
of the pod template is simply overwritten on the next apply. Users scale through the TaskQueue's
/scale subresource (``spec.replicas``), which pins the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .kube import Kube, deployment_path, pod_path
from .manifests import MANAGER, OperatorSettings, deployment_name, worker_deployment
from .scaling import POD_DELETION_COST
from .spec import TaskQueueSpec


def render(
    meta: Mapping[str, Any],
    spec: TaskQueueSpec,
    replicas: int,
    settings: OperatorSettings,
    *,
    extra_hash_inputs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return worker_deployment(meta, spec, replicas, settings, extra_hash_inputs=extra_hash_inputs)


async def apply_deployment(kube: Kube, body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return await kube.apply(deployment_path(meta["namespace"], meta["name"]), body, MANAGER)


async def get_deployment(kube: Kube, namespace: str, taskqueue: str) -> dict[str, Any] | None:
    return await kube.get(deployment_path(namespace, deployment_name(taskqueue)))


def cost_changes(costs: Mapping[str, int], current: Mapping[str, str | None]) -> dict[str, int]:
    """The pods whose deletion cost differs from what they carry (only those get patched)."""
    return {pod: cost for pod, cost in costs.items() if pod in current and current[pod] != str(cost)}


async def set_deletion_costs(kube: Kube, namespace: str, changes: Mapping[str, int]) -> None:
    for pod, cost in sorted(changes.items()):
        patch = {"metadata": {"annotations": {POD_DELETION_COST: str(cost)}}}
        try:
            await kube.merge_patch(pod_path(namespace, pod), patch, MANAGER)
        except Exception:  # a pod that just went away needs no cost
            continue


async def delete_pod(kube: Kube, namespace: str, pod: str) -> None:
    await kube.delete(pod_path(namespace, pod))
