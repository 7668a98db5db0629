"""Fixtures shared by the end-to-end modules (the cluster itself comes from localcluster's plugin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localcluster.cluster import LocalCluster
from support import (
    Operator,
    install_crd,
    install_operator_rbac,
    redis_secret,
    retire_namespace,
    start_operator,
)


@pytest.fixture(scope="module")
def operator(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator as its own process, with the shipped least-privilege RBAC, one per test module."""
    install_crd(kube_cluster)
    namespace = kube_cluster.fresh_namespace("op")
    kubeconfig = install_operator_rbac(kube_cluster, namespace)
    op = start_operator(kubeconfig, namespace, tmp_path_factory.mktemp("operator") / "operator.log")
    yield op
    op.stop()


@pytest.fixture
def ns(kube_cluster: LocalCluster, redis_url: str) -> Iterator[str]:
    """A namespace with the default coordination Secret (users create it: see docs/operator.md).

    Whatever the test left running there is stopped before the next test starts.
    """
    name = kube_cluster.fresh_namespace("e2e")
    redis_secret(kube_cluster, name, redis_url)
    yield name
    retire_namespace(kube_cluster, name)
