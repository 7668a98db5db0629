"""Login through the `kubernetes` package's loaders: the kubeconfig forms users have, without a cluster.

The same forms against the real API server are in e2e/test_kubeconfig.py; these pin what the loader
hands the operator's client (files, one header, an expiry) and the error messages.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import ssl
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from localcluster.pki import Pki, create_pki
from sluiceway_operator.kube import (
    Credentials,
    Kube,
    LoginError,
    login,
    login_in_cluster,
    login_kubeconfig,
    to_kopf,
)

SERVER = "https://127.0.0.1:6443"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return create_pki(tmp_path_factory.mktemp("pki"))


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any], namespace: str = "team") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": SERVER, **cluster}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [
                    {"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": namespace}}
                ],
                "current-context": "ctx",
            }
        )
    )
    return path


def test_embedded_ca_and_client_certificate_become_files_that_make_a_tls_context(
    pki: Pki, tmp_path: Path
) -> None:
    # The form `kubectl config view --flatten` and kind write: nothing but base64 data.
    path = kubeconfig(
        tmp_path / "flat",
        {"certificate-authority-data": b64(pki.ca_crt)},
        {
            "client-certificate-data": b64(pki.client_crt("admin")),
            "client-key-data": b64(pki.client_key("admin")),
        },
    )
    creds = login_kubeconfig(str(path))
    assert creds.server == SERVER
    assert creds.ca_path and Path(creds.ca_path).read_bytes() == pki.ca_crt.read_bytes()
    assert creds.cert_path and Path(creds.cert_path).read_bytes() == pki.client_crt("admin").read_bytes()
    assert creds.authorization is None
    assert creds.namespace == "team"
    assert "context ctx" in creds.source
    ctx = creds.ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.get_ca_certs()  # the decoded CA, not the base64 text


def test_ca_path_relative_to_the_kubeconfig_and_a_token(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.ca_crt.read_bytes())
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority": "ca.crt"}, {"token": "abc.def"})
    creds = login_kubeconfig(str(path))
    assert creds.ca_path == str(tmp_path / "ca.crt")
    assert creds.headers() == {"Authorization": "Bearer abc.def"}
    assert creds.expires_at is None and not creds.expiring()
    info = to_kopf(creds)
    assert (info.server, info.scheme, info.token, info.ca_path) == (
        SERVER,
        "Bearer",
        "abc.def",
        creds.ca_path,
    )


def exec_plugin(tmp_path: Path, status: dict[str, Any], exit_code: int = 0) -> Path:
    script = tmp_path / "plugin.py"
    out = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}
    script.write_text(
        f"import sys\nsys.stderr.write('plugin ran\\n')\nprint({json.dumps(json.dumps(out))})\nsys.exit({exit_code})\n"
    )
    return script


def exec_user(script: Path) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": [str(script)],
            "interactiveMode": "Never",
        }
    }


def test_exec_plugin_token_and_its_expiry(pki: Pki, tmp_path: Path) -> None:
    expires = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    script = exec_plugin(tmp_path, {"token": "from-plugin", "expirationTimestamp": "2030-01-02T03:04:05Z"})
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority-data": b64(pki.ca_crt)}, exec_user(script))
    creds = login_kubeconfig(str(path))
    assert creds.authorization == "Bearer from-plugin"
    assert creds.expires_at == expires
    assert not creds.expiring(expires - datetime.timedelta(minutes=5))
    assert creds.expiring(expires - datetime.timedelta(seconds=30))  # renewed a little early
    assert to_kopf(creds).expiration == expires


def test_exec_plugin_client_certificate(pki: Pki, tmp_path: Path) -> None:
    # Some plugins (AKS kubelogin in some modes, Teleport) hand out a client certificate, not a token.
    status = {
        "clientCertificateData": pki.client_crt("admin").read_text(),
        "clientKeyData": pki.client_key("admin").read_text(),
    }
    script = exec_plugin(tmp_path, status)
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority-data": b64(pki.ca_crt)}, exec_user(script))
    creds = login_kubeconfig(str(path))
    assert creds.authorization is None
    assert creds.cert_path and Path(creds.cert_path).read_text() == status["clientCertificateData"]
    assert isinstance(creds.ssl_context(), ssl.SSLContext)  # the pair loads


def test_oidc_auth_provider_id_token(pki: Pki, tmp_path: Path) -> None:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    exp = int(datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp())
    id_token = f"{part({'alg': 'RS256'})}.{part({'iss': 'https://idp.example', 'exp': exp})}.c2ln"
    user = {
        "auth-provider": {
            "name": "oidc",
            "config": {"client-id": "k8s", "idp-issuer-url": "https://idp.example", "id-token": id_token},
        }
    }
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority-data": b64(pki.ca_crt)}, user)
    assert login_kubeconfig(str(path)).authorization == f"Bearer {id_token}"


def test_a_failing_exec_plugin_is_a_login_error_naming_it(pki: Pki, tmp_path: Path) -> None:
    script = exec_plugin(tmp_path, {}, exit_code=3)
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority-data": b64(pki.ca_crt)}, exec_user(script))
    with pytest.raises(LoginError, match="exec credential plugin") as err:
        login_kubeconfig(str(path))
    assert sys.executable in str(err.value)
    assert "process returned 3. plugin ran" in str(err.value)  # the plugin's own stderr


def test_login_order_and_what_it_says_when_there_is_nothing(pki: Pki, tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority-data": b64(pki.ca_crt)}, {"token": "t"})
    assert login({"KUBECONFIG": str(path), "HOME": str(tmp_path)}).authorization == "Bearer t"
    with pytest.raises(LoginError, match="no kubeconfig found"):
        login({"KUBECONFIG": str(tmp_path / "missing")})
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nope\ncontexts: []\n")
    broken.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(LoginError, match="cannot use the kubeconfig"):
        login({"KUBECONFIG": str(broken)})


def test_the_context_variable_picks_another_context(pki: Pki, tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "cfg", {"certificate-authority-data": b64(pki.ca_crt)}, {"token": "t"})
    config = yaml.safe_load(path.read_text())
    config["clusters"].append(
        {"name": "c2", "cluster": {"server": "https://10.0.0.2:6443", "insecure-skip-tls-verify": True}}
    )
    config["contexts"].append({"name": "other", "context": {"cluster": "c2", "user": "u"}})
    path.write_text(yaml.safe_dump(config))
    assert login({"KUBECONFIG": str(path)}).server == SERVER
    other = login({"KUBECONFIG": str(path), "SLUICEWAY_OPERATOR_KUBE_CONTEXT": "other"})
    assert (other.server, other.insecure, other.ssl_context()) == ("https://10.0.0.2:6443", True, False)


def test_kubeconfig_may_be_several_files(pki: Pki, tmp_path: Path) -> None:
    # As kubectl merges them: the first file names the context, a later one holds the user.
    full = yaml.safe_load(
        kubeconfig(
            tmp_path / "full", {"certificate-authority-data": b64(pki.ca_crt)}, {"token": "t2"}
        ).read_text()
    )
    first = {k: v for k, v in full.items() if k != "users"}
    second = {"apiVersion": "v1", "kind": "Config", "users": full["users"]}
    (tmp_path / "a").write_text(yaml.safe_dump(first))
    (tmp_path / "b").write_text(yaml.safe_dump(second))
    creds = login({"KUBECONFIG": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"})
    assert (creds.server, creds.authorization) == (SERVER, "Bearer t2")


def test_in_cluster_service_account(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_bytes(pki.ca_crt.read_bytes())
    (tmp_path / "namespace").write_text("sluiceway-system")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = login_in_cluster(env, str(tmp_path))
    assert creds.server == "https://10.96.0.1:443"
    assert creds.ca_path == str(tmp_path / "ca.crt")
    assert creds.authorization == "bearer sa-token"  # no trailing newline in a header
    assert creds.namespace == "sluiceway-system"
    (tmp_path / "token").unlink()
    with pytest.raises(LoginError, match="in-cluster login failed"):
        login_in_cluster(env, str(tmp_path))


async def test_a_401_logs_in_again_once_and_retries() -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer fresh":
            return web.json_response({"message": "Unauthorized", "reason": "Unauthorized"}, status=401)
        return web.json_response({"kind": "Namespace"})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    logins: list[int] = []

    def relogin() -> Credentials:
        logins.append(1)
        return Credentials(f"http://127.0.0.1:{port}", insecure=True, authorization="Bearer fresh")

    kube = Kube(
        Credentials(f"http://127.0.0.1:{port}", insecure=True, authorization="Bearer stale"), relogin=relogin
    )
    try:
        assert await kube.get("/api/v1/namespaces/default") == {"kind": "Namespace"}
        assert seen == ["Bearer stale", "Bearer fresh"]
        assert len(logins) == 1
        assert await kube.get("/api/v1/namespaces/default") == {"kind": "Namespace"}
        assert len(logins) == 1  # the fresh credentials are kept
    finally:
        await kube.close()
        await runner.cleanup()
