"""Cron math: worked examples, DST in Europe/Berlin, and properties over random expressions and ticks.

A brute-force matcher (every minute of the wall clock, checked field by field) is the reference the
fast ``next_fire`` is compared with.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway_operator import cron

UTC = dt.UTC
BERLIN = "Europe/Berlin"


def at(*args: int, tz: str = "UTC") -> dt.datetime:
    return dt.datetime(*args, tzinfo=ZoneInfo(tz))  # type: ignore[misc]


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


# --- Catch-up policy ------------------------------------------------------------------------------


def test_running_operator_fires_each_time_once() -> None:
    c = cron.parse("*/5 * * * *", "UTC")
    plan = cron.due_fires(c, at(2024, 1, 1, 10, 4, 58), at(2024, 1, 1), at(2024, 1, 1, 10, 5, 1))
    assert (plan.fire, plan.skipped, plan.next) == (at(2024, 1, 1, 10, 5), 0, at(2024, 1, 1, 10, 10))
    again = cron.due_fires(c, plan.cursor, at(2024, 1, 1), at(2024, 1, 1, 10, 5, 3))
    assert again.fire is None and again.skipped == 0


def test_downtime_publishes_only_the_latest_and_counts_the_rest() -> None:
    c = cron.parse("*/5 * * * *", "UTC")
    plan = cron.due_fires(c, at(2024, 1, 1, 8), at(2024, 1, 1), at(2024, 1, 1, 12, 7))
    assert plan.fire == at(2024, 1, 1, 12, 5)
    assert plan.skipped == 48  # 08:05 .. 12:00


def test_a_missed_time_older_than_the_deadline_is_not_published() -> None:
    c = cron.parse("0 3 * * *", "UTC")
    plan = cron.due_fires(c, at(2024, 1, 1, 3), at(2024, 1, 1), at(2024, 1, 2, 4, 30))
    assert plan.fire is None and plan.skipped == 1
    assert plan.next == at(2024, 1, 3, 3)
    late_but_inside = cron.due_fires(c, at(2024, 1, 1, 3), at(2024, 1, 1), at(2024, 1, 2, 3, 59))
    assert late_but_inside.fire == at(2024, 1, 2, 3)


def test_first_tick_counts_from_creation() -> None:
    c = cron.parse("*/5 * * * *", "UTC")
    plan = cron.due_fires(c, None, at(2024, 1, 1, 10, 4), at(2024, 1, 1, 10, 5, 30))
    assert plan.fire == at(2024, 1, 1, 10, 5)
    before = cron.due_fires(c, None, at(2024, 1, 1, 10, 5, 10), at(2024, 1, 1, 10, 5, 30))
    assert before.fire is None  # created after that time


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


@given(
    st.sampled_from(["* * * * *", "*/5 * * * *", "0 3 * * *", "0 9 * * mon-fri", "30 2 * * *"]),
    ZONES,
    INSTANTS,
    st.lists(st.integers(1, 4 * 3600), min_size=1, max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
@settings(max_examples=150, deadline=None)
def test_ticks_never_publish_one_time_twice(
    expr: str, tz: str, created: dt.datetime, gaps: list[int], failures: list[bool]
) -> None:
    """Ticks at random intervals (downtime included), some publications failing and retried."""
    c = cron.parse(expr, tz)
    cursor: dt.datetime | None = None
    now = created
    published: list[dt.datetime] = []
    for gap, fails in zip(gaps, failures, strict=False):
        now += dt.timedelta(seconds=gap)
        plan = cron.due_fires(c, cursor, created, now)
        if plan.fire is not None:
            assert plan.fire <= now
            assert now - plan.fire <= cron.STARTING_DEADLINE
            assert plan.fire > (cursor if cursor is not None else created)
            if fails:
                continue  # the caller keeps its cursor and tries again next tick
            published.append(plan.fire)
        assert plan.next is not None and plan.next > now
        cursor = plan.cursor
    assert published == sorted(set(published))  # strictly increasing: never one time twice


@given(EXPRS, INSTANTS, st.integers(0, 3 * 24 * 3600))
@settings(max_examples=150, deadline=None)
def test_plan_accounts_for_every_due_time(expr: str, last: dt.datetime, gap: int) -> None:
    """Published plus skipped is exactly the number of scheduled times since the cursor."""
    c = cron.parse(expr, "UTC")
    now = last + dt.timedelta(seconds=gap)
    plan = cron.due_fires(c, last, last, now)
    due = 0
    t = cron.next_fire(c, last)
    while t is not None and t <= now and due <= cron.MAX_COUNTED:
        due += 1
        t = cron.next_fire(c, t)
    if due <= cron.MAX_COUNTED:
        assert (1 if plan.fire else 0) + plan.skipped == due
    if plan.fire is not None:
        assert cron.next_fire(c, plan.fire) == plan.next or (plan.next is not None and plan.next > now)
