"""Build a Go program from the module proxy into the per-version cache, once.

The control-plane build (``binaries.py``) and the tool builds (Helm in ``helm.py``, Argo CD in
``argocd.py``) share one shape, which lives here:

- the cache is ``${XDG_CACHE_HOME:-$HOME/.cache}/sluiceway/<thing>/<version>/``, with the binaries in
  ``bin/``, the build log in ``build.log`` and any wrapper module beside them;
- a file lock (``.lock``) serializes concurrent builders (two ``make test`` runs, xdist workers): the
  second one waits, then finds the first one's result;
- a ``bin/.complete`` JSON stamp, written last, records what was built, from which Go, how long it
  took and the peak memory; a directory without it is rebuilt, so a killed build never counts.

``cached_go_build`` takes the build steps as a callable, so a tool that needs a wrapper module (Argo
CD) and one that is a plain ``go install`` (Helm, ``go_install``) reuse the same lock, stamp and
error messages.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .binaries import (
    MIN_GO,
    BinariesUnavailableError,
    Log,
    _go_version,
    _locked,
    _log,
    _MemorySampler,
    _Runner,
    cache_root,
    find_go,
)

STAMP = ".complete"

# (runner, work directory, output bin directory) -> None; raise BinariesUnavailableError on failure.
BuildSteps = Callable[[_Runner, Path, Path], None]


@dataclass(frozen=True)
class CachedBuild:
    """Where a cached tool lives and what its stamp says."""

    work: Path
    bin: Path
    stamp: dict[str, object]

    def path(self, name: str) -> Path:
        return self.bin / name


def tool_dir(thing: str, version: str) -> Path:
    return cache_root() / thing / version


def read_stamp(out: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cached_go_build(
    thing: str,
    version: str,
    names: Sequence[str],
    steps: BuildSteps,
    *,
    check_args: Mapping[str, Sequence[str]] | None = None,
    expected_minutes: float = 3,
    min_go: tuple[int, int] = MIN_GO,
    build: bool = True,
    log: Log = _log,
    hint: str = "",
) -> CachedBuild:
    """Return the cached build of ``thing`` ``version`` (binaries ``names``), building it first if needed.

    ``check_args[name]`` is run against each built binary (e.g. ``["version"]``); a non-zero exit
    fails the build instead of caching a broken binary. ``hint`` is the rerun advice in errors.
    """
    work = tool_dir(thing, version)
    out = work / "bin"
    with _locked(work / ".lock"):
        stamp = read_stamp(out)
        if stamp is not None and all((out / n).is_file() for n in names):
            log(f"cached: {thing} {version} in {out}")
            return CachedBuild(work, out, stamp)
        if not build:
            raise BinariesUnavailableError(f"{thing} {version} is not built yet in {out}. {hint}".strip())
        go = find_go()
        if go is None:
            raise BinariesUnavailableError(
                f"Go toolchain not found (needed once to build {thing} {version} into {out}). Install Go >= "
                f"{min_go[0]}.{min_go[1]} and put `go` on PATH (or set SLUICEWAY_GO=/path/to/go). {hint}".strip()
            )
        have = _go_version(go)
        if have < min_go:
            raise BinariesUnavailableError(
                f"{go} is Go {have[0]}.{have[1]}; building {thing} {version} needs Go >= {min_go[0]}.{min_go[1]}. "
                "Install a newer Go, or set SLUICEWAY_GO to one."
            )
        (out / STAMP).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        logfile = work / "build.log"
        logfile.write_text("")
        runner = _Runner(go, logfile, log, hint=hint)
        log(
            f"building {thing} {version} with {go} into {out} "
            f"(first run only; about {expected_minutes:g} min on 2 cores; log: {logfile})"
        )
        started = time.monotonic()
        before_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with _MemorySampler() as mem:
            steps(runner, work, out)
        elapsed = time.monotonic() - started
        for name in names:
            if not (out / name).is_file():
                raise BinariesUnavailableError(f"building {thing} {version} produced no {out / name}")
            args = (check_args or {}).get(name)
            if args is None:
                continue
            check = subprocess.run([str(out / name), *args], capture_output=True, text=True)
            if check.returncode != 0:
                raise BinariesUnavailableError(
                    f"built {out / name} but `{name} {' '.join(args)}` failed: {check.stderr.strip()}"
                )
        largest_rss = max(before_rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
        stamp = {
            "thing": thing,
            "version": version,
            "built": sorted(names),
            "go": str(go),
            "seconds": round(elapsed),
            "peak_system_memory_mib": round(mem.peak_bytes / 2**20),
            "largest_process_rss_mib": round(largest_rss / 2**20),
        }
        (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        log(
            f"built {thing} {version} in {elapsed / 60:.1f} min; peak memory in use {stamp['peak_system_memory_mib']} MiB"
        )
        return CachedBuild(work, out, stamp)


def go_install(
    runner: _Runner, package: str, version: str, out: Path, *, ldflags: str = "-s -w", what: str = ""
) -> None:
    """``go install package@version`` with ``GOBIN=out``: for modules whose go.mod has no replaces.

    Run in an empty directory so no surrounding go.mod or go.work is picked up.
    """
    saved = dict(runner.env)
    runner.env["GOBIN"] = str(out)
    runner.env.pop("GOWORK", None)
    empty = out.parent / "empty"
    empty.mkdir(exist_ok=True)
    try:
        runner.go_cmd(
            ["install", "-p", "2", "-trimpath", "-ldflags", ldflags, f"{package}@{version}"],
            empty,
            what or f"compiling {package}@{version}",
        )
    finally:
        runner.env.clear()
        runner.env.update(saved)


def executable(path: str | os.PathLike[str] | None) -> Path | None:
    """``path`` if it names an executable file (for ``$HELM``-style overrides), else None."""
    if not path:
        return None
    p = Path(path)
    return p if p.is_file() and os.access(p, os.X_OK) else None
