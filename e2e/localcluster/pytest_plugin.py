"""pytest plugin: a session-wide local control plane.

Register it with ``pytest_plugins = ["localcluster.pytest_plugin"]`` (the root conftest does) or
``-p localcluster.pytest_plugin``. Tests that use :func:`kube_cluster` should be marked
``@pytest.mark.cluster``.

If the binaries are missing and cannot be built, the fixture fails with the reason: CI must never
pass by skipping the cluster tests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest

from .binaries import BinariesUnavailableError, ensure_binaries
from .cluster import LocalCluster
from .procs import ClusterError

__all__ = ["kube_cluster", "kube_namespace"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local Kubernetes control plane (e2e/)")
    # A plain SIGTERM (CI cancelling, `timeout`) would kill pytest without running fixture
    # teardown and orphan etcd, the apiserver and pods; turn it into an orderly interrupt.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def on_term(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[LocalCluster]:
    """etcd + kube-apiserver + kube-controller-manager + the test kubelet, for the whole session."""
    try:
        binaries = ensure_binaries()
    except BinariesUnavailableError as exc:
        pytest.fail(f"local Kubernetes control plane unavailable: {exc}", pytrace=False)
    try:
        cluster = LocalCluster.start(binaries=binaries)
    except ClusterError as exc:
        pytest.fail(f"local Kubernetes control plane failed to start: {exc}", pytrace=False)
    # Backstop for exits that skip fixture teardown (os._exit excepted, nothing catches that;
    # the next run's sweep of stale run directories handles it).
    atexit.register(cluster.stop)
    try:
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)
        if os.environ.get("SLUICEWAY_KEEP_CLUSTER_LOGS"):
            print(f"\n[localcluster] logs kept in {cluster.run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(cluster.run_dir, ignore_errors=True)


@pytest.fixture
def kube_namespace(kube_cluster: LocalCluster) -> str:
    """A new namespace for one test, ready for pods."""
    return kube_cluster.fresh_namespace()
