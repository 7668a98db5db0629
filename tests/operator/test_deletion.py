"""The pure deletion and shared-queue rules (``sluiceway_operator.deletion``) and the spec field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluiceway_operator.deletion import (
    DeletionPlan,
    QueueCounts,
    QueueUser,
    conflict_owner,
    deletion_message,
    deletion_plan,
    queue_users,
    sharing,
)
from sluiceway_operator.spec import DeletionPolicy, SpecError, parse_spec

BASE: dict[str, Any] = {"image": "i", "function": "m:f", "broker": {"type": "redis"}}


def tq(name: str, created: str, queue: str | None = None, **spec: Any) -> dict[str, Any]:
    broker = {"type": "redis", **({"queue": queue} if queue else {})}
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {**BASE, "broker": broker, **spec},
    }


def test_deletion_policy_defaults_to_retain_and_names_the_field_when_wrong() -> None:
    assert parse_spec(BASE, name="a").deletion_policy is DeletionPolicy.RETAIN
    assert parse_spec({**BASE, "deletionPolicy": "Purge"}, name="a").deletion_policy is DeletionPolicy.PURGE
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "deletionPolicy": "Delete"}, name="a")
    assert err.value.field == "spec.deletionPolicy"


def test_queue_users_resolve_the_queue_and_sort_oldest_first() -> None:
    users = queue_users(
        [
            tq("b", "2026-01-02T00:00:00Z", "shared"),
            tq("a", "2026-01-03T00:00:00Z"),
            # An invalid spec still counts, under the queue it names: it may have workers.
            {
                "metadata": {"name": "c", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"broker": {"queue": "shared"}},
            },
        ]
    )
    assert [(u.name, u.queue) for u in users] == [("c", "shared"), ("b", "shared"), ("a", "a")]


def test_the_oldest_user_owns_the_queue() -> None:
    users = queue_users([tq("first", "2026-01-01T00:00:00Z", "q"), tq("second", "2026-01-02T00:00:00Z", "q")])
    assert conflict_owner("first", "q", users) is None
    assert conflict_owner("second", "q", users) == "first"
    assert sharing("first", "q", users) == ("second",)
    assert sharing("second", "q", users) == ("first",)
    assert conflict_owner("other", "elsewhere", users) is None


def test_a_queue_named_like_another_taskqueue_is_shared() -> None:
    # TaskQueue "b" defaults its queue to "b"; TaskQueue "a" names queue "b" explicitly.
    users = queue_users([tq("b", "2026-01-01T00:00:00Z"), tq("a", "2026-01-02T00:00:00Z", "b")])
    assert conflict_owner("a", "b", users) == "b"


@pytest.mark.parametrize(
    ("policy", "shared", "purge"),
    [
        (DeletionPolicy.RETAIN, (), False),
        (DeletionPolicy.PURGE, (), True),
        (DeletionPolicy.RETAIN, ("x",), False),
        (DeletionPolicy.PURGE, ("x",), False),
    ],
)
def test_deletion_plan(policy: DeletionPolicy, shared: tuple[str, ...], purge: bool) -> None:
    assert deletion_plan(policy, shared).purge is purge


@given(st.sampled_from(DeletionPolicy), st.lists(st.text(min_size=1), max_size=3))
def test_a_shared_queue_is_never_purged(policy: DeletionPolicy, shared: list[str]) -> None:
    plan = deletion_plan(policy, shared)
    assert plan.purge == (policy is DeletionPolicy.PURGE and not shared)


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 9), st.sampled_from(["q", "r"])),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[0],
    )
)
def test_exactly_one_owner_per_queue(rows: list[tuple[str, int, str]]) -> None:
    users = [QueueUser(created=f"2026-01-0{d}T00:00:00Z", name=n, queue=q) for n, d, q in rows]
    for queue in {u.queue for u in users}:
        owners = [u.name for u in users if u.queue == queue and conflict_owner(u.name, queue, users) is None]
        assert len(owners) == 1


def test_messages_say_what_was_kept_or_purged_with_counts() -> None:
    counts = QueueCounts(ready=1000, delayed=2, in_flight=3, dead=4)
    kept = deletion_message(deletion_plan(DeletionPolicy.RETAIN, ()), "q", counts)
    assert (
        "Kept queue 'q' (deletionPolicy Retain): 1000 ready, 2 delayed, 3 in flight, 4 dead-lettered" in kept
    )
    purged = deletion_message(deletion_plan(DeletionPolicy.PURGE, ()), "q", counts, removed_keys=7)
    assert (
        purged.startswith("Purged queue 'q' (deletionPolicy Purge): 1000 ready")
        and "7 keys deleted" in purged
    )
    shared = deletion_message(deletion_plan(DeletionPolicy.PURGE, ("other",)), "q", counts)
    assert "TaskQueue other still uses it, so deletionPolicy Purge was not applied" in shared
    unknown = deletion_message(
        DeletionPlan(purge=False, policy=DeletionPolicy.RETAIN, shared_with=()), "q", None
    )
    assert "counts unknown" in unknown
