"""``spec.schedules[]``: one APScheduler job per schedule, kept in step with the TaskQueue's spec.

One ``AsyncIOScheduler`` per operator process (``process_scheduler``) holds every job. Each tick of
a TaskQueue's loop calls ``Schedules.tick``, which adds, replaces and removes that TaskQueue's jobs
to match the spec and returns ``status.schedules``. A job's run publishes the schedule's message
(``sluiceway.schedule.publish_once``) and wakes the loop, whose next tick sees the message in the
backlog, so a fleet at zero wakes at once.

Catch-up policy, from APScheduler: jobs are coalesced, with a misfire grace time of
``STARTING_DEADLINE``. After missed fire times (operator downtime, a stalled loop) the scheduler
runs only the latest, and only if it is at most one hour late; anything older is reported as missed
(``ScheduleMissed``), never published. Suspended or paused times are not published later.

At most once per scheduled time in memory, and exactly once in Redis: ``publish_once`` records the
fire under the schedule's scheduled wall time with SET NX and pushes the message in one Lua script,
which covers what memory cannot (a restart between the push and the status write, two operator
processes).

Where a new job starts (the cursor: every fire time up to it is dealt with): the loop's memory;
after a restart, the status this loop wrote (``lastFireTime``, and ``nextFireTime``, since every
time before it was dealt with); for a schedule never seen, the TaskQueue's creation if the spec is
still at generation 1 (the schedule was there from the start), else the moment it is first seen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
import structlog
from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.executors.base import run_coroutine_job
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from sluiceway import schedule as publishing
from sluiceway.contract import Keys

from . import cron, events, triggers
from .conditions import Condition, ConditionType, condition, rfc3339
from .faults import redis_problem
from .kube import Kube
from .spec import BrokerType, Schedule, TaskQueueSpec

log = structlog.get_logger("sluiceway_operator")

FIRED = "ScheduleFired"
FAILED = "ScheduleFailed"
MISSED = "ScheduleMissed"
STARTING_DEADLINE: Final = dt.timedelta(hours=1)
# A job restored after a long downtime starts no further back than this, so APScheduler's walk over
# the missed times stays short; older ones are counted as missed when the job is added.
CATCH_UP_HORIZON: Final = dt.timedelta(hours=24)
# Counting skipped fires walks them one by one; the count stops here (and reads "at least").
MAX_COUNTED: Final = 10_000
# A dedupe key must outlive every retry of its scheduled time: the deadline plus clock skew between
# operator processes.
DEDUPE_TTL_SECONDS: Final = int(STARTING_DEADLINE.total_seconds()) + 3600
_RETRY_CAP_SECONDS: Final = 30.0
_EPSILON: Final = dt.timedelta(microseconds=1)


# --- The process's scheduler ----------------------------------------------------------------------


class _AtRunTime:
    """A job as ``run_coroutine_job`` sees it, whose function also receives the scheduled time."""

    def __init__(self, job: Job, run_time: dt.datetime) -> None:
        self._job = job
        self.func = functools.partial(job.func, scheduled=run_time)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def __str__(self) -> str:
        return str(self._job)


class ScheduledTimeExecutor(AsyncIOExecutor):  # type: ignore[misc]  # apscheduler has no type hints
    """``AsyncIOExecutor``, but the job function gets ``scheduled=<run time>``.

    APScheduler 3 calls a job with its own arguments only, and the dedupe key is the scheduled
    time, not the moment the job runs. The misfire check stays APScheduler's (``run_coroutine_job``).
    """

    def _do_submit_job(self, job: Job, run_times: list[dt.datetime]) -> None:
        async def run_all() -> list[Any]:
            done: list[Any] = []
            for run_time in run_times:
                done += await run_coroutine_job(
                    _AtRunTime(job, run_time), job._jobstore_alias, [run_time], self._logger.name
                )
            return done

        def finished(f: asyncio.Future[list[Any]]) -> None:
            self._pending_futures.discard(f)
            try:
                results = f.result()
            except BaseException:
                self._run_job_error(job.id, *sys.exc_info()[1:])
            else:
                self._run_job_success(job.id, results)

        task = self._eventloop.create_task(run_all())
        task.add_done_callback(finished)
        self._pending_futures.add(task)


def new_scheduler() -> AsyncIOScheduler:
    """A started scheduler on the running loop, with the catch-up policy as its job defaults."""
    # Every run is logged as "schedule fired" (or missed) by us; APScheduler's own per-run INFO
    # lines would double that. Its warnings stay.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = AsyncIOScheduler(
        executors={"default": ScheduledTimeExecutor()},
        job_defaults={
            "coalesce": True,
            "misfire_grace_time": int(STARTING_DEADLINE.total_seconds()),
            # A publication retrying until the next fire may briefly overlap it.
            "max_instances": 2,
        },
        timezone=dt.UTC,
    )
    scheduler.start()
    return scheduler


_schedulers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncIOScheduler] = (
    weakref.WeakKeyDictionary()
)


def process_scheduler() -> AsyncIOScheduler:
    """The scheduler of this process (of this event loop: tests run one loop each)."""
    loop = asyncio.get_running_loop()
    scheduler = _schedulers.get(loop)
    if scheduler is None:
        scheduler = _schedulers[loop] = new_scheduler()
    return scheduler


# --- One TaskQueue's schedules --------------------------------------------------------------------


@dataclass
class _State:
    schedule: Schedule | None = None  # what the job was built from; a change replaces the job
    trigger: BaseTrigger | None = None
    cursor: dt.datetime | None = None  # every fire time up to here is published or skipped
    last_fire: dt.datetime | None = None
    problem: str | None = None  # why it cannot fire at all, or why its last publication failed
    reported: str | None = None  # the last problem posted as an Event, so one fault is one Event


@dataclass
class Schedules:
    namespace: str
    name: str
    kube: Kube
    wake: Callable[[], None] = lambda: None  # the loop's next tick at once
    scheduler: AsyncIOScheduler | None = None  # None = process_scheduler()
    states: dict[str, _State] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    client: redis.Redis | None = None
    keys: Keys | None = None
    _listening: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def _scheduler(self) -> AsyncIOScheduler:
        if self.scheduler is None:
            self.scheduler = process_scheduler()
        if not self._listening:
            self.scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED)
            self._listening = True
        return self.scheduler

    def job_id(self, schedule: str) -> str:
        return f"{self.namespace}/{self.name}/{schedule}"

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
        """Bring the jobs in step with ``spec``; return ``status.schedules``."""
        self.meta, self.client, self.keys = meta, client, keys
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        recorded = {s.get("name"): s for s in old_status.get("schedules") or [] if isinstance(s, Mapping)}
        names = {s.name for s in spec.schedules}
        for gone in set(self.states) - names:
            self._remove(gone)
            del self.states[gone]
        out: list[dict[str, Any]] = []
        for i, sched in enumerate(spec.schedules):
            state = self.states.setdefault(sched.name, _State())
            await self._sync(i, sched, state, spec, recorded.get(sched.name) or {}, moment)
            out.append(self._entry(sched.name, state))
        return out

    def close(self) -> None:
        """Remove every job of this TaskQueue (its loop ends: deleted, or the operator stops)."""
        for name in list(self.states):
            self._remove(name)
        self.states.clear()
        if self.scheduler is not None and self._listening:
            self.scheduler.remove_listener(self._on_missed)
            self._listening = False

    # --- Keeping the jobs in step -----------------------------------------------------------------

    async def _sync(
        self,
        index: int,
        sched: Schedule,
        state: _State,
        spec: TaskQueueSpec,
        recorded: Mapping[str, Any],
        now: dt.datetime,
    ) -> None:
        previous = state.schedule
        changed = previous != sched
        if changed:
            state.problem = state.reported = None  # a new spec gets a fresh verdict
        if state.last_fire is None:
            state.last_fire = _time(recorded.get("lastFireTime"))
        if state.cursor is None:
            state.cursor = _restored_cursor(recorded, state.last_fire, self.meta, now)
        elif changed:
            state.cursor = max(state.cursor, now)  # a changed schedule does not fire for earlier times
        state.schedule = sched
        problem = sched.problem
        trigger: BaseTrigger | None = None
        if problem is None:
            try:
                trigger = triggers.build(sched, created=_time(self.meta.get("creationTimestamp")) or now)
            except cron.CronError as exc:
                problem = f"spec.schedules[{index}].{exc.field}: {exc}"
        state.trigger = trigger
        if trigger is None:
            self._remove(sched.name)
            await self._report(state, sched.name, problem or "cannot fire")
            return
        idle = spec.paused or sched.suspend
        if not idle and spec.broker.type is not BrokerType.REDIS:
            idle = True
            await self._report(
                state, sched.name, f"schedules publish to redis brokers only, not {spec.broker.type}"
            )
        if idle:
            # Times that pass while suspended or paused are not published later either.
            self._remove(sched.name)
            state.cursor = max(state.cursor, now)
            return
        if changed or self._scheduler().get_job(self.job_id(sched.name)) is None:
            await self._add(sched, state, trigger, now)

    async def _add(self, sched: Schedule, state: _State, trigger: BaseTrigger, now: dt.datetime) -> None:
        assert state.cursor is not None
        start = max(state.cursor, now - CATCH_UP_HORIZON)
        older = triggers.count_between(trigger, state.cursor, start + _EPSILON, MAX_COUNTED)
        if older:
            await self._missed_event(sched.name, older)
        state.cursor = start
        first = triggers.first_after(trigger, start)
        if first is None:
            self._remove(sched.name)  # a date that has passed: nothing left to do
            return
        # APScheduler takes it from here: a first time in the past is a missed fire, coalesced and
        # checked against the misfire grace time like any other.
        self._scheduler().add_job(
            self._fire,
            trigger=trigger,
            args=[sched.name],
            id=self.job_id(sched.name),
            name=f"{self.namespace}/{self.name} schedule {sched.name}",
            next_run_time=first,
            replace_existing=True,
        )

    def _remove(self, name: str) -> None:
        if self.scheduler is not None and self.scheduler.get_job(self.job_id(name)) is not None:
            self.scheduler.remove_job(self.job_id(name))

    def _entry(self, name: str, state: _State) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name}
        if state.last_fire is not None:
            entry["lastFireTime"] = rfc3339(state.last_fire.timestamp())
        upcoming: dt.datetime | None = None
        job = self.scheduler.get_job(self.job_id(name)) if self.scheduler is not None else None
        if job is not None:
            upcoming = job.next_run_time
        elif state.trigger is not None and state.cursor is not None:
            upcoming = triggers.first_after(state.trigger, state.cursor)  # suspended or paused
        if upcoming is not None:
            entry["nextFireTime"] = rfc3339(upcoming.timestamp())
        if state.problem is not None:
            entry["lastError"] = state.problem
        return entry

    # --- Firing -----------------------------------------------------------------------------------

    async def _fire(self, name: str, *, scheduled: dt.datetime | None = None) -> None:
        """One run of a job: publish the message of ``scheduled`` once, retrying a failed push until
        the deadline or the next fire time, whichever comes first. (``scheduled`` has a default only
        because APScheduler checks the signature against the job's own arguments when adding it;
        ``ScheduledTimeExecutor`` always passes it.)"""
        state = self.states.get(name)
        if scheduled is None or state is None or state.schedule is None or state.trigger is None:
            return
        sched, trigger = state.schedule, state.trigger
        wall = triggers.wall_time(trigger, scheduled)
        skipped = triggers.count_between(trigger, state.cursor or scheduled, scheduled, MAX_COUNTED)
        following = triggers.first_after(trigger, scheduled)
        give_up = scheduled + STARTING_DEADLINE
        if following is not None:
            give_up = min(give_up, following)
        delay = 0.5
        while True:
            client, keys = self.client, self.keys
            try:
                if client is None or keys is None:
                    raise redis.ConnectionError("no Redis connection yet")
                published = await asyncio.to_thread(
                    publishing.publish_once,
                    client,
                    keys,
                    taskqueue=self.name,
                    schedule=name,
                    wall=wall,
                    fire_epoch=scheduled.timestamp(),
                    message=sched.message,
                    ttl_seconds=DEDUPE_TTL_SECONDS,
                )
                break
            except (redis.RedisError, TypeError, ValueError) as exc:
                # A Redis error's text names the Secret's host and port: a class only (faults.py).
                why = (
                    redis_problem(exc)
                    if isinstance(exc, redis.RedisError)
                    else f"{type(exc).__name__}: {exc}"
                )
                error = f"publish of {rfc3339(scheduled.timestamp())} failed: {why}"
                await self._report(state, name, error)
                late = time.time() + delay
                if isinstance(exc, TypeError | ValueError) or late >= give_up.timestamp():
                    state.cursor = max(state.cursor or scheduled, scheduled)
                    self.wake()
                    return
                await asyncio.sleep(delay)
                delay = min(2 * delay, _RETRY_CAP_SECONDS)
        state.problem = state.reported = None
        state.cursor = max(state.cursor or scheduled, scheduled)
        state.last_fire = scheduled
        when = rfc3339(scheduled.timestamp())
        late = max(0.0, time.time() - scheduled.timestamp())
        bound = log.bind(namespace=self.namespace, taskqueue=self.name, schedule=name, fire=wall)
        if published:
            bound.info("schedule fired", late=round(late, 1), skipped=skipped)
            note = f"; skipped {skipped} missed scheduled time(s)" if skipped else ""
            await events.post(
                self.kube,
                self.meta,
                "Normal",
                FIRED,
                f"Schedule {name} published its {when} message ({late:.0f} s late){note}",
            )
        else:
            # Another operator process (or this one before a restart) already published it.
            bound.info("schedule already fired")
        self.wake()

    def _on_missed(self, event: JobExecutionEvent) -> None:
        """APScheduler's verdict: the latest missed time is beyond the misfire grace time."""
        prefix = self.job_id("")
        if not event.job_id.startswith(prefix):
            return
        name = event.job_id[len(prefix) :]
        state = self.states.get(name)
        if state is None or state.trigger is None:
            return
        scheduled: dt.datetime = event.scheduled_run_time
        missed = 1 + triggers.count_between(state.trigger, state.cursor or scheduled, scheduled, MAX_COUNTED)
        state.cursor = max(state.cursor or scheduled, scheduled)
        task = asyncio.get_running_loop().create_task(self._missed_event(name, missed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _missed_event(self, name: str, missed: int) -> None:
        minutes = int(STARTING_DEADLINE.total_seconds() // 60)
        message = (
            f"Schedule {name}: {missed} scheduled time(s) missed while the operator was not running, "
            f"the latest more than {minutes} min ago: not published"
        )
        log.warning("schedule missed", namespace=self.namespace, taskqueue=self.name, schedule=name)
        await events.post(self.kube, self.meta, "Warning", MISSED, message)

    async def _report(self, state: _State, name: str, problem: str) -> None:
        state.problem = problem
        if state.reported == problem:
            return
        state.reported = problem
        log.warning(
            "schedule failed", namespace=self.namespace, taskqueue=self.name, schedule=name, error=problem
        )
        await events.post(self.kube, self.meta, "Warning", FAILED, f"Schedule {name}: {problem}")


def degraded(
    entries: Sequence[Mapping[str, Any]], conditions: list[Condition], *, generation: int, now: float
) -> list[Condition]:
    """``conditions`` with Degraded=True (``ScheduleFailed``) when a schedule cannot fire and nothing
    more urgent holds Degraded: a schedule that never fires must not read as Healthy."""
    broken = [e for e in entries if e.get("lastError")]
    if not broken:
        return conditions
    out: list[Condition] = []
    for c in conditions:
        if c["type"] == str(ConditionType.DEGRADED) and c["status"] != "True":
            text = "; ".join(f"schedule {e['name']}: {e['lastError']}" for e in broken)
            c = condition(ConditionType.DEGRADED, True, FAILED, text, generation=generation, now=now)
        out.append(c)
    return out


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
        return min(max(candidates), now)
    created = _time(meta.get("creationTimestamp"))
    if created is not None and int(meta.get("generation", 0) or 0) <= 1:
        # No earlier than one deadline ago: older times could not be published anyway, and a
        # TaskQueue from before schedules were implemented should not report years of misses.
        return min(max(created, now - STARTING_DEADLINE), now)
    return now


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)
