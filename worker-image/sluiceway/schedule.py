"""Publish one scheduled message exactly once per scheduled time.

The operator calls ``publish_once`` for each fire of a ``spec.schedules[]`` entry. A restarted
operator, a retry after a lost reply, or a second operator process may publish the same scheduled
time again; the dedupe key (the schedule and its scheduled wall time) makes that a no-op. Recording
the fire and pushing the message happen in one Lua script, so there is no moment where one is done
and the other is not.

This function is the whole seam: a broker other than Redis plugs in here with its own atomic
"record, then push" (today the operator reports any other broker on the schedule).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Final

import redis as redis_lib

from sluiceway import codec
from sluiceway.contract import Keys

# Any fixed UUID works: it only separates our name-based ids from other uuid5 users.
_ID_NAMESPACE: Final = uuid.UUID("5c1e7a9b-3d2f-4b8e-9a61-0f4c2d7e8b13")

_PUBLISH_ONCE: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('LPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def fire_id(namespace: str, taskqueue: str, schedule: str, wall: str) -> str:
    """The message id of one scheduled time: the same on every retry, so duplicates are traceable."""
    return uuid.uuid5(_ID_NAMESPACE, f"{namespace}/{taskqueue}/{schedule}/{wall}").hex


def payload(
    message: Mapping[str, Any],
    *,
    namespace: str,
    taskqueue: str,
    schedule: str,
    wall: str,
    fire_epoch: float,
) -> bytes:
    meta = codec.Meta(
        id=fire_id(namespace, taskqueue, schedule, wall),
        published_at=float(fire_epoch),  # the scheduled time, not the (maybe late) moment of the push
        trace=f"schedule/{schedule}",
    )
    return codec.encode(dict(message), meta)


def publish_once(
    client: redis_lib.Redis,
    keys: Keys,
    *,
    taskqueue: str,
    schedule: str,
    wall: str,
    fire_epoch: float,
    message: Mapping[str, Any],
    ttl_seconds: int,
) -> bool:
    """LPUSH the scheduled message unless this scheduled wall time was already published.

    ``wall`` is the scheduled wall time (the dedupe key), ``fire_epoch`` the same moment in unix
    seconds (the message's timestamp). Returns True if this call published it. ``ttl_seconds`` must
    outlast every retry of the same scheduled time (the operator's starting deadline plus clock skew).
    """
    body = payload(
        message,
        namespace=keys.namespace,
        taskqueue=taskqueue,
        schedule=schedule,
        wall=wall,
        fire_epoch=fire_epoch,
    )
    done = client.eval(
        _PUBLISH_ONCE, 2, keys.schedule_fire(schedule, wall), keys.ready, body, max(1, ttl_seconds)
    )
    return bool(done)
