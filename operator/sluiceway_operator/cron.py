"""Cron math for ``spec.schedules[]``: pure functions, no I/O and no clock reads.

A five-field expression (minute hour day-of-month month day-of-week) is read in an IANA time zone.
The matcher is our own, not APScheduler 3's ``CronTrigger.from_crontab``, because that one reads a
crontab differently from every cron a Kubernetes user knows: weekday 0 is Monday there (so
``0 9 * * 1-5`` would fire Tuesday to Saturday), and a restricted day-of-month and day-of-week must
both match, where cron fires when either does. The semantics here are those of Kubernetes CronJob
(robfig/cron): 0 and 7 are Sunday; when both day fields are restricted a day matches if either does,
and a day field counts as unrestricted when one of its items is ``*`` without a step above 1.

Time zones and DST, on the wall clock of the zone:

* a wall time that does not exist (spring forward, 02:30 in Europe/Berlin on the last Sunday of
  March) is skipped: there is no such moment, and firing at 03:30 instead would be a time nobody
  scheduled;
* a wall time that happens twice (fall back, 02:30 on the last Sunday of October) fires once, at its
  first occurrence.

The catch-up policy (which missed times are published after downtime) is not here: APScheduler's
coalescing and misfire grace time give it (``schedules.py``); ``triggers.CronJobTrigger`` puts this
matcher behind APScheduler's trigger interface.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Feb 29 on a restricted weekday can be 28 years away (and 2100 is no leap year); nothing that can
# match at all is further than this.
_HORIZON_YEARS: Final = 30

_MINUTE: Final = dt.timedelta(minutes=1)
_MONTHS: Final = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAYS_IN_MONTH: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each can have


# (label, low, high, names): the one statement of what each field accepts. ``CRON_PATTERN`` and the
# parser below are both built from it.
_FIELDS: Final = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _WEEKDAYS),  # 0 and 7 are both Sunday
)


def _number_pattern(low: int, high: int) -> str:
    """A regex (no backslashes) for the decimal numbers low..high (< 100), leading zeros allowed."""
    parts: list[str] = []
    if low <= 9:
        parts.append(f"[{low}-{min(high, 9)}]")
    full = [t for t in range(1, high // 10 + 1) if low <= 10 * t and 10 * t + 9 <= high]
    if full:
        tens_class = str(full[0]) if len(full) == 1 else f"[{full[0]}-{full[-1]}]"
        parts.append(f"{tens_class}[0-9]")
    for tens in range(1, high // 10 + 1):
        first, last = max(0, low - 10 * tens), min(9, high - 10 * tens)
        if first <= last and tens not in full:
            parts.append(f"{tens}[{first}-{last}]")
    return "0*(" + "|".join(parts) + ")"


def _field_pattern(low: int, high: int, names: tuple[str, ...]) -> str:
    value = _number_pattern(low, high) + ("|" + "|".join(names) if names else "")
    item = f"([*]|({value})(-({value}))?)(/0*[1-9][0-9]*)?"
    return f"{item}(,{item})*"


# What admission accepts (the CRD's CEL rule on spec.schedules[].cron embeds this verbatim): five
# space-separated fields, every number in its field's range, every step at least 1. Two things only
# the parser sees stay with the operator, which marks just that schedule: a range that runs backwards
# (``5-1``) and a date that never exists (``0 0 30 2 *``).
CRON_PATTERN: Final = "(?i)^" + " +".join(f"({_field_pattern(lo, hi, n)})" for _, lo, hi, n in _FIELDS) + "$"
_SHAPE: Final = re.compile(CRON_PATTERN)


class CronError(ValueError):
    """The expression or the time zone cannot be used; the message says why, ``field`` which."""

    def __init__(self, message: str, *, field: str = "cron") -> None:
        super().__init__(message)
        self.field = field  # "cron" or "timeZone", as in spec.schedules[]


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed expression in its zone. Weekdays are 0-6 from Sunday (7 is folded into 0)."""

    expr: str
    zone: ZoneInfo
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool  # day-of-month leaves the day open (see _unrestricted)
    any_weekday: bool  # day-of-week likewise

    def day_matches(self, day: dt.date) -> bool:
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def parse(expr: str, time_zone: str) -> Cron:
    """Parse ``expr`` in ``time_zone``; raise ``CronError`` if either is unusable."""
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"unknown time zone {time_zone!r}", field="timeZone") from exc
    parts = expr.split()
    if len(parts) != 5:
        raise CronError(f"{expr!r} must have 5 fields, not {len(parts)}")
    minutes, hours, days, months, weekdays = (
        _field(text, low, high, names, label)
        for text, (label, low, high, names) in zip(parts, _FIELDS, strict=True)
    )
    if not _SHAPE.match(expr):
        # Every field parsed, so only the separators can be wrong (tabs, leading spaces).
        raise CronError(f"{expr!r}: separate the 5 fields with spaces only")
    cron = Cron(
        expr=expr,
        zone=zone,
        minutes=minutes,
        hours=hours,
        days=days,
        months=months,
        weekdays=frozenset(d % 7 for d in weekdays),
        any_day=_unrestricted(parts[2]),
        any_weekday=_unrestricted(parts[4]),
    )
    # "0 0 30 2 *" passes every range check and still never fires: say so instead of searching.
    if cron.any_weekday and not any(d <= _DAYS_IN_MONTH[m - 1] for m in cron.months for d in cron.days):
        raise CronError(f"{expr!r} names no day that exists in its months, so it never fires")
    return cron


