"""A real single-machine control plane: etcd, kube-apiserver, kube-controller-manager, and the test
kubelet, on loopback ports picked at run time.

    with LocalCluster.start(run_dir) as cluster:
        cluster.kubectl("apply", "-f", "deploy.yaml")

Every process is a process-group leader recorded in ``<run_dir>/pids.json``; :meth:`LocalCluster.stop`
kills them all, and a failed start stops whatever it had started before it raises.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from .binaries import KUBE_VERSION, Binaries, ensure_binaries
from .images import ImageTable
from .kubeapi import ApiError, Credentials, KubeApi, Obj
from .kubelet import Kubelet
from .pki import Pki, create_pki
from .procs import ClusterError, ManagedProcess, Registry, free_port, port_free, sweep_stale, wait_until

# Where runs without an explicit directory live, so a later run can sweep what a killed one left.
RUNS_ROOT = Path(tempfile.gettempdir()) / "sluiceway-localcluster"
START_TIMEOUT = float(os.environ.get("SLUICEWAY_CLUSTER_START_TIMEOUT", "90"))


def _log(msg: str) -> None:
    print(f"[localcluster] {msg}", flush=True)


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int

    @classmethod
    def pick(cls, apiserver: int | None = None) -> Ports:
        return cls(free_port(), free_port(), apiserver or free_port(), free_port())


def write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    user: Mapping[str, Any],
    name: str = "localcluster",
    *,
    embed_ca: bool = False,
) -> Path:
    """A kubeconfig for ``server``. ``embed_ca`` writes the CA as ``certificate-authority-data``
    (base64 PEM), the form `kubectl config view --flatten`, kind, EKS and GKE write; else its path."""
    cluster: dict[str, str] = {"server": server}
    if embed_ca:
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    else:
        cluster["certificate-authority"] = str(ca)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": dict(user)}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class LocalCluster:
    run_dir: Path
    binaries: Binaries
    pki: Pki
    ports: Ports
    registry: Registry
    log: Callable[[str], None] = _log
    processes: list[ManagedProcess] = field(default_factory=list)
    kubelet: Kubelet | None = None
    _ns_counter: int = 0

    # ------------------------------------------------------------------ properties

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "admin.kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        return self.binaries.kubectl

    @property
    def api(self) -> KubeApi:
        return KubeApi(
            Credentials(
                self.server, self.pki.ca_crt, self.pki.client_crt("admin"), self.pki.client_key("admin")
            )
        )

    # ------------------------------------------------------------------ start / stop

    @classmethod
    def start(
        cls,
        run_dir: Path | None = None,
        *,
        binaries: Binaries | None = None,
        apiserver_port: int | None = None,
        with_kubelet: bool = True,
        images: ImageTable | None = None,
        log: Callable[[str], None] = _log,
    ) -> LocalCluster:
        """Start everything; on any failure, stop what was started and raise :class:`ClusterError`."""
        RUNS_ROOT.mkdir(parents=True, exist_ok=True)
        sweep_stale(RUNS_ROOT, log)
        if run_dir is None:
            run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS_ROOT))
        run_dir.mkdir(parents=True, exist_ok=True)
        bins = binaries or ensure_binaries()
        started = time.monotonic()
        last_error: ClusterError | None = None
        # Ports picked at run time can be taken by someone else before our process binds them;
        # retry such races with fresh ports. An explicitly requested port is not retried.
        for attempt in range(3 if apiserver_port is None else 1):
            registry = Registry(run_dir)
            cluster = cls(
                run_dir, bins, create_pki(run_dir / "pki"), Ports.pick(apiserver_port), registry, log
            )
            try:
                cluster._start_all(with_kubelet, images)
            except ClusterError as exc:
                cluster.stop()
                last_error = exc
                if getattr(exc, "port_race", False) and attempt < 2:
                    log(f"port taken while starting ({exc}); retrying with new ports")
                    continue
                raise
            except BaseException:
                cluster.stop()
                raise
            log(
                f"control plane up in {time.monotonic() - started:.1f}s at {cluster.server} (run dir {run_dir})"
            )
            return cluster
        assert last_error is not None
        raise last_error

    def _launch(
        self, name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        if not port_free(port):
            err = ClusterError(
                f"cannot start {name}: 127.0.0.1:{port} is already in use by another process. "
                f"Stop that process (`ss -ltnp 'sport = :{port}'` shows it) or choose another port; "
                "without an explicit port the harness picks free ones itself."
            )
            err.port_race = True  # type: ignore[attr-defined]
            raise err
        proc = ManagedProcess(name, argv, self.run_dir / "logs" / f"{name}.log", self.registry, env=env)
        self.processes.append(proc)
        return proc

    def _check_bind_failure(self, proc: ManagedProcess, port: int) -> None:
        if not proc.alive() and re.search(r"address already in use", proc.log_tail(40), re.I):
            err = ClusterError(
                f"{proc.name} could not bind 127.0.0.1:{port}: address already in use. "
                f"Another process took the port; stop it (`ss -ltnp 'sport = :{port}'`) or rerun."
            )
            err.port_race = True  # type: ignore[attr-defined]
            raise err

    def _wait(self, proc: ManagedProcess, port: int, check: Callable[[], bool], what: str) -> None:
        try:
            wait_until(check, START_TIMEOUT, what, watch=[proc])
        except ClusterError:
            self._check_bind_failure(proc, port)
            raise

    def _start_all(self, with_kubelet: bool, images: ImageTable | None) -> None:
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()
        if with_kubelet:
            self.kubelet = Kubelet(
                self.api,
                self.run_dir,
                self.registry,
                images=images,
                kube_version=f"v{KUBE_VERSION}",
                log=self.log,
            )
            self.kubelet.start()

    def _start_etcd(self) -> None:
        p = self.ports
        client, peer = f"http://127.0.0.1:{p.etcd_client}", f"http://127.0.0.1:{p.etcd_peer}"
        argv = [
            str(self.binaries.etcd),
            "--name=localcluster",
            f"--data-dir={self.run_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=localcluster={peer}",
            # Test data is disposable; fsync dominates etcd latency on small disks.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=1073741824",
            "--log-level=warn",
        ]
        proc = self._launch("etcd", argv, p.etcd_client)
        self._wait(proc, p.etcd_client, lambda: _http_ok(f"{client}/health"), f"etcd on port {p.etcd_client}")

    def _start_apiserver(self) -> None:
        p, pki = self.ports, self.pki
        argv = [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
            "--bind-address=127.0.0.1",
            # Without a default route the apiserver cannot pick an address by itself.
            "--advertise-address=127.0.0.1",
            f"--secure-port={p.apiserver}",
            f"--cert-dir={self.run_dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_crt}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            "--authorization-mode=RBAC",
            f"--requestheader-client-ca-file={pki.ca_crt}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.client_crt('front-proxy-client')}",
            f"--proxy-client-key-file={pki.client_key('front-proxy-client')}",
            f"--service-account-issuer=https://127.0.0.1:{p.apiserver}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            # A loopback address is not a valid Endpoints IP; nothing here needs the `kubernetes` Service.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        proc = self._launch("kube-apiserver", argv, p.apiserver)
        creds = Credentials(self.server, pki.ca_crt, pki.client_crt("admin"), pki.client_key("admin"))
        api = KubeApi(creds, timeout=5)
        self._wait(
            proc,
            p.apiserver,
            lambda: api.request("GET", "/readyz") is not None,
            f"kube-apiserver /readyz on port {p.apiserver}",
        )
        write_kubeconfig(
            self.kubeconfig,
            self.server,
            pki.ca_crt,
            {"client-certificate": str(pki.client_crt("admin")), "client-key": str(pki.client_key("admin"))},
        )

    def _start_controller_manager(self) -> None:
        p, pki = self.ports, self.pki
        kcm_kubeconfig = write_kubeconfig(
            self.run_dir / "kube-controller-manager.kubeconfig",
            self.server,
            pki.ca_crt,
            {
                "client-certificate": str(pki.client_crt("kube-controller-manager")),
                "client-key": str(pki.client_key("kube-controller-manager")),
            },
        )
        argv = [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.controller_manager}",
            f"--cert-dir={self.run_dir / 'kcm-certs'}",
            f"--root-ca-file={pki.ca_crt}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--cluster-signing-cert-file={pki.ca_crt}",
            f"--cluster-signing-key-file={pki.ca_key}",
            # Each controller gets its own ServiceAccount, so the bootstrap RBAC roles are what
            # lets Deployments, ReplicaSets and the garbage collector work: as in a real cluster.
            "--use-service-account-credentials=true",
            "--controllers=*",
            "--v=1",
        ]
        proc = self._launch("kube-controller-manager", argv, p.controller_manager)
        api = self.api
        # Ready when it does real work: the serviceaccount controller made `default` in `default`.
        self._wait(
            proc,
            p.controller_manager,
            lambda: bool(api.get("/api/v1/namespaces/default/serviceaccounts/default")),
            "kube-controller-manager to create the default ServiceAccount",
        )

    def stop(self) -> None:
        """Stop the kubelet's pods, then the components in reverse order. Safe to call twice."""
        if self.kubelet is not None:
            with contextlib.suppress(Exception):
                self.kubelet.stop()
        for proc in reversed(self.processes):
            # Test state is disposable: no need to wait long for graceful shutdowns.
            proc.stop(grace=1.0)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching kubectl against this cluster (admin unless ``kubeconfig`` is given)."""
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        done = subprocess.run(
            [str(self.binaries.kubectl), *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def apply(self, manifest: str | Obj | Sequence[Obj], namespace: str | None = None) -> None:
        if not isinstance(manifest, str):
            docs = [manifest] if isinstance(manifest, dict) else list(manifest)
            manifest = yaml.safe_dump_all(docs)
        self.kubectl(
            "apply", "-f", "-", *(["-n", namespace] if namespace else []), input=manifest, check=True
        )

    def fresh_namespace(self, prefix: str = "t") -> str:
        """Create a new namespace and wait until it can run pods (its `default` ServiceAccount exists)."""
        self._ns_counter += 1
        name = f"{prefix}-{self._ns_counter}-{secrets.token_hex(3)}"
        api = self.api
        api.create(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        wait_until(
            lambda: bool(api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")),
            30,
            f"the default ServiceAccount in namespace {name}",
        )
        return name

    def serviceaccount_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        resp = self.api.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        return str(resp["status"]["token"])

    def serviceaccount_kubeconfig(self, namespace: str, name: str, expiration_seconds: int = 3600) -> Path:
        """A kubeconfig that acts as ServiceAccount ``namespace/name``, with exactly its RBAC permissions."""
        token = self.serviceaccount_token(namespace, name, expiration_seconds)
        path = self.run_dir / "kubeconfigs" / f"sa-{namespace}-{name}.kubeconfig"
        # Embedded CA: the form users' kubeconfigs have (the admin kubeconfig keeps the file path,
        # so both forms are exercised).
        return write_kubeconfig(
            path, self.server, self.pki.ca_crt, {"token": token}, name=f"sa-{namespace}-{name}", embed_ca=True
        )

    def require_kubelet(self) -> Kubelet:
        """The test kubelet (images table, processes, exits); fails if started without one."""
        if self.kubelet is None:
            raise ClusterError("this cluster was started without the test kubelet")
        return self.kubelet

    def pod_log(self, namespace: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        """What the pod's container wrote to stdout/stderr (like `kubectl logs`, `--previous` too)."""
        return self.require_kubelet().pod_log(namespace, pod, container, previous)

    def pods_processes(self, namespace: str | None = None) -> dict[str, list[int]]:
        """Pod name -> pids of its running container processes (for `kill -9` tests)."""
        out: dict[str, list[int]] = {}
        for p in self.require_kubelet().processes(namespace):
            out.setdefault(p.pod, []).append(p.pid)
        return out

    def get(self, path: str) -> Obj:
        return self.api.get(path)

    def wait_for(self, check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> None:
        wait_until(lambda: bool(check()), timeout, what, interval=0.2)

    def crd_established(self, name: str) -> bool:
        crd = self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(x.get("type") == "Established" and x.get("status") == "True" for x in conditions)

    def wait_established(self, name: str, timeout: float = 60) -> None:
        """Until the CRD ``name`` serves its resource.

        Not `kubectl wait --for=condition=Established`: read while the apiserver has not yet
        written the CRD's first status, ``status.conditions`` is null, and kubectl then fails at
        once ("accessor error: <nil>") instead of waiting (seen on a loaded CI run).
        """
        self.wait_for(lambda: self.crd_established(name), timeout, f"CRD {name} established")

    # ------------------------------------------------------------------ state for `make cluster-up`

    def write_state(self, supervisor_pid: int) -> Path:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "supervisor_pid": supervisor_pid,
            "run_dir": str(self.run_dir),
        }
        path = self.run_dir / "state.json"
        path.write_text(json.dumps(state, indent=2))
        return path


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


@contextlib.contextmanager
def running_cluster(**kwargs: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster.start(**kwargs)
    try:
        yield cluster
    finally:
        cluster.cleanup()


__all__ = ["ApiError", "ClusterError", "LocalCluster", "running_cluster", "write_kubeconfig"]
