"""Locate or build the control-plane binaries (etcd, kube-apiserver, kube-controller-manager, kubectl).

Resolution order, per binary:

1. ``$KUBEBUILDER_ASSETS/<name>`` (the controller-runtime envtest convention). envtest ships etcd,
   kube-apiserver and kubectl but not kube-controller-manager, so that one may still be built.
2. The per-version cache, ``${XDG_CACHE_HOME:-$HOME/.cache}/sluiceway/control-plane/<key>/bin``.
3. A build from the Go module proxy with the ordinary ``go`` client, into that cache.

k8s.io/kubernetes cannot be ``go install``-ed: its go.mod requires every staging module at the
unresolvable ``v0.0.0`` and points it at ``./staging/src/...``. So we generate a wrapper module that
requires k8s.io/kubernetes and replaces each staging module with its published ``v0.Y.Z``. The list
is read from that exact version's go.mod (as served by the proxy), never kept by hand, so a version
bump that adds or drops a staging module needs no edit here. etcd's server module has the same
shape (``replace go.etcd.io/etcd/api/v3 => ../api``) and gets the same treatment.

Run ``python -m localcluster.binaries`` to build or locate them; ``--print-dir`` prints only the
directory holding them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

KUBE_VERSION = os.environ.get("SLUICEWAY_KUBE_VERSION", "1.35.4")
ETCD_VERSION = os.environ.get("SLUICEWAY_ETCD_VERSION", "3.6.16")

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")
ETCD_BINARY = "etcd"
ALL_BINARIES = (ETCD_BINARY, *KUBE_BINARIES)

# The oldest Go that builds both pinned versions (their go.mod `go` directives).
MIN_GO = (1, 24)

Log = Callable[[str], None]


class BinariesUnavailableError(RuntimeError):
    """The binaries are neither available nor buildable; the message says what to do."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path

    def as_dict(self) -> dict[str, Path]:
        return {
            "etcd": self.etcd,
            "kube-apiserver": self.kube_apiserver,
            "kube-controller-manager": self.kube_controller_manager,
            "kubectl": self.kubectl,
        }


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluiceway"


def build_dir(kube_version: str = KUBE_VERSION, etcd_version: str = ETCD_VERSION) -> Path:
    return cache_root() / "control-plane" / f"k8s-v{kube_version}_etcd-v{etcd_version}"


def _log(msg: str) -> None:
    print(f"[cluster-bins] {msg}", file=sys.stderr, flush=True)


def find_go() -> Path | None:
    explicit = os.environ.get("SLUICEWAY_GO")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    found = shutil.which("go")
    if found:
        return Path(found)
    # The usual tarball install location, which is often not on a non-login PATH.
    fallback = Path("/usr/local/go/bin/go")
    return fallback if fallback.is_file() else None


def _go_version(go: Path) -> tuple[int, int]:
    out = subprocess.run([str(go), "env", "GOVERSION"], capture_output=True, text=True, check=True)
    m = re.match(r"go(\d+)\.(\d+)", out.stdout.strip())
    if not m:
        return (0, 0)
    return (int(m.group(1)), int(m.group(2)))


