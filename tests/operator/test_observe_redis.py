"""What the operator reads from a real Redis: delayed messages, and what a Redis fault may say."""

from __future__ import annotations

import pytest
import redis

from sluiceway.publish import Publisher
from sluiceway_operator.backlog.base import DELAYED_LEAD_SECONDS
from sluiceway_operator.backlog.redis import RedisSource
from sluiceway_operator.faults import AUTH, INVALID_URL, REFUSED, REJECTED, UNRESOLVED, redis_problem
from sluiceway_operator.observe import ObservationError, observation, read_queue
from sluiceway_operator.scaling import Policy, Reason, ScalingState, decide
from sluiceway_operator.spec import keys_for, parse_spec
from tests.support.redis_server import free_port

pytestmark = pytest.mark.redis

SPEC = parse_spec({"image": "img:1", "function": "tasks:f", "broker": {"type": "redis"}}, name="jobs")


async def test_a_message_delayed_an_hour_is_not_backlog_and_wakes_nothing(
    r: redis.Redis, redis_url: str
) -> None:
    # Issue 9 item 4: publish(delay=3600) woke pods from zero and held them for an hour of nothing.
    keys = keys_for("team", SPEC)
    pub = Publisher(redis_url, namespace="team")
    pub.publish("jobs", {"n": 1}, delay=3600)
    view = await read_queue(RedisSource(r, keys), r, keys, SPEC)
    assert view.backlog == 0
    d = decide(
        observation(view, now=1000.0, current=0, pods=0, ready=0), Policy.from_spec(SPEC), ScalingState()
    )
    assert (d.desired, d.reason) == (0, Reason.IDLE)

    # Shortly before it is due, it counts, so the fleet wakes in time for a pod to start.
    pub.publish("jobs", {"n": 2}, delay=DELAYED_LEAD_SECONDS / 3)
    view = await read_queue(RedisSource(r, keys), r, keys, SPEC)
    assert view.backlog == 1
    d = decide(
        observation(view, now=1000.0, current=0, pods=0, ready=0), Policy.from_spec(SPEC), ScalingState()
    )
    assert (d.desired, d.reason) == (1, Reason.WAKE)
    pub.publish("jobs", {"n": 3})
    assert (await read_queue(RedisSource(r, keys), r, keys, SPEC)).backlog == 2


async def test_an_unreachable_redis_is_reported_without_host_or_port() -> None:
    port = free_port()
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    keys = keys_for("team", SPEC)
    with pytest.raises(ObservationError) as err:
        await read_queue(RedisSource(client, keys), client, keys, SPEC)
    assert err.value.reason == "RedisUnreachable"
    assert err.value.message == f"coordination Redis: {REFUSED}"
    assert str(port) not in str(err.value) and "127.0.0.1" not in str(err.value)


def test_redis_problems_are_fixed_phrases(redis_url: str) -> None:
    def problem(url: str) -> str:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except Exception as exc:
            return redis_problem(exc)
        raise AssertionError(f"{url} answered")

    assert problem("redis://no-such-host.invalid:6379/0") == UNRESOLVED
    assert problem(f"redis://127.0.0.1:{free_port()}/0") == REFUSED
    # A password for a server that wants none is an error reply, not a leak of the password.
    host_port = redis_url.split("//", 1)[1].split("/", 1)[0]
    assert problem(f"redis://user:s3cret@{host_port}/0") in (AUTH, REJECTED)
    try:
        redis.Redis.from_url("redis://host:notaport/0")
    except ValueError as exc:
        assert redis_problem(exc) == INVALID_URL
