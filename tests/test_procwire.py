"""The reply a process-mode child sends its pod: pure, so examples and properties, no processes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway import procwire, result_record
from sluiceway.contract import CONCURRENCY_MODES, reply_key
from sluiceway.errors import Reject, RetryLater
from sluiceway.settings import SettingsError, WorkerSettings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_a_calls_value_crosses_the_pipe_unchanged(value: Any) -> None:
    got, error = procwire.parse_reply(procwire.ok_reply(value, keep_value=True))
    assert error is None and got == value


def test_a_value_nobody_asked_for_does_not_travel() -> None:
    assert procwire.parse_reply(procwire.ok_reply(object(), keep_value=False)) == (None, None)


@pytest.mark.parametrize("value", [object(), {1j}, [float("nan")], {"x": b"bytes"}])
def test_an_unencodable_value_reads_as_in_thread_mode(value: Any) -> None:
    key = reply_key("c", "m")
    got, error = procwire.parse_reply(procwire.ok_reply(value, keep_value=True))
    assert error is None
    if type(value) in (object, set):  # the value itself is what JSON refuses: same record
        assert result_record.success(key, got) == result_record.success(key, value)
    else:
        assert json.loads(result_record.success(key, got))["reason"] == "unserialisable_result"


@given(st.text(), st.sampled_from(["ValueError", "KeyError", "MyDomainError", "ü"]))
def test_an_exception_keeps_its_type_name_and_text(text: str, name: str) -> None:
    original = type(name, (Exception,), {})(text)
    _, error = procwire.parse_reply(procwire.error_reply(original))
    assert isinstance(error, procwire.ChildError)
    assert type(error).__name__ == name and str(error) == str(original)
    key = reply_key("c", "m")
    record = result_record.for_outcome(key, ok=False, value=None, reason="error", error=error, dead_entry=b"")
    assert record == result_record.for_outcome(
        key, ok=False, value=None, reason="error", error=original, dead_entry=b""
    )


def test_the_childs_traceback_comes_along() -> None:
    def fail() -> None:
        raise ValueError("deep")

    try:
        fail()
    except ValueError as exc:
        _, error = procwire.parse_reply(procwire.error_reply(exc))
    assert "in fail" in getattr(error, procwire.CHILD_TRACEBACK)


def test_reject_and_retry_later_keep_their_meaning() -> None:
    _, error = procwire.parse_reply(procwire.error_reply(Reject("poison")))
    assert isinstance(error, Reject) and str(error) == "poison"
    _, error = procwire.parse_reply(procwire.error_reply(RetryLater(2.5, "later")))
    assert isinstance(error, RetryLater) and error.delay == 2.5 and str(error) == "later"


@pytest.mark.parametrize("delay", [math.inf, math.nan, "soon", None, True])
def test_a_retry_delay_that_is_no_finite_number_gets_the_usual_backoff(delay: Any) -> None:
    _, error = procwire.parse_reply(procwire.error_reply(RetryLater(delay)))
    assert isinstance(error, RetryLater)
    # The worker backs off as usual for any delay that is not a finite number.
    assert not (isinstance(error.delay, int | float) and math.isfinite(error.delay))


def test_an_exception_whose_str_raises_still_makes_a_reply() -> None:
    class BadStrError(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    _, error = procwire.parse_reply(procwire.error_reply(BadStrError()))
    assert type(error).__name__ == "BadStrError" and "could not be shown" in str(error)


@pytest.mark.parametrize("raw", [b"[]", b'{"ok": 1}', b"not json", b'{"value": 1}'])
def test_a_malformed_reply_is_an_error_not_a_value(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        procwire.parse_reply(raw)


def test_the_modes_are_one_list_and_bad_ones_name_the_setting() -> None:
    assert "process" in CONCURRENCY_MODES
    for mode in CONCURRENCY_MODES:
        assert WorkerSettings(function="m:f", queue="q", concurrency_mode=mode).concurrency_mode == mode
    with pytest.raises(SettingsError, match="SLUICEWAY_CONCURRENCY_MODE"):
        WorkerSettings(function="m:f", queue="q", concurrency_mode="fork")