def _go_env(go: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Never fetch a different toolchain (only registries are reachable), never need cgo, and ignore
    # a caller's GOFLAGS such as -mod=vendor that would break the wrapper modules.
    env.update(GOTOOLCHAIN="local", CGO_ENABLED="0", GOFLAGS="-mod=mod -buildvcs=false")
    env["PATH"] = f"{go.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def staging_replaces(gomod_text: str) -> list[str]:
    """The module paths that k8s.io/kubernetes' go.mod maps to its local staging tree."""
    return sorted(
        set(re.findall(r"^\s*(?:replace\s+)?(k8s\.io/[\w.\-]+)\s+=>\s+\./staging/", gomod_text, re.M))
    )


def sibling_replaces(gomod_text: str) -> list[str]:
    """The module paths that a go.mod maps to sibling directories (``=> ../x``), as etcd's does."""
    return sorted(set(re.findall(r"^\s*(?:replace\s+)?(\S+)\s+=>\s+\.\./", gomod_text, re.M)))


def go_directive(gomod_text: str) -> str:
    m = re.search(r"^go\s+(\S+)\s*$", gomod_text, re.M)
    return m.group(1) if m else "1.24.0"


def godebug_lines(gomod_text: str) -> list[str]:
    # Upstream pins runtime GODEBUG defaults (e.g. `godebug default=go1.24`); a main module's own
    # go.mod decides them, so the wrapper must repeat them for the binaries to behave like upstream's.
    return re.findall(r"^godebug\s+.+$", gomod_text, re.M)


def wrapper_gomod(
    module: str, gomod_text: str, require: str, version: str, replaces: Sequence[str], replace_version: str
) -> str:
    lines = [f"module {module}", "", f"go {go_directive(gomod_text)}", ""]
    lines += godebug_lines(gomod_text)
    lines += ["", f"require {require} {version}", "", "replace ("]
    lines += [f"\t{m} => {m} {replace_version}" for m in replaces]
    lines += [")", ""]
    return "\n".join(lines)


class _MemorySampler:
    """Peak system-wide memory in use while building (what a CI machine must have free)."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._base = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used() -> int:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info.get("MemTotal", 0) - info.get("MemAvailable", 0)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.peak_bytes = max(self.peak_bytes, self._used() - self._base)

    def __enter__(self) -> _MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Runner:
    def __init__(self, go: Path, logfile: Path, log: Log, hint: str = "") -> None:
        self.go = go
        self.env = _go_env(go)
        self.logfile = logfile
        self.log = log
        self.hint = hint or (
            "Fix the cause above (network to the Go module proxy, disk space, Go version), then rerun "
            "`make cluster-bins`; or point KUBEBUILDER_ASSETS at prebuilt envtest binaries."
        )

    def go_cmd(self, args: Sequence[str], cwd: Path, what: str) -> str:
        cmd = [str(self.go), *args]
        started = time.monotonic()
        with self.logfile.open("a") as lf:
            lf.write(f"\n$ (cd {cwd} && {' '.join(cmd)})\n")
            lf.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=lf, text=True)
            stop = threading.Event()

            def heartbeat() -> None:
                # CI logs that stay silent for many minutes look hung; say that we are alive.
                while not stop.wait(60):
                    self.log(f"  ... still {what} ({(time.monotonic() - started) / 60:.0f} min)")

            hb = threading.Thread(target=heartbeat, daemon=True)
            hb.start()
            try:
                out, _ = proc.communicate()
            finally:
                stop.set()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            lf.write(out)
        if proc.returncode != 0:
            tail = self.logfile.read_text(errors="replace").splitlines()[-25:]
            raise BinariesUnavailableError(
                f"{what} failed (go exited {proc.returncode}). Last lines of {self.logfile}:\n"
                + "\n".join("    " + t for t in tail)
                + "\n"
                + self.hint
            )
        self.log(f"  {what}: {time.monotonic() - started:.0f}s")
        return out


def _download_gomod(runner: _Runner, module: str, version: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = runner.go_cmd(
            ["mod", "download", "-json", f"{module}@{version}"],
            Path(tmp),
            f"fetching {module}@{version} go.mod",
        )
    info = json.loads(out)
    return Path(info["GoMod"]).read_text()


def _build_kube(runner: _Runner, work: Path, out: Path, version: str) -> None:
    src = work / "src-kubernetes"
    src.mkdir(parents=True, exist_ok=True)
    upstream = _download_gomod(runner, "k8s.io/kubernetes", f"v{version}")
    modules = staging_replaces(upstream)
    if not modules:
        raise BinariesUnavailableError(
            f"k8s.io/kubernetes v{version}'s go.mod has no staging replaces; is it a real release?"
        )
    staging_version = "v0." + version.split(".", 1)[1]
    runner.log(
        f"  wrapper module: k8s.io/kubernetes v{version}, {len(modules)} staging modules -> {staging_version}"
    )
    (src / "go.mod").write_text(
        wrapper_gomod(
            "sluiceway.local/controlplane-build",
            upstream,
            "k8s.io/kubernetes",
            f"v{version}",
            modules,
            staging_version,
        )
    )
    (src / "go.sum").touch()
    pkgs = [f"k8s.io/kubernetes/cmd/{name}" for name in KUBE_BINARIES]
    runner.go_cmd(["get", *[f"{p}@v{version}" for p in pkgs]], src, "downloading Kubernetes modules")
    minor = version.split(".")[1]
    ldflags = " ".join(
        [
            "-s -w",
            f"-X k8s.io/component-base/version.gitVersion=v{version}",
            "-X k8s.io/component-base/version.gitMajor=1",
            f"-X k8s.io/component-base/version.gitMinor={minor}",
            "-X k8s.io/component-base/version.gitTreeState=clean",
            f"-X k8s.io/client-go/pkg/version.gitVersion=v{version}",
            "-X k8s.io/client-go/pkg/version.gitMajor=1",
            f"-X k8s.io/client-go/pkg/version.gitMinor={minor}",
        ]
    )
    runner.log("  compiling kube-apiserver, kube-controller-manager, kubectl (the long step)")
    runner.go_cmd(
        ["build", "-p", "2", "-trimpath", "-ldflags", ldflags, "-o", f"{out}/", *pkgs],
        src,
        "compiling Kubernetes",
    )


def _build_etcd(runner: _Runner, work: Path, out: Path, version: str) -> None:
    src = work / "src-etcd"
    src.mkdir(parents=True, exist_ok=True)
    upstream = _download_gomod(runner, "go.etcd.io/etcd/server/v3", f"v{version}")
    modules = sibling_replaces(upstream)
    (src / "go.mod").write_text(
        wrapper_gomod(
            "sluiceway.local/etcd-build",
            upstream,
            "go.etcd.io/etcd/server/v3",
            f"v{version}",
            modules,
            f"v{version}",
        )
    )
    (src / "go.sum").touch()
    runner.go_cmd(["get", f"go.etcd.io/etcd/server/v3@v{version}"], src, "downloading etcd modules")
    runner.go_cmd(
        [
            "build",
            "-p",
            "2",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(out / ETCD_BINARY),
            "go.etcd.io/etcd/server/v3",
        ],
        src,
        "compiling etcd",
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two `make test` runs (or pytest-xdist workers) must not build into the same directory at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _from_assets() -> dict[str, Path]:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        return {}
    found = {}
    for name in ALL_BINARIES:
        p = Path(assets) / name
        if p.is_file() and os.access(p, os.X_OK):
            found[name] = p
    return found


def _cached(out: Path, names: Sequence[str]) -> bool:
    stamp = out / ".complete"
    return stamp.is_file() and all((out / n).is_file() for n in names)


def ensure_binaries(log: Log = _log, *, build: bool = True) -> Binaries:
    """Return the four binaries, building whatever is missing (unless ``build`` is false)."""
    found = _from_assets()
    if found:
        log(f"using {', '.join(sorted(found))} from KUBEBUILDER_ASSETS={os.environ['KUBEBUILDER_ASSETS']}")
    work = build_dir()
    out = work / "bin"
    need_kube = [n for n in KUBE_BINARIES if n not in found]
    need_etcd = ETCD_BINARY not in found
    with _locked(work / ".lock"):
        stamp = out / ".complete"
        stamp_data: dict[str, object] = json.loads(stamp.read_text()) if stamp.is_file() else {}
        built = stamp_data.get("built")
        done = {str(b) for b in built} if isinstance(built, list) else set()
        todo_kube = bool(need_kube) and not (set(KUBE_BINARIES) <= done and _cached(out, KUBE_BINARIES))
        todo_etcd = need_etcd and not (ETCD_BINARY in done and _cached(out, [ETCD_BINARY]))
        if todo_kube or todo_etcd:
            if not build:
                raise BinariesUnavailableError(
                    f"control-plane binaries are not built yet in {out}: run `make cluster-bins`."
                )
            _build(work, out, todo_kube, todo_etcd, done, log)
        else:
            log(f"cached: Kubernetes v{KUBE_VERSION} + etcd v{ETCD_VERSION} in {out}")
    paths = {name: found.get(name, out / name) for name in ALL_BINARIES}
    return Binaries(
        etcd=paths["etcd"],
        kube_apiserver=paths["kube-apiserver"],
        kube_controller_manager=paths["kube-controller-manager"],
        kubectl=paths["kubectl"],
    )


def _build(work: Path, out: Path, kube: bool, etcd: bool, done: set[str], log: Log) -> None:
    go = find_go()
    if go is None:
        raise BinariesUnavailableError(
            "Go toolchain not found (needed once to build kube-apiserver, kube-controller-manager, kubectl "
            f"and etcd into {out}). Install Go >= {MIN_GO[0]}.{MIN_GO[1]} and put `go` on PATH (or set "
            "SLUICEWAY_GO=/path/to/go), or set KUBEBUILDER_ASSETS to a directory holding those binaries."
        )
    have = _go_version(go)
    if have < MIN_GO:
        raise BinariesUnavailableError(
            f"{go} is Go {have[0]}.{have[1]}; building Kubernetes v{KUBE_VERSION} needs Go >= {MIN_GO[0]}.{MIN_GO[1]}. "
            "Install a newer Go, or set SLUICEWAY_GO to one."
        )
    out.mkdir(parents=True, exist_ok=True)
    logfile = work / "build.log"
    logfile.write_text("")
    runner = _Runner(go, logfile, log)
    what = " + ".join(
        x for x, on in ((f"Kubernetes v{KUBE_VERSION}", kube), (f"etcd v{ETCD_VERSION}", etcd)) if on
    )
    log(f"building {what} with {go} into {out} (first run only; about 5 min on 2 cores; log: {logfile})")
    started = time.monotonic()
    with _MemorySampler() as mem:
        if etcd:
            _build_etcd(runner, work, out, ETCD_VERSION)
            done.add(ETCD_BINARY)
        if kube:
            _build_kube(runner, work, out, KUBE_VERSION)
            done.update(KUBE_BINARIES)
    elapsed = time.monotonic() - started
    largest_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    for name in sorted(done):
        flags = ["version", "--client"] if name == "kubectl" else ["--version"]
        check = subprocess.run([str(out / name), *flags], capture_output=True, text=True)
        if check.returncode != 0:
            raise BinariesUnavailableError(
                f"built {out / name} but `{name} {' '.join(flags)}` failed: {check.stderr.strip()}"
            )
    stats = {
        "kube_version": KUBE_VERSION,
        "etcd_version": ETCD_VERSION,
        "built": sorted(done),
        "go": str(go),
        "seconds": round(elapsed),
        "peak_system_memory_mib": round(mem.peak_bytes / 2**20),
        "largest_process_rss_mib": round(largest_rss / 2**20),
    }
    (out / ".complete").write_text(json.dumps(stats, indent=2) + "\n")
    log(
        f"built in {elapsed / 60:.1f} min; peak memory in use {stats['peak_system_memory_mib']} MiB "
        f"(largest process {stats['largest_process_rss_mib']} MiB)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster.binaries", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--print-dir", action="store_true", help="print only the directory of the built binaries"
    )
    parser.add_argument("--no-build", action="store_true", help="fail instead of building")
    args = parser.parse_args(argv)
    try:
        bins = ensure_binaries(build=not args.no_build)
    except BinariesUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_dir:
        print(bins.kube_apiserver.parent)
    else:
        for name, path in bins.as_dict().items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
