"""Cron math: worked examples, DST in Europe/Berlin, and properties over random expressions and ticks.

A brute-force matcher (every minute of the wall clock, checked field by field) is the reference the
fast ``next_fire`` is compared with.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from cronsim import CronSim
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sluiceway_operator import cron
from sluiceway_operator.triggers import CronJobTrigger, count_between, first_after, wall_time

UTC = dt.UTC
BERLIN = "Europe/Berlin"


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, tz: str = "UTC"
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(tz))


def fires(expr: str, tz: str, after: dt.datetime, n: int) -> list[dt.datetime]:
    c = cron.parse(expr, tz)
    out: list[dt.datetime] = []
    t: dt.datetime | None = after
    for _ in range(n):
        assert t is not None
        t = cron.next_fire(c, t)
        assert t is not None
        out.append(t)
    return out


def local(times: list[dt.datetime], tz: str) -> list[str]:
    return [t.astimezone(ZoneInfo(tz)).strftime("%a %m-%d %H:%M %Z") for t in times]


# --- Examples -------------------------------------------------------------------------------------


def test_every_five_minutes() -> None:
    got = fires("*/5 * * * *", "UTC", at(2024, 1, 1, 10, 3, 30), 3)
    assert got == [at(2024, 1, 1, 10, 5), at(2024, 1, 1, 10, 10), at(2024, 1, 1, 10, 15)]


def test_exactly_on_a_fire_time_gives_the_next_one() -> None:
    assert fires("*/5 * * * *", "UTC", at(2024, 1, 1, 10, 5), 1) == [at(2024, 1, 1, 10, 10)]


def test_daily_at_three() -> None:
    got = fires("0 3 * * *", "UTC", at(2024, 1, 31, 3, 0, 1), 2)
    assert got == [at(2024, 2, 1, 3), at(2024, 2, 2, 3)]


def test_weekdays_at_nine_in_berlin_with_cron_weekday_numbers() -> None:
    # Friday 2024-03-29 noon: next are Monday..Wednesday, never the weekend; 1-5 means the same.
    got = fires("0 9 * * mon-fri", BERLIN, at(2024, 3, 29, 12, tz=BERLIN), 3)
    assert local(got, BERLIN) == ["Mon 04-01 09:00 CEST", "Tue 04-02 09:00 CEST", "Wed 04-03 09:00 CEST"]
    assert fires("0 9 * * 1-5", BERLIN, at(2024, 3, 29, 12, tz=BERLIN), 3) == got
    # 0 and 7 are both Sunday.
    assert fires("0 9 * * 0", "UTC", at(2024, 3, 29), 1) == fires("0 9 * * 7", "UTC", at(2024, 3, 29), 1)
    assert local(fires("0 9 * * 0", "UTC", at(2024, 3, 29), 1), "UTC") == ["Sun 03-31 09:00 UTC"]


def test_both_day_fields_restricted_means_either() -> None:
    # The 15th, or any Monday (CronJob semantics), from Sat 2024-06-01.
    got = fires("0 0 15 * mon", "UTC", at(2024, 6, 1), 4)
    assert [t.day for t in got] == [3, 10, 15, 17]


def test_steps_ranges_and_names() -> None:
    c = cron.parse("5/20 1-3/2 * jan,jul *", "UTC")
    assert c.minutes == {5, 25, 45}
    assert c.hours == {1, 3}
    assert c.months == {1, 7}


@pytest.mark.parametrize(
    ("expr", "tz"),
    [
        ("0 0 30 2 *", "UTC"),  # never exists
        ("60 * * * *", "UTC"),
        ("* * * *", "UTC"),
        ("*/0 * * * *", "UTC"),
        ("5-1 * * * *", "UTC"),
        ("* * * * *", "Mars/Olympus"),
        ("* * * * *", "Europe/"),
    ],
)
def test_unusable_expressions_and_zones(expr: str, tz: str) -> None:
    with pytest.raises(cron.CronError):
        cron.parse(expr, tz)


def test_leap_day_is_found_years_ahead() -> None:
    assert fires("0 0 29 2 *", "UTC", at(2097, 3, 1), 1) == [at(2104, 2, 29)]  # 2100 is no leap year


# --- DST in Europe/Berlin -------------------------------------------------------------------------


def test_spring_forward_skips_the_missing_time() -> None:
    # 2024-03-31 02:00 CET jumps to 03:00 CEST: 02:30 does not exist that day.
    got = fires("30 2 * * *", BERLIN, at(2024, 3, 30, 12, tz=BERLIN), 2)
    assert local(got, BERLIN) == ["Mon 04-01 02:30 CEST", "Tue 04-02 02:30 CEST"]
    every_minute = fires("* * * * *", BERLIN, at(2024, 3, 31, 1, 58, tz=BERLIN), 3)
    assert local(every_minute, BERLIN) == [
        "Sun 03-31 01:59 CET",
        "Sun 03-31 03:00 CEST",
        "Sun 03-31 03:01 CEST",
    ]


def test_fall_back_fires_the_repeated_time_once() -> None:
    # 2024-10-27 03:00 CEST falls back to 02:00 CET: 02:30 happens twice; it fires at the first.
    got = fires("30 2 * * *", BERLIN, at(2024, 10, 26, 12, tz=BERLIN), 2)
    assert got == [dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC), dt.datetime(2024, 10, 28, 1, 30, tzinfo=UTC)]
    # Every minute: the second pass through 02:00-02:59 CET fires nothing.
    got = fires("* * * * *", BERLIN, dt.datetime(2024, 10, 27, 0, 58, tzinfo=UTC), 3)
    assert got == [
        dt.datetime(2024, 10, 27, 0, 59, tzinfo=UTC),  # 02:59 CEST
        dt.datetime(2024, 10, 27, 2, 0, tzinfo=UTC),  # 03:00 CET
        dt.datetime(2024, 10, 27, 2, 1, tzinfo=UTC),
    ]
    # Asked from inside the second pass, the next fire is still after it.
    inside = dt.datetime(2024, 10, 27, 1, 30, tzinfo=UTC)  # 02:30 CET
    assert fires("* * * * *", BERLIN, inside, 1) == [dt.datetime(2024, 10, 27, 2, 0, tzinfo=UTC)]


# --- Golden table: Kubernetes CronJob semantics -------------------------------------------------

# (expression, zone, after (UTC), the next fire times as local wall clock). Where APScheduler 3's
# CronTrigger or Debian cron (cronsim) read the same line differently, the comment says how; the
# list is in docs/operator.md.
GOLDEN: list[tuple[str, str, dt.datetime, list[str]]] = [
    # 1 is Monday (APScheduler 3: Tuesday).
    ("0 9 * * 1", "UTC", at(2024, 6, 1), ["Mon 06-03 09:00 UTC", "Mon 06-10 09:00 UTC"]),
    # 7 and 0 are Sunday (APScheduler 3 rejects 7).
    ("0 9 * * 7", "UTC", at(2024, 6, 1), ["Sun 06-02 09:00 UTC", "Sun 06-09 09:00 UTC"]),
    ("0 9 * * 0", "UTC", at(2024, 6, 1), ["Sun 06-02 09:00 UTC", "Sun 06-09 09:00 UTC"]),
    # Both day fields restricted: either matches (APScheduler 3: both must).
    (
        "0 9 13 * 5",
        "UTC",
        at(2024, 9, 1),
        ["Fri 09-06 09:00 UTC", "Fri 09-13 09:00 UTC", "Fri 09-20 09:00 UTC"],
    ),
    ("0 0 13 * 2", "UTC", at(2024, 8, 12), ["Tue 08-13 00:00 UTC", "Tue 08-20 00:00 UTC"]),
    # A stepped day field restricts like robfig/cron (Debian cron: "*/2" counts as unrestricted).
    (
        "0 0 */10 * 1",
        "UTC",
        at(2024, 6, 30),
        ["Mon 07-01 00:00 UTC", "Mon 07-08 00:00 UTC", "Thu 07-11 00:00 UTC"],
    ),
    ("0 0 */1 * 1", "UTC", at(2024, 6, 30), ["Mon 07-01 00:00 UTC", "Mon 07-08 00:00 UTC"]),
    # Spring gap in Berlin: 02:30 does not exist on 03-31 and is skipped (cronsim: fires at 03:00;
    # APScheduler 3: 03:30).
    ("30 2 * * *", BERLIN, at(2024, 3, 30, 12), ["Mon 04-01 02:30 CEST", "Tue 04-02 02:30 CEST"]),
    ("*/15 2 * * *", BERLIN, at(2024, 3, 30, 12), ["Mon 04-01 02:00 CEST", "Mon 04-01 02:15 CEST"]),
    # Autumn overlap: 02:30 happens twice and fires once, at the first (APScheduler 3 and robfig:
    # twice).
    ("30 2 * * *", BERLIN, at(2024, 10, 26, 12), ["Sun 10-27 02:30 CEST", "Mon 10-28 02:30 CET"]),
    # Every 15 minutes in the repeated hour: 4 fires, not 8 (cronsim and robfig: 8).
    (
        "*/15 2 * * *",
        BERLIN,
        at(2024, 10, 26, 12),
        [
            "Sun 10-27 02:00 CEST",
            "Sun 10-27 02:15 CEST",
            "Sun 10-27 02:30 CEST",
            "Sun 10-27 02:45 CEST",
            "Mon 10-28 02:00 CET",
        ],
    ),
    (
        "5/20 * * * *",
        "UTC",
        at(2024, 1, 1),
        ["Mon 01-01 00:05 UTC", "Mon 01-01 00:25 UTC", "Mon 01-01 00:45 UTC"],
    ),
    ("0 0 29 2 *", "UTC", at(2025, 1, 1), ["Tue 02-29 00:00 UTC"]),
    ("0 12 * jan,JUL sun", "UTC", at(2024, 6, 1), ["Sun 07-07 12:00 UTC", "Sun 07-14 12:00 UTC"]),
]


@pytest.mark.parametrize(("expr", "tz", "after", "expected"), GOLDEN)
def test_golden_table(expr: str, tz: str, after: dt.datetime, expected: list[str]) -> None:
    assert local(fires(expr, tz, after, len(expected)), tz) == expected


# --- The APScheduler trigger, with an injected clock ----------------------------------------------


def run_scheduler(trigger: BaseTrigger, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """What APScheduler's loop does with a trigger (Job._get_run_times), on a clock that the test
    moves a minute at a time instead of reading the real one."""
    fired: list[dt.datetime] = []
    clock = start
    upcoming = trigger.get_next_fire_time(None, clock)
    while clock <= end:
        while upcoming is not None and upcoming <= clock:
            fired.append(upcoming)
            upcoming = trigger.get_next_fire_time(upcoming, clock)
        clock += dt.timedelta(minutes=1)
    return fired


def test_autumn_clock_change_fires_each_wall_time_once() -> None:
    # Berlin, 2024-10-27: 03:00 CEST falls back to 02:00 CET, so 02:00-02:59 happens twice.
    start, end = dt.datetime(2024, 10, 26, 22, tzinfo=UTC), dt.datetime(2024, 10, 27, 4, tzinfo=UTC)
    ours = CronJobTrigger(cron.parse("30 2 * * *", BERLIN))
    assert run_scheduler(ours, start, end) == [dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC)]
    quarter = run_scheduler(CronJobTrigger(cron.parse("*/15 * * * *", BERLIN)), start, end)
    walls = [t.astimezone(ZoneInfo(BERLIN)).strftime("%H:%M") for t in quarter]
    assert len(walls) == len(set(walls))  # no wall time twice
    assert walls[walls.index("02:45") + 1] == "03:00"  # the second 02:00-02:45 do not fire
    # The dedupe key is the wall time: distinct for every fire of the day.
    keys = [wall_time(ours, t) for t in run_scheduler(ours, start, end + dt.timedelta(days=1))]
    assert keys == ["2024-10-27T02:30:00", "2024-10-28T02:30:00"]
    # APScheduler 3's own CronTrigger fires twice here: the reason for the custom trigger.
    theirs = CronTrigger.from_crontab("30 2 * * *", timezone=ZoneInfo(BERLIN))
    assert len(run_scheduler(theirs, start, end)) == 2


def test_spring_clock_change_skips_the_missing_time() -> None:
    start, end = dt.datetime(2024, 3, 30, 22, tzinfo=UTC), dt.datetime(2024, 3, 31, 4, tzinfo=UTC)
    assert run_scheduler(CronJobTrigger(cron.parse("30 2 * * *", BERLIN)), start, end) == []


def test_trigger_answers_like_the_matcher() -> None:
    trigger = CronJobTrigger(cron.parse("*/5 * * * *", "UTC"))
    now = at(2024, 1, 1, 10, 5)
    assert trigger.get_next_fire_time(None, now) == now  # a new job: at or after now
    assert trigger.get_next_fire_time(now, now) == at(2024, 1, 1, 10, 10)  # after the previous fire
    assert first_after(trigger, now) == at(2024, 1, 1, 10, 10)
    assert count_between(trigger, at(2024, 1, 1, 8), at(2024, 1, 1, 12, 5), 10_000) == 48


def test_interval_and_date_triggers() -> None:
    every = IntervalTrigger(seconds=30, start_date=at(2024, 1, 1, 10), timezone=UTC)
    assert first_after(every, at(2024, 1, 1, 10, 0, 45)) == at(2024, 1, 1, 10, 1)
    assert first_after(every, at(2024, 1, 1, 10, 1)) == at(2024, 1, 1, 10, 1, 30)  # strictly after
    assert first_after(every, at(2024, 1, 1, 9)) == at(2024, 1, 1, 10)  # not before its start
    assert wall_time(every, at(2024, 1, 1, 10, 1)) == "2024-01-01T10:01:00Z"
    once = DateTrigger(run_date=at(2024, 1, 1, 10), timezone=UTC)
    assert first_after(once, at(2024, 1, 1, 9)) == at(2024, 1, 1, 10)
    assert first_after(once, at(2024, 1, 1, 10)) is None
    assert count_between(once, at(2024, 1, 1, 9), at(2024, 1, 1, 11), 10) == 1


# --- Properties -----------------------------------------------------------------------------------


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high).map(str)
    rng = st.tuples(st.integers(low, high), st.integers(low, high)).map(lambda p: f"{min(p)}-{max(p)}")
    item = st.one_of(
        st.just("*"),
        value,
        rng,
        st.tuples(st.sampled_from(["*", str(low)]), st.integers(1, high - low + 1)).map(
            lambda p: f"{p[0]}/{p[1]}"
        ),
    )
    return st.lists(item, min_size=1, max_size=3).map(",".join)


EXPRS = st.tuples(_field(0, 59), _field(0, 23), _field(1, 28), _field(1, 12), _field(0, 7)).map(" ".join)
ZONES = st.sampled_from(["UTC", BERLIN, "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"])
INSTANTS = st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2030, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


def brute_next(c: cron.Cron, after: dt.datetime, within: dt.timedelta) -> dt.datetime | None:
    """The reference: walk UTC minute by minute; fire where the wall clock matches, first pass only."""
    t = after.replace(second=0, microsecond=0)
    while t <= after + within:
        wall = t.astimezone(c.zone)
        ok = (
            wall.minute in c.minutes
            and wall.hour in c.hours
            and wall.month in c.months
            and c.day_matches(wall.date())
        )
        if ok and wall.fold == 0 and t > after:
            return t
        t += dt.timedelta(minutes=1)
    return None


@given(EXPRS, ZONES, INSTANTS)
@settings(max_examples=300, deadline=None)
def test_next_fire_is_later_and_matches_the_wall_clock(expr: str, tz: str, after: dt.datetime) -> None:
    assert cron._SHAPE.match(expr)  # admission accepts every generated expression
    c = cron.parse(expr, tz)
    t = cron.next_fire(c, after)
    assert t is not None and t > after
    wall = t.astimezone(c.zone)
    assert wall.minute in c.minutes and wall.hour in c.hours and wall.month in c.months
    assert c.day_matches(wall.date())
    assert wall.fold == 0  # an ambiguous time fires at its first occurrence


@given(st.sampled_from(["*/7 * * * *", "30 2 * * *", "0,30 1-3 * * *", "15 */2 * * *"]), ZONES, INSTANTS)
@settings(max_examples=100, deadline=None)
def test_next_fire_agrees_with_brute_force(expr: str, tz: str, after: dt.datetime) -> None:
    c = cron.parse(expr, tz)
    # Every expression here fires at least once in any two days, DST gaps included.
    assert cron.next_fire(c, after) == brute_next(c, after, dt.timedelta(days=2))


@given(EXPRS, ZONES, INSTANTS)
@settings(max_examples=150, deadline=None)
def test_fire_times_strictly_increase(expr: str, tz: str, start: dt.datetime) -> None:
    c = cron.parse(expr, tz)
    t: dt.datetime | None = start
    walls: set[dt.datetime] = set()
    for _ in range(20):
        assert t is not None
        nxt = cron.next_fire(c, t)
        assert nxt is not None and nxt > t
        wall = nxt.astimezone(c.zone).replace(tzinfo=None, fold=0)
        assert wall not in walls  # one wall time, one fire (even in a fold)
        walls.add(wall)
        t = nxt


# --- Cross-check with an independent implementation (cronsim, which models Debian cron) ----------


def _day_field(low: int, high: int) -> st.SearchStrategy[str]:
    # Which day fields count as unrestricted differs: a field starting with "*" in cronsim (like
    # Vixie cron), an item "*" without a step above 1 in robfig ("*/2" restricts, "0,*" does not).
    # Compare day fields that are exactly "*" or hold no "*" at all.
    return st.one_of(st.just("*"), _field(low, high).filter(lambda f: "*" not in f))


AGREEING = st.tuples(_field(0, 59), _field(0, 23), _day_field(1, 28), _field(1, 12), _day_field(0, 6)).map(
    " ".join
)


@given(AGREEING, st.sampled_from(["UTC", "Asia/Kolkata", BERLIN, "America/New_York"]), INSTANTS)
@settings(max_examples=400, deadline=None)
def test_matcher_agrees_with_cronsim(expr: str, tz: str, after: dt.datetime) -> None:
    zone = ZoneInfo(tz)
    ours = fires(expr, tz, after, 3)
    theirs_iter = CronSim(expr, after.astimezone(zone))
    theirs = [next(theirs_iter).astimezone(UTC) for _ in range(3)]
    # DST is where the two differ by design (a gap is skipped here, moved to 03:00 in Debian cron;
    # an overlap fires each wall time once here, every instant there): compare away from it.
    span = [after, *ours, *theirs]
    offsets = {zone.utcoffset(t.replace(tzinfo=None)) for t in span} | {
        t.astimezone(zone).utcoffset() for t in span
    }
    assume(len(offsets) == 1)
    assert ours == theirs
