"""The wheel that both images install carries every file the code loads at run time."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_build_backend_of_the_dev_venv_is_the_one_the_images_build_with() -> None:
    # The wheel test below builds without isolation, so it is only as true as this agreement.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    assert set(pyproject["build-system"]["requires"]) <= set(dev)


def test_wheel_carries_lua_scripts_and_rbac(tmp_path: Path) -> None:
    # The same backend as the images' `pip wheel`, from this venv (the test above keeps the two
    # in step): an isolated build would first install setuptools into a fresh venv.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "--wheel-dir", str(tmp_path), str(REPO)],
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
