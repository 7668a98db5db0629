"""``spec.schedules[]`` in the TaskQueue loop: publish due scheduled messages, explain in status.

Called once per tick, before the queue is observed, so a scheduled message is part of the backlog
that the same tick's scaling decision sees (a fleet at zero wakes at once).

Exactly once: ``cron.due_fires`` picks at most one scheduled time per tick and never one at or
before the cursor; ``sluiceway.schedule.publish_once`` makes the push itself idempotent per
scheduled time in Redis, which covers what memory cannot: a restart between the push and the status
write, or two operator processes.

Where the cursor comes from: this loop's memory; after a restart, the status this loop wrote
(``lastFireTime``, and ``nextFireTime``, since every time before it was dealt with); for a schedule
never seen, the TaskQueue's creation if the spec is still at generation 1 (the schedule was there
from the start), else the moment it is first seen (a schedule added later does not fire for times
before it existed).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from sluiceway import schedule as publishing
from sluiceway.contract import Keys

from . import cron, events
from .conditions import rfc3339
from .faults import redis_problem
from .kube import Kube
from .spec import BrokerType, Schedule, TaskQueueSpec

log = structlog.get_logger("sluiceway_operator")

FIRED = "ScheduleFired"
FAILED = "ScheduleFailed"
MISSED = "ScheduleMissed"
# A dedupe key must outlive every retry of its scheduled time: the deadline plus clock skew between
# operator processes.
DEDUPE_TTL_SECONDS = int(cron.STARTING_DEADLINE.total_seconds()) + 3600
_EPSILON = dt.timedelta(microseconds=1)


@dataclass
class _State:
    cursor: dt.datetime | None = None  # every scheduled time up to here is published or skipped
    last_fire: dt.datetime | None = None
    error: str | None = None  # the last error reported, so one fault is one Event


@dataclass
class Schedules:
    namespace: str
    name: str
    kube: Kube
    states: dict[str, _State] = field(default_factory=dict)

    async def tick(
        self,
        meta: Mapping[str, Any],
        spec: TaskQueueSpec,
        client: redis.Redis,
        keys: Keys,
        *,
        now: float,
        old_status: Mapping[str, Any],
    ) -> list[dict[str, Any]]:
        """Publish what is due; return ``status.schedules``."""
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        recorded = {s.get("name"): s for s in old_status.get("schedules") or [] if isinstance(s, Mapping)}
        names = {s.name for s in spec.schedules}
        for gone in set(self.states) - names:
            del self.states[gone]
        out: list[dict[str, Any]] = []
        for sched in spec.schedules:
            state = self.states.setdefault(sched.name, _State())
            entry = await self._one(
                meta, spec, sched, state, recorded.get(sched.name) or {}, client, keys, moment
            )
            out.append(entry)
        return out

    async def _one(
        self,
        meta: Mapping[str, Any],
        spec: TaskQueueSpec,
        sched: Schedule,
        state: _State,
        recorded: Mapping[str, Any],
        client: redis.Redis,
        keys: Keys,
        now: dt.datetime,
    ) -> dict[str, Any]:
        if state.last_fire is None:
            state.last_fire = _time(recorded.get("lastFireTime"))
        entry: dict[str, Any] = {"name": sched.name}
        try:
            parsed = cron.parse(sched.cron, sched.time_zone)
        except cron.CronError as exc:
            return await self._failed(meta, sched, state, entry, str(exc))
        if state.cursor is None:
            state.cursor = _restored_cursor(recorded, state.last_fire, meta, now)
        error: str | None = None
        if sched.suspend:
            state.cursor = now  # suspended times are not published later either
        elif spec.broker.type is not BrokerType.REDIS:
            error = f"schedules publish to redis brokers only, not {spec.broker.type}"
            state.cursor = now
        else:
            plan = cron.due_fires(parsed, state.cursor, created=state.cursor, now=now)
            error = await self._publish(meta, sched, state, plan, client, keys, now)
        nxt = cron.next_fire(parsed, now)
        if state.last_fire is not None:
            entry["lastFireTime"] = rfc3339(state.last_fire.timestamp())
        if nxt is not None:
            entry["nextFireTime"] = rfc3339(nxt.timestamp())
        if error is not None:
            return await self._failed(meta, sched, state, entry, error)
        state.error = None
        return entry

    async def _publish(
        self,
        meta: Mapping[str, Any],
        sched: Schedule,
        state: _State,
        plan: cron.FirePlan,
        client: redis.Redis,
        keys: Keys,
        now: dt.datetime,
    ) -> str | None:
        skipped = f"; skipped {plan.skipped} missed scheduled time(s)" if plan.skipped else ""
        if plan.fire is None:
            state.cursor = plan.cursor
            if plan.skipped:
                message = (
                    f"Schedule {sched.name}: {plan.skipped} scheduled time(s) missed while the operator "
                    f"was not running, the latest more than {_deadline()} ago: not published"
                )
                log.warning(
                    "schedule missed", namespace=self.namespace, taskqueue=self.name, schedule=sched.name
                )
                await events.post(self.kube, meta, "Warning", MISSED, message)
            return None
        epoch = int(plan.fire.timestamp())
        try:
            published = await asyncio.to_thread(
                publishing.publish_once,
                client,
                keys,
                taskqueue=self.name,
                schedule=sched.name,
                fire_epoch=epoch,
                message=sched.message,
                ttl_seconds=DEDUPE_TTL_SECONDS,
            )
        except (redis.RedisError, TypeError, ValueError) as exc:
            # The cursor stays: the next tick tries this scheduled time again, inside its deadline.
            # A Redis error's text names the Secret's host and port: a class only (faults.py).
            why = redis_problem(exc) if isinstance(exc, redis.RedisError) else f"{type(exc).__name__}: {exc}"
            return f"publish of {rfc3339(epoch)} failed: {why}"
        state.cursor = plan.cursor
        state.last_fire = plan.fire
        when = rfc3339(epoch)
        late = (now - plan.fire).total_seconds()
        if published:
            log.info(
                "schedule fired",
                namespace=self.namespace,
                taskqueue=self.name,
                schedule=sched.name,
                fire=when,
                late=round(late, 1),
                skipped=plan.skipped,
            )
            await events.post(
                self.kube,
                meta,
                "Normal",
                FIRED,
                f"Schedule {sched.name} published its {when} message ({late:.0f} s late){skipped}",
            )
        else:
            # Another operator process (or this one before a restart) already published it.
            log.info(
                "schedule already fired",
                namespace=self.namespace,
                taskqueue=self.name,
                schedule=sched.name,
                fire=when,
            )
        return None

    async def _failed(
        self, meta: Mapping[str, Any], sched: Schedule, state: _State, entry: dict[str, Any], error: str
    ) -> dict[str, Any]:
        entry["lastError"] = error
        if state.error != error:
            state.error = error
            log.warning(
                "schedule failed",
                namespace=self.namespace,
                taskqueue=self.name,
                schedule=sched.name,
                error=error,
            )
            await events.post(self.kube, meta, "Warning", FAILED, f"Schedule {sched.name}: {error}")
        return entry


def _restored_cursor(
    recorded: Mapping[str, Any], last_fire: dt.datetime | None, meta: Mapping[str, Any], now: dt.datetime
) -> dt.datetime:
    candidates: list[dt.datetime] = []
    if last_fire is not None:
        candidates.append(last_fire)
    upcoming = _time(recorded.get("nextFireTime"))
    if upcoming is not None:
        candidates.append(upcoming - _EPSILON)  # every time before it was dealt with
    if candidates:
        return max(candidates)
    created = _time(meta.get("creationTimestamp"))
    if created is not None and int(meta.get("generation", 0) or 0) <= 1:
        # No earlier than one deadline ago: older times could not be published anyway, and a
        # TaskQueue from before schedules were implemented should not report years of misses.
        return max(created, now - cron.STARTING_DEADLINE)
    return now


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _deadline() -> str:
    minutes = int(cron.STARTING_DEADLINE.total_seconds() // 60)
    return f"{minutes} min"
