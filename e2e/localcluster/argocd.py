"""Locate or build Argo CD's multi-call binary (CLI, application-controller, repo-server, ...).

Resolution order:

1. ``$ARGOCD`` when it names an executable (a prebuilt ``argocd`` of the same version).
2. The per-version cache, ``${XDG_CACHE_HOME:-$HOME/.cache}/sluiceway/argocd/v<version>/bin``.
3. A build from the Go module proxy with the ordinary ``go`` client, into that cache (about 8 min
   cold on 2 cores, under a minute with a warm Go build cache).

``go install github.com/argoproj/argo-cd/v3/cmd@v3.2.11`` is refused: the module's go.mod carries
``replace`` directives (the k8s.io modules pinned to one release, protobuf, grpc-gateway, yaml), and
``go install pkg@version`` rejects a module with replaces. So, as for Kubernetes in
:mod:`localcluster.binaries`, we generate a wrapper module that requires Argo CD and repeats those
replaces. They are read from that exact version's go.mod as served by the proxy, never kept by hand.

v3.2.11 is pinned on purpose: v3.2.12's tag moved after the module proxy cached it and the proxy copy
does not compile, and v3.3 to v3.5 replace gitops-engine with a local directory, which a wrapper
module cannot follow.

The build also copies the Application and AppProject CRDs from the module's ``manifests/crds/`` next
to the binary, so the GitOps test needs no Go toolchain once the cache is warm.

Run ``python -m localcluster.argocd`` to build or locate it; ``--print-path`` prints only the binary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster.binaries import (
    MIN_GO,
    BinariesUnavailableError,
    Log,
    _go_version,
    _locked,
    _MemorySampler,
    _Runner,
    cache_root,
    find_go,
    go_directive,
    godebug_lines,
)
from localcluster.procs import ClusterError, ManagedProcess, Registry, free_port, port_free, wait_until

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "deploy" / "argocd" / "health.lua"
ARGOCD_CM = REPO / "deploy" / "argocd" / "argocd-cm.yaml"
HEALTH_KEY = "resource.customizations.health.sluiceway.dev_TaskQueue"
ARGOCD_VERSION = os.environ.get("SLUICEWAY_ARGOCD_VERSION", "3.2.11")
ARGOCD_MODULE = "github.com/argoproj/argo-cd/v3"
# The CRDs the application-controller needs; ApplicationSets are not used.
CRD_FILES = ("application-crd.yaml", "appproject-crd.yaml")

_REPLACE_BLOCK = re.compile(r"^replace\s*\(\s*$(.*?)^\)\s*$", re.M | re.S)
_REPLACE_LINE = re.compile(r"^replace\s+(?!\()(.+)$", re.M)


class ArgoCDUnavailableError(BinariesUnavailableError):
    """Argo CD is neither available nor buildable; the message says what to do."""


@dataclass(frozen=True)
class ArgoCD:
    binary: Path
    crds: tuple[Path, ...]
    version: str


def argocd_dir(version: str = ARGOCD_VERSION) -> Path:
    return cache_root() / "argocd" / f"v{version}"


def _log(msg: str) -> None:
    print(f"[argocd-bin] {msg}", file=sys.stderr, flush=True)


def module_replaces(gomod_text: str) -> list[str]:
    """The ``old => new version`` replace directives of a go.mod that point at published modules.

    A replace with a filesystem target (``=> ./x``, ``=> ../x``) cannot be carried into a wrapper module
    and is reported instead of dropped, since building without it would compile different code.
    """
    bodies = [m.group(1) for m in _REPLACE_BLOCK.finditer(gomod_text)]
    bodies += [m.group(1) for m in _REPLACE_LINE.finditer(gomod_text)]
    out: list[str] = []
    for body in bodies:
        for raw in body.splitlines():
            line = raw.split("//", 1)[0].strip()
            if not line:
                continue
            left, sep, right = line.partition("=>")
            target = right.split()
            if not sep or not left.split() or not target:
                raise ArgoCDUnavailableError(f"unreadable replace directive in go.mod: {raw.strip()!r}")
            if target[0].startswith((".", "/")):
                raise ArgoCDUnavailableError(
                    f"go.mod replaces {left.strip()} with the local path {target[0]}; a wrapper module "
                    "cannot build that version. Pin a version whose replaces all name published modules."
                )
            if len(target) != 2:
                raise ArgoCDUnavailableError(f"replace without a version in go.mod: {raw.strip()!r}")
            out.append(f"{' '.join(left.split())} => {target[0]} {target[1]}")
    return sorted(set(out))


def wrapper_gomod(gomod_text: str, version: str) -> str:
    lines = ["module sluiceway.local/argocd-build", "", f"go {go_directive(gomod_text)}", ""]
    lines += godebug_lines(gomod_text)
    lines += ["", f"require {ARGOCD_MODULE} v{version}", "", "replace ("]
    lines += [f"\t{r}" for r in module_replaces(gomod_text)]
    lines += [")", ""]
    return "\n".join(lines)


def _cached(out: Path, version: str, *, need_binary: bool = True) -> bool:
    stamp = out / ".complete"
    if not stamp.is_file() or (need_binary and not (out / "argocd").is_file()):
        return False
    data = json.loads(stamp.read_text())
    return bool(data.get("version") == version) and all((out / c).is_file() for c in CRD_FILES)


def ensure_argocd(log: Log = _log, *, build: bool = True, version: str = ARGOCD_VERSION) -> ArgoCD:
    """Return the Argo CD binary and its CRDs, building them on first use (unless ``build`` is false)."""
    work = argocd_dir(version)
    out = work / "bin"
    explicit = os.environ.get("ARGOCD")
    with _locked(work / ".lock"):
        if not _cached(out, version, need_binary=not explicit):
            if not build:
                raise ArgoCDUnavailableError(
                    f"Argo CD v{version} is not built yet in {out}: run `make argocd-bin`."
                )
            _build(work, out, version, log, skip_binary=bool(explicit))
        else:
            log(f"cached: Argo CD v{version} in {out}")
    binary = Path(explicit) if explicit else out / "argocd"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ArgoCDUnavailableError(f"ARGOCD={explicit} is not an executable file")
    return ArgoCD(binary=binary, crds=tuple(out / c for c in CRD_FILES), version=version)


def _build(work: Path, out: Path, version: str, log: Log, *, skip_binary: bool) -> None:
    go = find_go()
    if go is None:
        raise ArgoCDUnavailableError(
            f"Go toolchain not found (needed once to build Argo CD v{version} into {out}). Install Go >= "
            "1.25.5 and put `go` on PATH (or set SLUICEWAY_GO=/path/to/go), or set ARGOCD to a prebuilt binary "
            "(the CRDs still come from the module, so Go is needed once either way)."
        )
    have = _go_version(go)
    if have < max(MIN_GO, (1, 25)):
        raise ArgoCDUnavailableError(
            f"{go} is Go {have[0]}.{have[1]}; Argo CD v{version} needs Go >= 1.25.5."
        )
    out.mkdir(parents=True, exist_ok=True)
    logfile = work / "build.log"
    logfile.write_text("")
    runner = _Runner(go, logfile, log)
    log(
        f"building Argo CD v{version} with {go} into {out} (first run only; about 8 min on 2 cores; log: {logfile})"
    )
    started = time.monotonic()
    with _MemorySampler() as mem:
        with tempfile.TemporaryDirectory() as tmp:
            info = json.loads(
                runner.go_cmd(
                    ["mod", "download", "-json", f"{ARGOCD_MODULE}@v{version}"],
                    Path(tmp),
                    f"fetching {ARGOCD_MODULE}@v{version}",
                )
            )
        module_dir = Path(info["Dir"])
        for crd in CRD_FILES:
            shutil.copyfile(module_dir / "manifests" / "crds" / crd, out / crd)
        if not skip_binary:
            upstream = Path(info["GoMod"]).read_text()
            src = work / "src"
            src.mkdir(parents=True, exist_ok=True)
            (src / "go.mod").write_text(wrapper_gomod(upstream, version))
            (src / "go.sum").touch()
            log(f"  wrapper module: {ARGOCD_MODULE} v{version}, {len(module_replaces(upstream))} replaces")
            pkg = f"{ARGOCD_MODULE}/cmd"
            runner.go_cmd(["get", f"{pkg}@v{version}"], src, "downloading Argo CD modules")
            ldflags = " ".join(
                [
                    "-s -w",
                    f"-X {ARGOCD_MODULE}/common.version={version}",
                    f"-X {ARGOCD_MODULE}/common.gitTag=v{version}",
                    f"-X {ARGOCD_MODULE}/common.gitTreeState=clean",
                ]
            )
            log("  compiling argocd (the long step)")
            runner.go_cmd(
                ["build", "-p", "2", "-trimpath", "-ldflags", ldflags, "-o", str(out / "argocd"), pkg],
                src,
                "compiling Argo CD",
            )
            check = subprocess.run(
                [str(out / "argocd"), "version", "--client", "--short"], capture_output=True, text=True
            )
            if check.returncode != 0:
                raise ArgoCDUnavailableError(
                    f"built {out / 'argocd'} but `argocd version` failed: {check.stderr}"
                )
    elapsed = time.monotonic() - started
    stats = {
        "version": version,
        "go": str(go),
        "seconds": round(elapsed),
        "peak_system_memory_mib": round(mem.peak_bytes / 2**20),
        "largest_process_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }
    (out / ".complete").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"built in {elapsed / 60:.1f} min; peak memory in use {stats['peak_system_memory_mib']} MiB")


@dataclass(frozen=True)
class Health:
    status: str
    message: str


def health(binary: Path, obj: Mapping[str, Any], cm: Path = ARGOCD_CM, *, workdir: Path) -> Health:
    """Argo CD's own evaluation of ``obj`` with the health script in ``cm``, offline (no cluster).

    ``argocd admin settings resource-overrides health`` loads the script from the ConfigMap file the
    way the application-controller does, and runs it in the same sandboxed Lua VM.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = (
        workdir / f"{(obj.get('metadata') or {}).get('name', 'obj')}-{os.getpid()}-{time.monotonic_ns()}.json"
    )
    path.write_text(json.dumps(obj))
    try:
        proc = subprocess.run(
            [
                str(binary),
                "admin",
                "settings",
                "resource-overrides",
                "health",
                str(path),
                "--argocd-cm-path",
                str(cm),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        path.unlink(missing_ok=True)
    fields = dict(
        line.split(":", 1) for line in proc.stdout.splitlines() if line.startswith(("STATUS:", "MESSAGE:"))
    )
    if proc.returncode != 0 or "STATUS" not in fields:
        raise ArgoCDUnavailableError(
            f"argocd health evaluation failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
        )
    return Health(status=fields["STATUS"].strip(), message=fields.get("MESSAGE", "").strip())


PART_OF = {
    "app.kubernetes.io/part-of": "argocd"
}  # without it the controller exits: "configmap argocd-cm not found"


class GitOps:
    """Argo CD's application-controller and repo-server as local processes against a cluster.

    Both come from the one multi-call binary (``ARGOCD_BINARY_NAME`` picks the component), with
    ``ARGOCD_FAKE_IN_CLUSTER=true`` so the in-cluster destination is the cluster of ``KUBECONFIG``, and
    a private ``redis-server``. No argocd-server or Dex: Applications are plain objects in ``namespace``.
    The caller installs the CRDs, the default AppProject, argocd-cm and argocd-secret first
    (``bootstrap_objects``).
    """

    def __init__(
        self,
        argocd: ArgoCD,
        kubeconfig: Path,
        namespace: str,
        run_dir: Path,
        *,
        resync: int = 30,
        helm: Path | None = None,
    ) -> None:
        self.argocd, self.kubeconfig, self.namespace, self.run_dir = argocd, kubeconfig, namespace, run_dir
        self.resync = resync
        # The repo-server renders a Helm source by running `helm` from PATH.
        self.helm = helm
        self.procs: list[ManagedProcess] = []

    def start(self) -> None:
        redis_server = shutil.which("redis-server")
        if redis_server is None:
            raise ArgoCDUnavailableError("redis-server is not installed: run `make system-deps`")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        registry = Registry(self.run_dir)
        redis_port, repo_port = free_port(), free_port()
        data = self.run_dir / "data"
        for sub in ("tls", "ssh", "gpg", "plugins", "tmp"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "ARGOCD_FAKE_IN_CLUSTER": "true",
            "ARGOCD_GPG_ENABLED": "false",
            "ARGOCD_TLS_DATA_PATH": str(data / "tls"),
            "ARGOCD_SSH_DATA_PATH": str(data / "ssh"),
            "ARGOCD_GNUPGHOME": str(data / "gpg"),
            "ARGOCD_PLUGINSOCKFILEPATH": str(data / "plugins"),
            "TMPDIR": str(data / "tmp"),
            "HOSTNAME": "sluiceway-test-controller",
            # The repo-server's git credential socket is one fixed path in /tmp by default, so two
            # runs on one machine (two test sessions, or a run beside a developer's) take it from
            # each other. A socket path must stay under 108 bytes; the run dir may be deeper.
            "ARGOCD_ASK_PASS_SOCK": _short_socket_path(data / "ask-pass.sock"),
        }
        if self.helm is not None:
            env["PATH"] = f"{self.helm.parent}{os.pathsep}{env.get('PATH', '')}"
        redis = ManagedProcess(
            "argocd-redis",
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            self.run_dir / "redis.log",
            registry,
        )
        self.procs.append(redis)
        common = ["--redis", f"127.0.0.1:{redis_port}", "--loglevel", "info", "--logformat", "text"]
        # Ports are picked free, yet another process (a parallel test session's) can bind one
        # before the repo-server does, which then exits "address already in use": CI saw it. Such
        # a race is retried with fresh ports, as the control plane's own start does.
        for attempt in range(3):
            repo = ManagedProcess(
                "argocd-repo-server",
                [
                    str(self.argocd.binary),
                    "--port",
                    str(repo_port),
                    "--disable-tls",
                    "--metrics-port",
                    str(free_port()),
                    *common,
                ],
                self.run_dir / f"repo-server{'' if attempt == 0 else f'-{attempt}'}.log",
                registry,
                env={**env, "ARGOCD_BINARY_NAME": "argocd-repo-server"},
            )
            self.procs.append(repo)

            def listening(port: int = repo_port) -> bool:
                return not port_free(port)

            try:
                wait_until(listening, 60, "the repo-server's port", watch=self.procs)
                break
            except ClusterError:
                lost_race = not repo.alive() and "address already in use" in repo.log_tail(40)
                if not lost_race or attempt == 2:
                    raise
                self.procs.remove(repo)
                repo_port = free_port()
        self.procs.append(
            ManagedProcess(
                "argocd-application-controller",
                [
                    str(self.argocd.binary),
                    "--repo-server",
                    f"127.0.0.1:{repo_port}",
                    "--repo-server-plaintext",
                    "--app-resync",
                    str(self.resync),
                    "--namespace",
                    self.namespace,
                    "--metrics-port",
                    str(free_port()),
                    *common,
                ],
                self.run_dir / "application-controller.log",
                registry,
                env={**env, "ARGOCD_BINARY_NAME": "argocd-application-controller"},
            )
        )

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(lines)}" for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


# Argo CD assesses no health for an Application since v1.8, so in an app of apps a sync wave would not
# wait for the child Application of the wave before. docs/gitops.md tells users to add such a check;
# this one reports the child's own health, and a child not compared yet as Progressing.
APPLICATION_HEALTH_KEY = "resource.customizations.health.argoproj.io_Application"
APPLICATION_HEALTH_LUA = """hs = {status = "Progressing", message = ""}
if obj.status ~= nil and obj.status.health ~= nil and obj.status.health.status ~= nil then
  if obj.status.health.status ~= "Missing" then
    hs.status = obj.status.health.status
  end
  if obj.status.health.message ~= nil then
    hs.message = obj.status.health.message
  end
end
return hs
"""


def bootstrap_objects(
    namespace: str, cm: Path = ARGOCD_CM, *, application_health: bool = False
) -> list[dict[str, Any]]:
    """The objects argocd-server and the install manifests would normally create: the default
    AppProject, argocd-cm (with the project's health script, and with ``application_health`` one for
    Applications, which an app of apps needs for its sync waves) and argocd-secret."""
    import yaml  # a test dependency; the build path above needs none

    cm_obj = yaml.safe_load(cm.read_text())
    cm_obj["metadata"] = {"name": "argocd-cm", "namespace": namespace, "labels": dict(PART_OF)}
    if application_health:
        cm_obj["data"][APPLICATION_HEALTH_KEY] = APPLICATION_HEALTH_LUA
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        cm_obj,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "argocd-secret", "namespace": namespace, "labels": dict(PART_OF)},
            "stringData": {"server.secretkey": "sluiceway-test-only"},
        },
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "AppProject",
            "metadata": {"name": "default", "namespace": namespace},
            "spec": {
                "sourceRepos": ["*"],
                "destinations": [{"server": "*", "namespace": "*"}],
                "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
            },
        },
    ]


