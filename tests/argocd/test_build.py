"""The wrapper module that builds Argo CD: replace directives carried over from its go.mod."""

from __future__ import annotations

import pytest

from localcluster.argocd import ArgoCDUnavailableError, module_replaces, wrapper_gomod

GOMOD = """module github.com/argoproj/argo-cd/v3

go 1.25.5

require (
\tk8s.io/api v0.34.0
)

replace github.com/golang/protobuf => github.com/golang/protobuf v1.5.4

replace (
\t// Avoid CVE-2022-3064
\tgopkg.in/yaml.v2 => gopkg.in/yaml.v2 v2.4.0

\tk8s.io/api => k8s.io/api v0.34.0 // pinned with the rest
)
"""


def test_replaces_in_blocks_and_single_lines_are_carried_over_without_comments() -> None:
    assert module_replaces(GOMOD) == [
        "github.com/golang/protobuf => github.com/golang/protobuf v1.5.4",
        "gopkg.in/yaml.v2 => gopkg.in/yaml.v2 v2.4.0",
        "k8s.io/api => k8s.io/api v0.34.0",
    ]


def test_the_wrapper_requires_the_version_and_repeats_the_go_directive() -> None:
    text = wrapper_gomod(GOMOD, "3.2.11")
    assert "go 1.25.5" in text
    assert "require github.com/argoproj/argo-cd/v3 v3.2.11" in text
    assert "\tk8s.io/api => k8s.io/api v0.34.0" in text


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("replace github.com/argoproj/gitops-engine => ./gitops-engine", "local path ./gitops-engine"),
        ("replace example.com/x => example.com/y", "without a version"),
    ],
)
def test_replaces_a_wrapper_cannot_follow_are_refused_by_name(line: str, fragment: str) -> None:
    with pytest.raises(ArgoCDUnavailableError, match=fragment):
        module_replaces(GOMOD + line + "\n")
