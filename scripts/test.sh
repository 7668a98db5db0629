#!/usr/bin/env bash
# `make test`: every test, in three phases (docs/development.md, "CI time"):
#
#   1. tests/ on TEST_WORKERS xdist workers, while the Go builds that only e2e/ needs (control
#      plane, Helm, Argo CD; cached after the first run) run in the background;
#   2. e2e/ on TEST_WORKERS workers, once those builds are done;
#   3. the demo runs (conftest.py DEMO_RUNS: each starts a control plane of its own) on
#      TEST_WORKERS workers, beside each other only;
#   4. the timing-sensitive tests (conftest.py TIMING_SENSITIVE: QPS windows, latency bounds) alone,
#      one at a time, so nothing heavy runs beside them.
#
# Each xdist group (a module, or all of one broker's tests) stays on one worker; see conftest.py.
# Every phase runs even if an earlier one failed, so one run reports every failure.
# TEST_WORKERS=0 runs everything in one plain serial session, as before the phases.
# With arguments (`make test PYTEST_ARGS=...`), one plain session runs with them instead.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${TEST_WORKERS:-2}
mkdir -p .run

started=$SECONDS
if [ $# -gt 0 ] || [ "$WORKERS" = 0 ]; then
  make -s cluster-bins helm-bin argocd-bin || exit 1
  exec "$PY" -m pytest "$@"
fi

bins_log=.run/go-builds.log
echo "[test] building (or finding cached) the control plane, Helm and Argo CD in the background: $bins_log"
# Sequential on purpose: Helm reuses the control plane's compiled k8s.io packages from GOCACHE,
# and two Go builds at once on 2 cores are no faster than one after the other.
make -s cluster-bins helm-bin argocd-bin >"$bins_log" 2>&1 &
bins=$!
# Stop the background build if this script is interrupted.
trap 'kill -- "$bins" 2>/dev/null; exit 130' INT TERM

failed=()
declare -a summary
phase() {
  local name=$1
  shift
  local t0=$SECONDS rc=0
  echo "[test] phase: $name"
  "$PY" -m pytest --durations=15 "$@" || rc=$?
  # Exit 5 is "no tests collected": a phase with nothing to run is not a failure.
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || failed+=("$name (exit $rc)")
  summary+=("$(printf '%-40s %5d s  exit %d' "$name" $((SECONDS - t0)) $rc)")
}

phase "1 tests/ (parallel)" tests -n "$WORKERS" --dist loadgroup -m "not timing and not demo"

t0=$SECONDS
if ! wait "$bins"; then
  cat "$bins_log"
  echo "[test] the Go builds failed (log above); e2e/ cannot run" >&2
  exit 1
fi
trap - INT TERM
cat "$bins_log"
summary+=("$(printf '%-40s %5d s' "waiting for the Go builds" $((SECONDS - t0)))")

phase "2 e2e/ (parallel)" e2e -n "$WORKERS" --dist loadgroup -m "not timing and not demo"
phase "3 demo runs (parallel)" e2e -n "$WORKERS" --dist loadgroup -m demo
phase "4 timing-sensitive (serial)" tests e2e -m timing

echo "[test] phases:"
printf '  %s\n' "${summary[@]}"
echo "[test] total $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf '[test] FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
