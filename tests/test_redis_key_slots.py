"""Redis Cluster safety of the key scheme and of every Lua script, checked without a server.

A script may touch only keys it declares in KEYS (a cluster routes it by them, and refuses keys of
two slots with CROSSSLOT), and all keys one queue uses share the hash tag ``{namespace/queue}``,
so every script call of a queue lands in one slot. The real cluster runs are in
``tests/test_redis_cluster.py`` and the ``redis-cluster`` conformance run.
"""

from __future__ import annotations

import importlib
import re
from importlib import resources
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from sluiceway.contract import QUEUE_PATTERN, Keys

REPO = Path(__file__).resolve().parents[1]
# Commands that take no key: anything else called from Lua names its key first.
_KEYLESS = {"TIME"}
_CALL = re.compile(r"redis\.call\(\s*'([A-Za-z]+)'\s*(?:,\s*([^,)]+))?")

namespaces = st.text(min_size=1, max_size=63).filter(lambda s: "{" not in s and "}" not in s)
queues = st.from_regex(QUEUE_PATTERN, fullmatch=True)
ids = st.text(max_size=80)


def all_keys(keys: Keys, worker: str, schedule: str, wall: str) -> list[str]:
    return [
        *keys.all_static(),
        keys.prefix,
        keys.inflight(worker),
        keys.heartbeat(worker),
        keys.schedule_fire(schedule, wall),
    ]


@given(namespaces, queues, ids, ids, ids)
def test_every_key_of_a_queue_hashes_to_the_slot_of_its_tag(
    namespace: str, queue: str, worker: str, schedule: str, wall: str
) -> None:
    keys = Keys(namespace, queue)
    slot = key_slot(f"{namespace}/{queue}".encode())
    for key in all_keys(keys, worker, schedule, wall):
        assert key_slot(key.encode()) == slot, key


@given(namespaces, queues)
def test_the_hash_tag_is_a_substring_of_the_names_used_before_cluster_mode(
    namespace: str, queue: str
) -> None:
    # The names did not change for cluster mode: the tag was already in them, so queued messages,
    # leases, dead letters and schedule markers of an earlier version are found as they are.
    keys = Keys(namespace, queue)
    assert keys.ready == f"sluiceway:{{{namespace}/{queue}}}:queue"
    assert keys.inflight("w") == f"sluiceway:{{{namespace}/{queue}}}:inflight:w"
    assert keys.dead == f"sluiceway:{{{namespace}/{queue}}}:dlq"


def _lua_sources() -> dict[str, str]:
    """Every Lua script the project runs: the files, and each module-level string constant
    holding one in the worker and operator packages (so a new inline script is checked too)."""
    out = {
        f"lua/{p.name}": p.read_text()
        for p in resources.files("sluiceway").joinpath("lua").iterdir()
        if p.name.endswith(".lua")
    }
    for root, package in (
        (REPO / "worker-image" / "sluiceway", "sluiceway"),
        (REPO / "operator" / "sluiceway_operator", "sluiceway_operator"),
    ):
        for path in root.rglob("*.py"):
            if "redis.call(" not in path.read_text():
                continue
            rel = path.relative_to(root).with_suffix("")
            name = ".".join([package, *rel.parts]).removesuffix(".__init__")
            module = importlib.import_module(name)
            for attr, value in vars(module).items():
                if isinstance(value, str) and "redis.call(" in value:
                    out[f"{name}.{attr}"] = value
    return out


def test_every_script_touches_only_the_keys_it_declares() -> None:
    sources = _lua_sources()
    # The files and the inline scripts known today; the walk must find them all.
    assert {"lua/fetch.lua", "lua/reap.lua", "sluiceway.fleet._STATS_SCRIPT"} <= set(sources)
    assert "sluiceway.schedule._PUBLISH_ONCE" in sources
    assert "sluiceway_operator.backlog.redis._DUE_SCRIPT" in sources
    problems = []
    for name, text in sources.items():
        for command, first in _CALL.findall(text):
            if command.upper() in _KEYLESS:
                continue
            if not re.fullmatch(r"KEYS\[[A-Za-z0-9_]+\]", first.strip()):
                problems.append(f"{name}: {command} {first.strip()}")
    assert problems == [], "keys built inside Lua (a cluster cannot route them): " + "; ".join(problems)
