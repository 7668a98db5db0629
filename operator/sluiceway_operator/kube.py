"""A small async Kubernetes API client on aiohttp (kopf's own HTTP stack).

The operator needs a handful of calls per TaskQueue (server-side apply, status merge patches, pod
patches and deletes, Secret reads, Events). The official ``kubernetes`` client is synchronous: with
1,000 TaskQueues ticking every 2 s it would need a thread per call in flight. Credentials come from
kopf's own login functions, so the operator and kopf authenticate the same way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

APPLY: Final = "application/apply-patch+yaml"
MERGE: Final = "application/merge-patch+json"
STRATEGIC: Final = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


class Kube:
    """Just enough of the API. Paths are absolute API paths (``/apis/apps/v1/...``)."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | bool = True,
        token_path: str | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self._token_path = token_path  # in-cluster tokens rotate: re-read after a 401
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kopf(cls, info: Any) -> Kube:
        """Build from a ``kopf.ConnectionInfo`` (kubeconfig or in-cluster ServiceAccount)."""
        ctx: ssl.SSLContext | bool = True
        if info.insecure:
            ctx = False
        else:
            ctx = ssl.create_default_context(
                cafile=os.fspath(info.ca_path) if info.ca_path else None,
                cadata=_text(info.ca_data) if info.ca_data else None,
            )
            cert = _as_file(info.certificate_path, info.certificate_data)
            key = _as_file(info.private_key_path, info.private_key_data)
            if cert and key:
                ctx.load_cert_chain(cert, key)
        token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
        return cls(
            info.server,
            token=info.token,
            ssl_context=ctx,
            token_path=token_path if os.path.exists(token_path) else None,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(ssl=self._ssl)
            )
        data = None if body is None else json.dumps(body)
        for attempt in (0, 1):
            headers = {**self._headers(), "Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            async with self._session.request(
                method, self.server + path, data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                if resp.status == 401 and attempt == 0 and self._token_path:
                    self._token = await asyncio.to_thread(_read_text, self._token_path)
                    continue
                if resp.status >= 400:
                    try:
                        err = json.loads(text)
                        raise ApiError(resp.status, str(err.get("message", text)), str(err.get("reason", "")))
                    except ValueError:
                        raise ApiError(resp.status, text) from None
                return dict(json.loads(text)) if text else {}
        raise ApiError(401, "unauthorized")  # pragma: no cover - the loop always returns or raises

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def apply(self, path: str, obj: Mapping[str, Any], manager: str) -> dict[str, Any]:
        """Server-side apply, taking ownership of conflicting fields (we are the controller)."""
        return await self.request(
            "PATCH", path, body=obj, content_type=APPLY, params={"fieldManager": manager, "force": "true"}
        )

    async def merge_patch(self, path: str, patch: Mapping[str, Any], manager: str) -> dict[str, Any]:
        return await self.request(
            "PATCH", path, body=patch, content_type=MERGE, params={"fieldManager": manager}
        )

    async def delete(self, path: str) -> None:
        try:
            await self.request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=obj)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _text(data: str | bytes) -> str:
    return data.decode() if isinstance(data, bytes) else data


def _as_file(path: Any, data: str | bytes | None) -> str | None:
    # ssl wants files for client certificates; kubeconfigs may embed them instead.
    if path:
        return str(os.fspath(path))
    if not data:
        return None
    raw = data if isinstance(data, bytes) else data.encode()
    if not raw.lstrip().startswith(b"-----"):
        raw = base64.b64decode(raw)
    f = tempfile.NamedTemporaryFile(prefix="sluiceway-op-", suffix=".pem", delete=False)  # noqa: SIM115
    with f:
        f.write(raw)
    return f.name


# --- Paths -----------------------------------------------------------------------------------------


def deployment_path(namespace: str, name: str) -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"


def taskqueue_status_path(namespace: str, name: str) -> str:
    return f"/apis/sluiceway.dev/v1alpha1/namespaces/{namespace}/taskqueues/{name}/status"


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events"
