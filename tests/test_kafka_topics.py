"""Kafka topic names from namespace and queue: injective even where Kafka sees '.' and '_' as one
character, within Kafka's 249-character limit, with errors that name the field. Pure."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway import contract
from sluiceway.transports import kafka_common as kc


def kafka_collides(a: str, b: str) -> bool:
    """Kafka refuses a topic whose name equals another's once '.' is read as '_'."""
    return a.replace(".", "_") == b.replace(".", "_")


def names(namespace: str, queue: str) -> list[str]:
    return [kc.topic(namespace, queue), kc.retry_topic(namespace, queue), kc.dead_topic(namespace, queue)]


def test_plain_names_are_unchanged() -> None:
    assert kc.topic("default", "thumbnails") == "sluiceway.default.thumbnails"
    assert kc.topic("team-a", "resize-2") == "sluiceway.team-a.resize-2"
    assert kc.retry_topic("default", "q") == "sluiceway.default.q.retry"
    assert kc.dead_topic("default", "q") == "sluiceway.default.q.dead"


def test_the_collisions_kafka_would_refuse_get_distinct_names() -> None:
    # "a.b" and "a_b" collide in Kafka; queue "x.retry" would be queue "x"'s retry topic.
    pairs = [("a.b", "a_b"), ("x.retry", "x"), ("x.dead", "x"), ("a..b", "a._b"), ("a_", "a.")]
    for q1, q2 in pairs:
        for n1, n2 in itertools.product(names("ns", q1), names("ns", q2)):
            assert not kafka_collides(n1, n2), (q1, q2, n1, n2)
    assert kc.topic("ns", "a.b") == "sluiceway.ns.a..b"
    assert kc.topic("ns", "a_b") == "sluiceway.ns.a.-b"


def test_a_bad_namespace_is_an_error_naming_it() -> None:
    for bad in ("", "Default", "a.b", "a_b", "-a", "a" * 64):
        with pytest.raises(ValueError, match="namespace"):
            kc.topic(bad, "q")


def test_a_bad_queue_is_an_error_naming_it() -> None:
    for bad in ("", ".q", "q/x", "q q"):
        with pytest.raises(ValueError, match="queue"):
            kc.topic("ns", bad)


def test_the_length_limit_names_the_queue_field_and_counts_the_retry_suffix() -> None:
    ns = "n" * 63
    room = kc.MAX_TOPIC_NAME - len(f"sluiceway.{ns}.") - len(kc.RETRY_SUFFIX)
    assert len(kc.retry_topic(ns, "q" * room)) == kc.MAX_TOPIC_NAME
    with pytest.raises(ValueError, match=r"spec\.broker\.queue.*249"):
        kc.topic(ns, "q" * (room + 1))
    with pytest.raises(ValueError, match="count twice"):  # '.' costs two characters
        kc.topic(ns, "q" * (room - 1) + ".")


namespaces = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?\Z")
# Queues from the contract's alphabet, weighted towards the characters that matter here.
queue_chars = st.sampled_from("ab.-_rtyde0")
queues = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("ax0"),
    st.text(queue_chars, max_size=12) | st.sampled_from([".retry", ".dead", "_retry", "..", "._", ".-"]),
).filter(lambda q: bool(contract.QUEUE_RE.match(q)))


@given(namespaces, queues)
def test_every_name_decodes_back_to_its_one_taskqueue(namespace: str, queue: str) -> None:
    for kind, name in zip(("work", "retry", "dead"), names(namespace, queue), strict=True):
        assert kc.parse_topic(name) == (namespace, queue, kind)
        assert len(name) <= kc.MAX_TOPIC_NAME


@given(namespaces, queues, namespaces, queues)
def test_two_taskqueues_never_get_colliding_topics(ns1: str, q1: str, ns2: str, q2: str) -> None:
    if (ns1, q1) == (ns2, q2):
        return
    for n1, n2 in itertools.product(names(ns1, q1), names(ns2, q2)):
        assert not kafka_collides(n1, n2), (ns1, q1, ns2, q2, n1, n2)
