"""The operator's Kubernetes API access: login through the ``kubernetes`` package, calls on aiohttp.

Two concerns, two tools:

- **Login** (``login``) goes through the official ``kubernetes`` package's loaders, which implement
  the kubeconfig format as kubectl does: ``certificate-authority-data`` and other embedded
  credentials, relative paths, several files in ``KUBECONFIG``, ``exec`` credential plugins (EKS,
  GKE's ``gke-gcloud-auth-plugin``, AKS's ``kubelogin``) and the ``oidc`` auth provider. The
  operator and kopf log in with the same result (``login_handler`` hands it to kopf).
- **Calls** (``Kube``) are a small async client on aiohttp, kopf's own HTTP stack. The hot path is
  a handful of calls per TaskQueue per tick (server-side apply, status merge patches, pod patches
  and deletes, Secret reads, Events). The official client is synchronous: 1,000 TaskQueues ticking
  every 2 s would need a thread per call in flight and a connection pool per thread, and its
  generated models add a serialize/deserialize step per call that the operator does not need. The
  asyncio port (``kubernetes_asyncio``) would be a second client stack next to kopf's.

Short-lived credentials are renewed: a 401 logs in again once and retries (an exec plugin then
runs again, an in-cluster token file is re-read), and credentials that say when they expire (an
exec plugin's ``expirationTimestamp``) are renewed shortly before that.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

APPLY: Final = "application/apply-patch+yaml"
MERGE: Final = "application/merge-patch+json"
STRATEGIC: Final = "application/strategic-merge-patch+json"

# Renew expiring credentials this long before they expire (an EKS token lives 15 min).
RENEW_BEFORE: Final = datetime.timedelta(seconds=60)
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
IN_CLUSTER_TOKEN: Final = f"{SERVICE_ACCOUNT_DIR}/token"


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


class LoginError(Exception):
    """No usable credentials; the message says what was tried."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where the API server is and how to authenticate, as files and one header (no embedded data)."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    cert_path: str | None = None
    key_path: str | None = None
    authorization: str | None = None  # the whole header value: "Bearer <token>" or "Basic <b64>"
    expires_at: datetime.datetime | None = None  # tz-aware UTC
    namespace: str | None = None
    source: str = ""  # for logs: "in-cluster" or "kubeconfig <paths> (context <name>)"

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.cert_path and self.key_path:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def headers(self) -> dict[str, str]:
        return {"Authorization": self.authorization} if self.authorization else {}

    def expiring(self, now: datetime.datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        now = now or datetime.datetime.now(datetime.UTC)
        return now >= self.expires_at - RENEW_BEFORE


def _utc(value: Any) -> datetime.datetime | None:
    if not isinstance(value, datetime.datetime):
        return None
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value.astimezone(datetime.UTC)


def _from_configuration(cfg: Any, expiry: Any, namespace: str | None, source: str) -> Credentials:
    # The loaders put embedded data into temporary files and the token (with its scheme) under
    # "BearerToken"; read the attributes directly so no refresh hook runs here.
    authorization = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
    return Credentials(
        server=str(cfg.host).rstrip("/"),
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        cert_path=cfg.cert_file or None,
        key_path=cfg.key_file or None,
        authorization=str(authorization).strip() if authorization else None,  # a token file may end in \n
        expires_at=_utc(expiry),
        namespace=namespace,
        source=source,
    )


def login_kubeconfig(paths: str, context: str | None = None) -> Credentials:
    """Credentials from a kubeconfig (``paths`` as in ``KUBECONFIG``: one or more, os.pathsep-separated)."""
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException, kube_config

    errors = _ErrorRecords()
    try:
        merged = kube_config.KubeConfigMerger(paths)  # type: ignore[no-untyped-call]
        if merged.config is None:
            raise LoginError(f"no kubeconfig found at {paths}")
        loader = kube_config.KubeConfigLoader(  # type: ignore[no-untyped-call]
            config_dict=merged.config, active_context=context, config_base_path=None
        )
        cfg = Configuration()
        with errors:
            loader.load_and_set(cfg)  # type: ignore[no-untyped-call]
    except (ConfigException, KeyError, ValueError, OSError) as exc:
        raise LoginError(f"cannot use the kubeconfig {paths}: {exc}") from exc
    if not cfg.host or cfg.host == "http://localhost":
        raise LoginError(f"the kubeconfig {paths} names no server for its current context")
    user = getattr(loader, "_user", None) or {}
    if "exec" in user and not (cfg.api_key.get("BearerToken") or cfg.cert_file):
        # The loader logs the plugin's failure and carries on without credentials; say so instead.
        command = user["exec"].safe_get("command")
        raise LoginError(
            f"the kubeconfig {paths}: exec credential plugin {command!r} returned no credentials"
            + (f": {'; '.join(errors.messages)}" if errors.messages else "")
        )
    ctx = loader.current_context
    name = ctx.get("name") if hasattr(ctx, "get") else None
    namespace = (ctx.get("context") or {}).get("namespace") if hasattr(ctx, "get") else None
    return _from_configuration(
        cfg, getattr(loader, "expiry", None), namespace, f"kubeconfig {paths} (context {name})"
    )


class _ErrorRecords(logging.Handler):
    """The error lines the `kubernetes` loader logs (to the root logger) instead of raising."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _ErrorRecords:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)


def login_in_cluster(
    environ: Mapping[str, str] | None = None, account_dir: str = SERVICE_ACCOUNT_DIR
) -> Credentials:
    """The pod's ServiceAccount: ``KUBERNETES_SERVICE_HOST/PORT`` and the mounted token and CA."""
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = Configuration()
    try:
        InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=os.path.join(account_dir, "token"),
            cert_filename=os.path.join(account_dir, "ca.crt"),
            try_refresh_token=False,  # a 401 logs in again, which re-reads the rotated token
            environ=os.environ if environ is None else environ,
        ).load_and_set(cfg)
    except ConfigException as exc:
        raise LoginError(f"in-cluster login failed: {exc}") from exc
    namespace = None
    ns_file = os.path.join(account_dir, "namespace")
    if os.path.isfile(ns_file):
        namespace = _read_text(ns_file)
    return _from_configuration(cfg, None, namespace, "in-cluster")