def _unrestricted(text: str) -> bool:
    """Whether a day field leaves the day open, as robfig/cron decides: an item that is ``*`` with no
    step above 1 (``*``, ``*/1``, ``*,5``). ``*/2`` restricts: its days OR with the other field's."""
    for item in text.split(","):
        base, _, step = item.partition("/")
        if base == "*" and (not step or int(step) <= 1):
            return True
    return False


def _field(text: str, low: int, high: int, names: tuple[str, ...], label: str) -> frozenset[int]:
    values: set[int] = set()
    for item in text.lower().split(","):
        base, slash, step_text = item.partition("/")
        if slash and not step_text.isdigit():
            raise CronError(f"{label} {text!r}: step {step_text!r} must be a positive number")
        step = int(step_text) if slash else 1
        if step < 1:
            raise CronError(f"{label} {text!r}: step must be at least 1")
        if base == "*":
            start, end = low, high
        else:
            bounds = base.split("-")
            if len(bounds) > 2 or not all(bounds):
                raise CronError(f"{label} {text!r}: {item!r} is not a value or a range")
            nums = [_value(b, low, high, names, label, text) for b in bounds]
            start = nums[0]
            # "5/15" means 5-max/15, as in Vixie cron and robfig/cron.
            end = nums[-1] if len(nums) == 2 else (high if slash else start)
            if start > end:
                raise CronError(f"{label} {text!r}: range {base!r} runs backwards")
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _value(word: str, low: int, high: int, names: tuple[str, ...], label: str, text: str) -> int:
    if word in names:
        return names.index(word) + (1 if names is _MONTHS else 0)
    if not word.isdigit():
        raise CronError(f"{label} {text!r}: {word!r} is not a number")
    n = int(word)
    if not low <= n <= high:
        raise CronError(f"{label} {text!r}: {n} is outside {low}-{high}")
    return n


# --- Fire times ----------------------------------------------------------------------------------


def next_fire(cron: Cron, after: dt.datetime) -> dt.datetime | None:
    """The first fire time strictly after ``after`` (an aware datetime), in UTC.

    ``None`` only if nothing matches within the search horizon, which ``parse`` makes impossible
    for every expression it accepts.
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    # Walk the zone's wall clock from the minute of ``after``. With fold=0 everywhere the map from
    # an existing wall time to its instant never goes backwards, so the first matching wall time
    # whose instant is later than ``after`` is the answer.
    wall = after.astimezone(cron.zone).replace(tzinfo=None, second=0, microsecond=0, fold=0)
    limit = wall.year + _HORIZON_YEARS
    while True:
        found = _next_wall(cron, wall, limit)
        if found is None:
            return None
        instant = _instant(cron.zone, found)
        if instant is not None and instant > after:
            return instant
        wall = found + _MINUTE


def _next_wall(cron: Cron, wall: dt.datetime, limit: int) -> dt.datetime | None:
    """The first wall time at or after ``wall`` (naive, whole minute) that the fields match."""
    while wall.year <= limit:
        if wall.month not in cron.months:
            wall = _first_of_next_month(wall)
        elif not cron.day_matches(wall.date()):
            wall = dt.datetime.combine(wall.date() + dt.timedelta(days=1), dt.time())
        elif wall.hour not in cron.hours:
            wall = wall.replace(minute=0) + dt.timedelta(hours=1)
        elif wall.minute not in cron.minutes:
            later = [m for m in cron.minutes if m > wall.minute]
            wall = (
                wall.replace(minute=min(later)) if later else wall.replace(minute=0) + dt.timedelta(hours=1)
            )
        else:
            return wall
    return None


def _first_of_next_month(wall: dt.datetime) -> dt.datetime:
    year, month = (wall.year + 1, 1) if wall.month == 12 else (wall.year, wall.month + 1)
    return dt.datetime(year, month, 1)


def _instant(zone: ZoneInfo, wall: dt.datetime) -> dt.datetime | None:
    """The UTC instant of a wall time: its first occurrence if ambiguous, None if it does not exist."""
    local = wall.replace(tzinfo=zone, fold=0)
    instant = local.astimezone(dt.UTC)
    if instant.astimezone(zone).replace(tzinfo=None) != wall:
        return None  # in a spring-forward gap: the round trip lands on another wall time
    return instant
