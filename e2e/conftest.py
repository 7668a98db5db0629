"""Fixtures shared by the end-to-end modules (the cluster itself comes from localcluster's plugin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localcluster.cluster import LocalCluster
from support import (
    Operator,
    module_operator,
    redis_secret,
    retire_namespace,
)


@pytest.fixture(scope="module")
def operator(kube_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator as its own process, with the shipped least-privilege RBAC, one per test module."""
    with module_operator(kube_cluster, tmp_path_factory.mktemp("operator")) as op:
        yield op


@pytest.fixture
def ns(kube_cluster: LocalCluster, redis_url: str) -> Iterator[str]:
    """A namespace with the default coordination Secret (users create it: see docs/operator.md).

    Whatever the test left running there is stopped before the next test starts.
    """
    name = kube_cluster.fresh_namespace("e2e")
    redis_secret(kube_cluster, name, redis_url)
    yield name
    retire_namespace(kube_cluster, name)