def render_cm(lua: str) -> str:
    """deploy/argocd/argocd-cm.yaml: the health script carried verbatim in a YAML block scalar."""
    lines = [
        "# The resource.customizations for sluiceway.dev/TaskQueue, to merge into Argo CD's argocd-cm:",
        "#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file deploy/argocd/argocd-cm.yaml",
        "# The health script is deploy/argocd/health.lua, carried verbatim (tests/argocd/test_health.py checks).",
        "# Regenerate after editing health.lua: python -m localcluster.argocd --write-cm (from e2e/).",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: argocd-cm",
        "  namespace: argocd",
        "  labels:",
        "    app.kubernetes.io/name: argocd-cm",
        "    app.kubernetes.io/part-of: argocd",
        "data:",
        f"  {HEALTH_KEY}: |",
    ]
    lines += [f"    {line}" if line.strip() else "" for line in lua.splitlines()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster.argocd", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--print-path", action="store_true", help="print only the path of the binary")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building")
    parser.add_argument(
        "--write-cm", action="store_true", help=f"regenerate {ARGOCD_CM.name} from health.lua"
    )
    args = parser.parse_args(argv)
    if args.write_cm:
        ARGOCD_CM.write_text(render_cm(HEALTH_LUA.read_text()))
        return 0
    try:
        found = ensure_argocd(build=not args.no_build)
    except BinariesUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(found.binary if args.print_path else f"argocd v{found.version}: {found.binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _short_socket_path(wanted: Path) -> str:
    """``wanted``, or a fresh path in the temporary directory if ``wanted`` is too long for a
    Unix socket (108 bytes with its terminator on Linux)."""
    if len(os.fsencode(wanted)) < 100:
        return str(wanted)
    return str(Path(tempfile.mkdtemp(prefix="sluiceway-argocd-")) / "ask-pass.sock")
