"""Kubernetes Events about a TaskQueue: scaling decisions and faults.

Posted as core/v1 Events (``kubectl describe taskqueue`` shows them). A failure to post is logged,
never raised: an Event is an explanation, not part of the control loop.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from typing import Any

import structlog

from .kube import Kube, events_path
from .manifests import API_VERSION, KIND, MANAGER

log = structlog.get_logger("sluiceway_operator")


def event_body(meta: Mapping[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    name = str(meta["name"])
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": name,
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGER},
        "reportingComponent": MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


async def post(kube: Kube, meta: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        await kube.create(events_path(str(meta["namespace"])), event_body(meta, type_, reason, message))
    except Exception as exc:  # an Event is best effort
        log.warning("event not posted", reason=reason, error=str(exc))
