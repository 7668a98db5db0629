"""A fast oracle for deploy/argocd/health.lua: the script in Lua 5.1 through lupa, sandboxed like Argo CD.

Argo CD runs health scripts in gopher-lua (Lua 5.1) with only the base, table, package and a "safe"
os library opened, so ``string``, ``math`` and ``io`` are absent here too: a script that uses them
fails in this oracle as it would in Argo CD. This is an extra, quick check; the golden cases are
evaluated by Argo CD's own code (e2e/test_argocd_health.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lupa import lua51

HEALTH_LUA = Path(__file__).resolve().parents[2] / "deploy" / "argocd" / "health.lua"


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        table = runtime.table()
        for k, v in value.items():
            table[k] = _to_lua(runtime, v)
        return table
    if isinstance(value, list | tuple):
        table = runtime.table()
        for i, v in enumerate(value, start=1):
            table[i] = _to_lua(runtime, v)
        return table
    return value


def evaluate(obj: Mapping[str, Any], script: str | None = None) -> tuple[str, str]:
    """(status, message) of the health script for ``obj``."""
    runtime = lua51.LuaRuntime(register_eval=False, register_builtins=False)
    g = runtime.globals()
    for lib in ("string", "math", "io", "debug", "os", "coroutine"):
        g[lib] = None
    g.obj = _to_lua(runtime, obj)
    body = script if script is not None else HEALTH_LUA.read_text()
    result = runtime.execute(body)
    return str(result["status"]), str(result["message"] or "")