def login(environ: Mapping[str, str] | None = None) -> Credentials:
    """Log in the way controller-runtime does: ``$KUBECONFIG``, else in-cluster, else ``~/.kube/config``.

    Blocking (an exec plugin runs here): call it in a thread from async code.
    """
    env = os.environ if environ is None else environ
    context = env.get("SLUICEWAY_OPERATOR_KUBE_CONTEXT") or None
    if env.get("KUBECONFIG"):
        return login_kubeconfig(env["KUBECONFIG"], context)
    if env.get("KUBERNETES_SERVICE_HOST") and os.path.isfile(IN_CLUSTER_TOKEN):
        return login_in_cluster(env)
    home = os.path.expanduser("~/.kube/config")
    if os.path.isfile(home):
        return login_kubeconfig(home, context)
    raise LoginError(
        "no Kubernetes credentials: KUBECONFIG is not set, this is not a pod with a ServiceAccount token "
        f"(KUBERNETES_SERVICE_HOST and {IN_CLUSTER_TOKEN}), and {home} does not exist"
    )


def to_kopf(creds: Credentials) -> Any:
    """The same credentials as a ``kopf.ConnectionInfo``, for kopf's own watches."""
    import kopf

    scheme, _, token = (creds.authorization or "").partition(" ")
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_path,
        insecure=creds.insecure or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=creds.cert_path,
        private_key_path=creds.key_path,
        default_namespace=creds.namespace,
        expiration=creds.expires_at,
    )


async def login_handler(**_: Any) -> Any:
    """kopf's login handler (registered in ``__main__``): the operator's own login, in a thread.

    kopf calls it again after a 401 and when the credentials' ``expiration`` passes.
    """
    import kopf

    try:
        return to_kopf(await asyncio.to_thread(login))
    except LoginError as exc:
        # An exec plugin may fail for a moment (network to the cloud's token service): retry a few
        # times (kopf.on.login's retries), then the operator exits with this message.
        raise kopf.TemporaryError(str(exc), delay=5) from exc


class Kube:
    """Just enough of the API. Paths are absolute API paths (``/apis/apps/v1/...``)."""

    def __init__(self, credentials: Credentials, *, relogin: Callable[[], Credentials] | None = None) -> None:
        self._creds = credentials
        self._relogin = relogin  # None: the credentials never change (tests against a fake API)
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, login_fn: Callable[[], Credentials] = login) -> Kube:
        return cls(await asyncio.to_thread(login_fn), relogin=login_fn)

    @property
    def server(self) -> str:
        return self._creds.server

    @property
    def credentials(self) -> Credentials:
        return self._creds

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _renew(self, stale: Credentials) -> None:
        assert self._relogin is not None
        async with self._lock:
            if self._creds is not stale:
                return  # another request renewed them meanwhile
            fresh = await asyncio.to_thread(self._relogin)
            if _tls(fresh) != _tls(stale):
                await self.close()  # an exec plugin may hand out a new client certificate
            self._creds = fresh

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(ssl=self._creds.ssl_context()),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        if self._relogin is not None and self._creds.expiring():
            await self._renew(self._creds)
        data = None if body is None else json.dumps(body)
        for attempt in (0, 1):
            creds = self._creds
            headers = {**creds.headers(), "Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            async with self._open().request(
                method, creds.server + path, data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                if resp.status == 401 and attempt == 0 and self._relogin is not None:
                    await self._renew(creds)
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


def _tls(c: Credentials) -> tuple[str | None, str | None, str | None, bool]:
    return (c.ca_path, c.cert_path, c.key_path, c.insecure)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


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
