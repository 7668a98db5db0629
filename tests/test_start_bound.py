"""The fleet QPS bound the docs state is the one every test and benchmark checks against."""

from __future__ import annotations

import re
from pathlib import Path

from sluiceway.settings import WorkerSettings
from tests.support.starts import start_bound

ROOT = Path(__file__).resolve().parent.parent


def test_the_documented_examples_are_the_bound_the_tests_check() -> None:
    text = (ROOT / "docs" / "worker.md").read_text()
    line = text[text.index("task starts never exceed") :][:200]
    examples = re.findall(r"(\d+) at (\d+) QPS", line)
    assert len(examples) == 3, line
    for bound, qps in examples:
        assert start_bound(float(qps)) == int(bound), f"docs/worker.md says {bound} at {qps} QPS"


def test_the_bound_follows_the_workers_own_slot_tolerance() -> None:
    tolerance = WorkerSettings(function="m:f", queue="q").qps_slot_tolerance
    assert start_bound(1000, slot_tolerance=tolerance) == start_bound(1000)
    assert start_bound(1000, slot_tolerance=2 * tolerance) > start_bound(1000)
