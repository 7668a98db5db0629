"""Locate or build the Helm 3 CLI the chart tests use.

Resolution order:

1. ``$HELM``, when it names an executable file (a Helm from a package manager, CI's own).
2. The cache, ``${XDG_CACHE_HOME:-$HOME/.cache}/sluiceway/helm/v<version>/bin/helm``.
3. ``go install helm.sh/helm/v3/cmd/helm@v<version>`` into that cache (about 2 min on 2 cores; its
   go.mod has no replaces, so no wrapper module is needed).

The link flags are the ones Helm's own Makefile sets: the version (``helm version`` would say
"main" otherwise), and the Kubernetes version ``helm template`` and ``helm lint`` assume when they
do not talk to a cluster. Helm's Makefile takes that from its client-go; we take the local control
plane's, so a template renders for the API server the tests use (it defaults to v1.20 otherwise).

``python -m localcluster.helm`` builds or locates it and prints its path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .binaries import KUBE_VERSION, BinariesUnavailableError, Log, _Runner
from .gobuild import cached_go_build, executable, go_install, tool_dir

HELM_VERSION = os.environ.get("SLUICEWAY_HELM_VERSION", "3.22.0")
HELM_MODULE = "helm.sh/helm/v3"
MIN_GO_HELM = (1, 26)  # helm v3.22's go.mod `go` directive


def _log(msg: str) -> None:
    print(f"[helm-bin] {msg}", file=sys.stderr, flush=True)


def helm_ldflags(helm_version: str = HELM_VERSION, kube_version: str = KUBE_VERSION) -> str:
    major, minor = kube_version.split(".")[:2]
    return " ".join(
        [
            "-s -w",
            f"-X {HELM_MODULE}/internal/version.version=v{helm_version}",
            "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
            f"-X {HELM_MODULE}/pkg/chartutil.k8sVersionMajor={major}",
            f"-X {HELM_MODULE}/pkg/chartutil.k8sVersionMinor={minor}",
            f"-X {HELM_MODULE}/pkg/lint/rules.k8sVersionMajor={major}",
            f"-X {HELM_MODULE}/pkg/lint/rules.k8sVersionMinor={minor}",
        ]
    )


def helm_cache_dir(helm_version: str = HELM_VERSION, kube_version: str = KUBE_VERSION) -> Path:
    # The assumed Kubernetes version is linked in, so it is part of the key.
    return tool_dir("helm", f"v{helm_version}_k8s-v{kube_version}")


def ensure_helm(log: Log = _log, *, build: bool = True) -> Path:
    """The ``helm`` binary: ``$HELM``, else the cached build, else a build (unless ``build`` is false)."""
    explicit = os.environ.get("HELM")
    if explicit:
        found = executable(explicit)
        if found is None:
            raise BinariesUnavailableError(
                f"HELM={explicit} is not an executable file; unset it to build Helm v{HELM_VERSION} into the cache."
            )
        log(f"using HELM={found}")
        return found
    version = f"v{HELM_VERSION}"

    def steps(runner: _Runner, work: Path, out: Path) -> None:
        go_install(
            runner,
            f"{HELM_MODULE}/cmd/helm",
            version,
            out,
            ldflags=helm_ldflags(),
            what=f"compiling Helm {version}",
        )

    built = cached_go_build(
        "helm",
        helm_cache_dir().name,
        ["helm"],
        steps,
        check_args={"helm": ["version", "--short"]},
        expected_minutes=2,
        min_go=MIN_GO_HELM,
        build=build,
        log=log,
        hint="Fix the cause above, then rerun `make helm-bin`; or set HELM to a Helm 3 binary.",
    )
    return built.path("helm")


def helm_env(home: Path) -> dict[str, str]:
    """An environment that keeps Helm's config, cache and data out of the user's own (``~/.config/helm``)."""
    env = dict(os.environ)
    env.update(
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster.helm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="fail instead of building")
    args = parser.parse_args(argv)
    try:
        helm = ensure_helm(build=not args.no_build)
    except BinariesUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True)
    print(f"helm: {helm} ({version.stdout.strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
