"""The operator's flags and the test-cluster worker port option."""

from __future__ import annotations

import pytest

from sluiceway_operator.manifests import OperatorSettings, worker_deployment
from sluiceway_operator.settings import parse_args
from sluiceway_operator.spec import SecretKeyRef, parse_spec

SPEC = {"image": "w:1", "function": "m:f", "broker": {"type": "redis"}}
META = {"name": "q", "namespace": "n", "uid": "u"}


def test_defaults_watch_all_namespaces_with_the_documented_secret() -> None:
    c = parse_args([])
    assert c.namespaces == ()
    assert c.default_secret == SecretKeyRef("sluiceway-redis", "url")
    assert c.operator_settings().metrics_port == 9464


def test_flags() -> None:
    c = parse_args(
        ["-n", "a", "-n", "b", "--default-redis-secret", "redis:uri", "--worker-metrics-port", "0"]
    )
    assert c.namespaces == ("a", "b")
    assert c.default_secret == SecretKeyRef("redis", "uri")
    assert parse_args(["--default-redis-secret", ""]).default_secret is None


def test_worker_metrics_port_zero_drops_the_port_and_probe_but_the_default_keeps_them() -> None:
    spec = parse_spec(SPEC, name="q")
    ref = SecretKeyRef("s", "url")
    prod = worker_deployment(META, spec, 1, OperatorSettings(default_coordination_secret=ref))
    c = prod["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz" and c["ports"][0]["containerPort"] == 9464
    test = worker_deployment(META, spec, 1, OperatorSettings(default_coordination_secret=ref, metrics_port=0))
    c = test["spec"]["template"]["spec"]["containers"][0]
    assert "readinessProbe" not in c and "ports" not in c
    assert {"name": "SLUICEWAY_METRICS_PORT", "value": "0"} in c["env"]


def test_secret_refresh_interval_defaults_to_60_s_and_rejects_zero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SLUICEWAY_OPERATOR_SECRET_REFRESH_INTERVAL", raising=False)
    assert parse_args([]).secret_refresh_interval == 60.0
    assert parse_args(["--secret-refresh-interval", "2"]).secret_refresh_interval == 2.0
    monkeypatch.setenv("SLUICEWAY_OPERATOR_SECRET_REFRESH_INTERVAL", "5")
    assert parse_args([]).secret_refresh_interval == 5.0
    with pytest.raises(SystemExit) as exited:
        parse_args(["--secret-refresh-interval", "0"])
    assert exited.value.code == 2
    assert "--secret-refresh-interval must be > 0" in capsys.readouterr().err


def test_no_live_workers_grace_defaults_to_30_s_and_rejects_a_negative(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SLUICEWAY_OPERATOR_NO_LIVE_WORKERS_GRACE", raising=False)
    assert parse_args([]).no_live_workers_grace == 30.0
    assert parse_args(["--no-live-workers-grace", "5"]).no_live_workers_grace == 5.0
    monkeypatch.setenv("SLUICEWAY_OPERATOR_NO_LIVE_WORKERS_GRACE", "12")
    assert parse_args([]).no_live_workers_grace == 12.0
    with pytest.raises(SystemExit) as exited:
        parse_args(["--no-live-workers-grace", "-1"])
    assert exited.value.code == 2
    assert "--no-live-workers-grace must be >= 0" in capsys.readouterr().err
