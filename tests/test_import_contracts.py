"""The import layers of `make lint` (import-linter, contracts in pyproject.toml): the tree keeps
them, a forbidden import breaks them, and the cheap imports are cheap at run time too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{root / 'worker-image'}:{root / 'operator'}", "PATH": str(LINT_IMPORTS.parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for part in ("worker-image", "operator"):
        shutil.copytree(
            REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("worker-image/sluiceway/codec.py", "import redis", "The contract and the pure core import no I/O"),
        (
            "worker-image/sluiceway/worker.py",
            "from sluiceway import connection",
            "The worker engine is broker-blind",
        ),
        (
            "operator/sluiceway_operator/scaling.py",
            "from . import observe",
            "The operator's pure core imports no I/O",
        ),
        ("worker-image/sluiceway/fleet.py", "import sluiceway_operator", "never imports the operator"),
    ],
)
def test_a_forbidden_import_fails_the_lint(tree: Path, module: str, line: str, contract: str) -> None:
    assert _lint(tree).returncode == 0, "the copy of the tree keeps every contract"
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # forbidden\n")
    out = _lint(tree)
    assert out.returncode != 0
    assert f"{contract}" in out.stdout and "BROKEN" in out.stdout


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("sluiceway", ["redis", "sluiceway.worker", "prometheus_client", "pika", "confluent_kafka"]),
        ("sluiceway_operator.scaling", ["redis", "kopf", "prometheus_client", "sluiceway.worker"]),
    ],
)
def test_cheap_imports_load_no_broker_client_and_no_engine(module: str, absent: list[str]) -> None:
    code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
