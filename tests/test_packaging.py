"""The wheel that both images install carries every file the code loads at run time."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_lua_scripts_and_rbac(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sluiceway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {p.name for p in (REPO / "worker-image" / "sluiceway" / "lua").glob("*.lua")}
    assert {f"sluiceway/lua/{n}" for n in lua} <= names
    assert "sluiceway_operator/rbac.yaml" in names
    assert {"sluiceway/py.typed", "sluiceway_operator/py.typed"} <= names
    assert not any(n.startswith(("tests/", "e2e/", "bench/")) for n in names)
