"""APScheduler triggers for ``spec.schedules[]``: pure, no I/O, no clock reads.

``interval`` and ``at`` use APScheduler's own ``IntervalTrigger`` and ``DateTrigger``, in UTC: their
fire times are instants, so a clock change moves nothing. ``cron`` uses ``CronJobTrigger``, a
``BaseTrigger`` on ``cron.py``'s matcher, because APScheduler 3's ``CronTrigger`` reads a crontab
differently from a Kubernetes CronJob (weekday 1 is Tuesday there and 7 is rejected, the two day
fields are ANDed, and it fires twice at the autumn clock change); ``docs/operator.md`` lists the
differences.

The dedupe key of a fire is its scheduled *wall* time (``wall_time``): in the schedule's zone for
cron, in UTC otherwise. A cron wall time fires once, at its first occurrence, so the key is also
what makes "once" hold if two operator versions ever disagreed about which occurrence that is.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from . import cron
from .spec import Schedule

_TICK: Final = dt.timedelta(microseconds=1)


class CronJobTrigger(BaseTrigger):  # type: ignore[misc]  # apscheduler has no type hints
    """Kubernetes CronJob semantics (``cron.py``) behind APScheduler's trigger interface."""

    def __init__(self, parsed: cron.Cron) -> None:
        self.cron = parsed

    def get_next_fire_time(
        self, previous_fire_time: dt.datetime | None, now: dt.datetime
    ) -> dt.datetime | None:
        # APScheduler asks for the first time after the previous fire, or at/after ``now`` for a
        # new job; the matcher answers "strictly after".
        after = previous_fire_time if previous_fire_time is not None else now - _TICK
        return cron.next_fire(self.cron, after)

    def __str__(self) -> str:
        return f"cron[{self.cron.expr!r} in {self.cron.zone.key}]"


def build(schedule: Schedule, *, created: dt.datetime) -> BaseTrigger:
    """The trigger of a schedule whose ``problem`` is None; raises ``cron.CronError`` for a bad
    expression or zone. ``created`` (the TaskQueue's creation) anchors an interval without a start,
    so its fire times are the same in every operator process and across restarts."""
    if schedule.cron is not None:
        return CronJobTrigger(cron.parse(schedule.cron, schedule.time_zone))
    if schedule.interval is not None:
        start = schedule.interval.start or created
        return IntervalTrigger(seconds=schedule.interval.seconds, start_date=start, timezone=dt.UTC)
    if schedule.at is not None:
        return DateTrigger(run_date=schedule.at, timezone=dt.UTC)
    raise ValueError(f"schedule {schedule.name} has no trigger")


def first_after(trigger: BaseTrigger, moment: dt.datetime) -> dt.datetime | None:
    """The first fire time strictly after ``moment``, or None if there is none."""
    t: dt.datetime | None = trigger.get_next_fire_time(None, moment + _TICK)
    # A DateTrigger answers its date whatever ``now`` is.
    return t if t is not None and t > moment else None


def count_between(trigger: BaseTrigger, after: dt.datetime, before: dt.datetime, cap: int) -> int:
    """How many fire times lie strictly between ``after`` and ``before`` (at most ``cap``)."""
    n = 0
    t = first_after(trigger, after)
    while t is not None and t < before and n < cap:
        n += 1
        t = trigger.get_next_fire_time(t, t)
    return n


def wall_time(trigger: BaseTrigger, fire: dt.datetime) -> str:
    """The dedupe key of one fire: its wall time, in the cron zone or in UTC."""
    if isinstance(trigger, CronJobTrigger):
        return fire.astimezone(trigger.cron.zone).strftime("%Y-%m-%dT%H:%M:%S")
    return fire.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
