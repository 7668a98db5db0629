"""One owner per validation rule: the CRD's CEL rules, the operator and the worker say the same.

The patterns live in ``sluiceway.contract`` (function, queue, lease vs heartbeat) and in
``sluiceway_operator.cron`` (the cron expression); the CRD embeds them verbatim, the operator's spec
reader and the worker's settings use the same objects. ``e2e/test_schedules.py`` sends the same
examples through the real API server's admission.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway import contract
from sluiceway import settings as worker_settings
from sluiceway_operator import cron, spec

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "taskqueue.yaml"


def crd_spec() -> Mapping[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    (version,) = crd["spec"]["versions"]
    props: Mapping[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return props


def rules(node: Mapping[str, Any]) -> list[str]:
    return [str(v["rule"]) for v in node.get("x-kubernetes-validations", [])]


def matches_rule(pattern: str) -> str:
    return f"self.matches('{pattern}')"


def test_the_crd_embeds_the_contract_patterns() -> None:
    s = crd_spec()["properties"]
    assert matches_rule(contract.FUNCTION_PATTERN) in rules(s["function"])
    assert matches_rule(contract.QUEUE_PATTERN) in rules(s["broker"]["properties"]["queue"])
    assert s["broker"]["properties"]["queue"]["maxLength"] == 200  # what {0,199} in the pattern says
    item = s["schedules"]["items"]["properties"]
    assert matches_rule(cron.CRON_PATTERN) in rules(item["cron"]), (
        "regenerate the cron rule in crds/taskqueue.yaml from sluiceway_operator.cron.CRON_PATTERN"
    )


def test_the_lease_rule_uses_the_contract_factor() -> None:
    (rule,) = [r for r in rules(crd_spec()["properties"]["liveness"]) if "leaseSeconds" in r]
    assert f"self.leaseSeconds >= {float(contract.MIN_LEASE_HEARTBEATS)} * self.heartbeatSeconds" in rule


def test_operator_and_worker_share_one_definition() -> None:
    assert spec.FUNCTION_RE is contract.FUNCTION_RE is worker_settings.FUNCTION_REF
    assert spec.QUEUE_RE is contract.QUEUE_RE is worker_settings.QUEUE_NAME


@pytest.mark.parametrize(
    ("function", "ok"),
    [
        ("thumbs.tasks:make", True),
        ("a:b", True),
        ("_p.q_1:_f", True),
        ("a..b:c", False),  # the worker once accepted this, the CRD never did
        ("a.:c", False),
        ("no_colon", False),
        ("a:b.c", False),
        ("é:f", False),
    ],
)
def test_function_verdicts_agree(function: str, ok: bool) -> None:
    def operator_ok() -> bool:
        try:
            spec.parse_spec({"image": "i", "function": function, "broker": {"type": "redis"}}, name="x")
        except spec.SpecError:
            return False
        return True

    def worker_ok() -> bool:
        try:
            worker_settings.WorkerSettings(function=function, queue="q")
        except worker_settings.SettingsError:
            return False
        return True

    # RE2 (the API server) and Python's re agree on this pattern: no backslashes, no look-arounds.
    assert bool(re.match(contract.FUNCTION_PATTERN, function)) is ok
    assert operator_ok() is ok and worker_ok() is ok


@pytest.mark.parametrize(("lease", "heartbeat"), [(4.0, 2.0), (3.9, 2.0), (15.0, 2.0), (1.0, 0.6)])
def test_lease_verdicts_agree(lease: float, heartbeat: float) -> None:
    ok = lease >= contract.MIN_LEASE_HEARTBEATS * heartbeat
    raw = {"image": "i", "function": "m:f", "broker": {"type": "redis"}}
    try:
        spec.parse_spec({**raw, "liveness": {"leaseSeconds": lease, "heartbeatSeconds": heartbeat}}, name="x")
        operator_ok = True
    except spec.SpecError:
        operator_ok = False
    try:
        worker_settings.WorkerSettings(
            function="m:f", queue="q", lease_seconds=lease, heartbeat_seconds=heartbeat
        )
        worker_ok = True
    except worker_settings.SettingsError:
        worker_ok = False
    assert operator_ok is ok and worker_ok is ok


# --- Cron: what admission lets through, the parser accepts (but for two documented cases) -------

NUMBERS = ["0", "00", "1", "5", "7", "8", "12", "13", "23", "24", "29", "30", "31", "32", "59", "60", "61"]
TOKENS = st.sampled_from(
    [*NUMBERS, "*", "jan", "DEC", "sun", "Mon", "sat", "foo", "-", ",", "/", "/0", "/2", "/15", "?", "L", "#"]
)
FIELDS = st.lists(TOKENS, min_size=1, max_size=4).map("".join)
EXPRESSIONS = st.one_of(
    st.lists(FIELDS, min_size=5, max_size=5).map(" ".join),
    st.lists(FIELDS, min_size=3, max_size=7).map(" ".join),
    st.lists(FIELDS, min_size=5, max_size=5).map("\t".join),
)
# The parser's verdicts that a regular expression cannot reach: the operator marks that schedule.
PARSER_ONLY = ("runs backwards", "never fires")


def parser_verdict(expr: str) -> str | None:
    try:
        cron.parse(expr, "UTC")
    except cron.CronError as exc:
        return str(exc)
    return None


@given(EXPRESSIONS)
@settings(max_examples=3000, deadline=None)
def test_admission_and_parser_agree_on_cron(expr: str) -> None:
    admitted = re.match(cron.CRON_PATTERN, expr) is not None
    problem = parser_verdict(expr)
    if not admitted:
        assert problem is not None, f"{expr!r}: rejected at admission, accepted by the parser"
    elif problem is not None:
        assert any(p in problem for p in PARSER_ONLY), f"{expr!r}: admitted, then {problem}"


@pytest.mark.parametrize(
    ("expr", "admitted"),
    [
        ("* * * * *", True),
        ("0 3 * * *", True),
        ("*/5 0-6,22-23 1,15 jan-jun mon-fri", True),
        ("00 03 * * MON", True),
        ("0 0 * * 7", True),
        ("5/15 * * * *", True),
        ("0 0 30 2 *", True),  # a date that never exists: only its schedule is marked
        ("5-1 * * * *", True),  # backwards: likewise
        ("61 25 * * *", False),
        ("* 24 * * *", False),
        ("* * 0 * *", False),
        ("* * * 13 *", False),
        ("* * * * 8", False),
        ("*/0 * * * *", False),
        ("* * * *", False),
        ("@hourly", False),
        ("0 0 ? * *", False),
        (" * * * * *", False),
    ],
)
def test_cron_examples(expr: str, admitted: bool) -> None:
    assert (re.match(cron.CRON_PATTERN, expr) is not None) is admitted
    if not admitted:
        assert parser_verdict(expr) is not None


def test_no_second_cron_or_zone_parser_in_the_spec_reader() -> None:
    # One owner: the spec reader hands cron and zone to cron.parse untouched.
    assert not hasattr(spec, "cron_problem") and not hasattr(spec, "TIME_ZONE_RE")


def test_the_concurrency_modes_agree() -> None:
    mode = crd_spec()["properties"]["concurrency"]["properties"]["mode"]
    assert tuple(mode["enum"]) == contract.CONCURRENCY_MODES == tuple(spec.ConcurrencyMode)
    (worker_default,) = [
        f.default for f in dataclasses.fields(worker_settings.WorkerSettings) if f.name == "concurrency_mode"
    ]
    assert mode["default"] == spec.DEFAULTS["concurrency"]["mode"] == worker_default
