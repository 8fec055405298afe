"""The trading calendar: spec parsing, is_open at the edges, next_change, holidays, ALWAYS_OPEN."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.calendar import (
    ALWAYS_OPEN,
    DEFAULT_IME_SESSIONS,
    END_OF_DAY,
    SEARCH_DAYS,
    TradingCalendar,
    TradingSession,
)

SAT, SUN, MON, TUE, WED, THU, FRI = 5, 6, 0, 1, 2, 3, 4
IME = TradingCalendar.parse(DEFAULT_IME_SESSIONS)
US = timedelta(microseconds=1)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- parsing


@pytest.mark.parametrize(
    "spec",
    [
        "sat-wed 08:30-17:30",
        "sat,mon 10:00-12:30",
        "sat-mon,wed 10:00-12:30",
        "thu,fri 09:15:30-10:00",
        "sun 00:00-24:00",
        "sat-fri 00:00:00.250000-23:59",
    ],
)
def test_canonical_specs_round_trip(spec: str) -> None:
    assert str(TradingSession.parse(spec)) == spec


@pytest.mark.parametrize(
    ("spec", "weekdays", "canonical"),
    [
        ("sat-wed 08:45-17:00", {SAT, SUN, MON, TUE, WED}, "sat-wed 08:45-17:00"),
        ("SAT,Sun,mon 10:00-12:30", {SAT, SUN, MON}, "sat-mon 10:00-12:30"),
        ("  wed-sat   08:00-09:00 ", {WED, THU, FRI, SAT}, "sat,wed-fri 08:00-09:00"),  # ranges wrap fri → sat
        ("fri-sun 08:00-09:00", {FRI, SAT, SUN}, "sat,sun,fri 08:00-09:00"),
        ("sun-sat 08:00-09:00", set(range(7)), "sat-fri 08:00-09:00"),
        ("tue-tue,tue 08:00-09:00", {TUE}, "tue 08:00-09:00"),
        ("mon 22:00-00:00", {MON}, "mon 22:00-24:00"),  # an end at 00:00 is the midnight ending the day
    ],
)
def test_specs_are_read_in_the_iranian_week_order(spec: str, weekdays: set[int], canonical: str) -> None:
    session = TradingSession.parse(spec)
    assert session.weekdays == frozenset(weekdays)
    assert str(session) == canonical
    assert TradingSession.parse(canonical) == session


def test_a_parsed_session_has_the_written_times() -> None:
    assert TradingSession.parse("sat-wed 08:45-17:00") == TradingSession(
        frozenset({SAT, SUN, MON, TUE, WED}), time(8, 45), time(17, 0)
    )
    assert TradingSession.parse("thu 12:00-24:00").end == END_OF_DAY


# Times around midnight and the small hours too, where clocks change (Tehran's did at midnight until 2022).
times = st.times() | st.sampled_from([time(hour, minute) for hour in (0, 1, 2, 3, 22, 23) for minute in (0, 30)])
sessions = st.builds(
    lambda weekdays, pair, end_of_day: TradingSession(
        weekdays, min(pair), END_OF_DAY if end_of_day or min(pair) == max(pair) else max(pair)
    ),
    st.frozensets(st.integers(0, 6), min_size=1),
    st.lists(times, min_size=2, max_size=2),
    st.booleans(),
)


@given(sessions)
def test_every_session_round_trips_through_its_spec(session: TradingSession) -> None:
    assert TradingSession.parse(str(session)) == session


def test_calendar_specs_zone_and_holidays_round_trip() -> None:
    calendar = TradingCalendar.parse(
        ["sat-wed 08:30-12:00", "sat,sun 13:00-17:30"], zone="Asia/Tehran", holidays=["2026-03-20", "2026-03-21"]
    )
    again = eval(repr(calendar), {"TradingCalendar": TradingCalendar})
    assert (again.specs, again.zone, again.holidays) == (
        ("sat-wed 08:30-12:00", "sat,sun 13:00-17:30"),
        ZoneInfo("Asia/Tehran"),
        {date(2026, 3, 20), date(2026, 3, 21)},
    )
    assert again.sessions == calendar.sessions


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "expected 'DAYS HH:MM-HH:MM'"),
        ("sat-wed", "expected 'DAYS HH:MM-HH:MM'"),
        ("sat-wed 08:30", "expected 'DAYS HH:MM-HH:MM'"),
        ("sat-wed 08:30-17:30 extra", "expected 'DAYS HH:MM-HH:MM'"),
        ("saturday 08:30-17:30", "unknown day 'saturday'"),
        ("sat,,mon 08:30-17:30", "unknown day ''"),
        ("sat-mon-wed 08:30-17:30", "unknown day 'mon-wed'"),
        ("sat 8:30-17:30", "bad time '8:30'"),
        ("sat 08:30-17:60", "bad time '17:60'"),
        ("sat 24:00-24:00", "bad time '24:00'"),
        ("sat 08h30-17:30", "bad time '08h30'"),
        ("sat 17:30-08:30", "overnight sessions are not supported"),
        ("sat 08:30-08:30", "session end 08:30 is not after its start 08:30"),
    ],
)
def test_bad_specs_are_rejected_naming_the_spec(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"bad trading session {spec!r}: ") + ".*" + re.escape(reason)):
        TradingCalendar.parse(["sat-wed 08:30-17:30", spec])


def test_bad_calendar_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match=re.escape("bad holiday '2026-02-30'")):
        TradingCalendar.parse(DEFAULT_IME_SESSIONS, holidays=["2026-02-30"])
    with pytest.raises(ValueError, match=re.escape("unknown time zone 'Asia/Nowhere'")):
        TradingCalendar.parse(DEFAULT_IME_SESSIONS, zone="Asia/Nowhere")
    with pytest.raises(TypeError, match="not one string"):
        TradingCalendar.parse("sat-wed 08:30-17:30")
    with pytest.raises(ValueError, match="at least one session"):
        TradingCalendar.parse([])


@pytest.mark.parametrize(
    ("weekdays", "start", "end", "reason"),
    [
        (frozenset(), time(8), time(9), "at least one weekday"),
        (frozenset({7}), time(8), time(9), "0 (Monday) to 6 (Sunday)"),
        (frozenset({SAT}), time(8, tzinfo=UTC), time(9), "without tzinfo"),
        (frozenset({SAT}), time(22), time(2), "overnight sessions are not supported"),
    ],
)
def test_bad_sessions_are_rejected(weekdays: frozenset[int], start: time, end: time, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        TradingSession(weekdays, start, end)


def test_a_session_accepts_any_set_of_weekdays_and_stays_hashable() -> None:
    session = TradingSession({SAT, SUN}, time(8), time(9))  # type: ignore[arg-type]
    assert isinstance(session.weekdays, frozenset)
    assert hash(session) == hash(TradingSession(frozenset({SUN, SAT}), time(8), time(9)))


def test_default_ime_sessions_are_saturday_to_wednesday() -> None:
    assert IME.specs == ("sat-wed 08:30-17:30",)
    assert IME.zone == ZoneInfo("Asia/Tehran")


# --- is_open


@pytest.mark.parametrize(
    "saturday",
    ["2026-06-13", "2026-01-17"],  # summer and winter: Iran abolished DST in 2022, Tehran is UTC+03:30 all year
)
def test_open_from_start_inclusive_to_end_exclusive_given_utc(saturday: str) -> None:
    opens, closes = utc(f"{saturday}T05:00"), utc(f"{saturday}T14:00")  # 08:30 and 17:30 at +03:30
    assert not IME.is_open(opens - US)
    assert IME.is_open(opens)
    assert IME.is_open(closes - US)
    assert not IME.is_open(closes)


def test_the_zone_data_knows_tehran_had_dst_before_2022() -> None:
    opens = utc("2021-06-12T04:00")  # Saturday 08:30 at +04:30
    assert not IME.is_open(opens - US)
    assert IME.is_open(opens)
    assert not IME.is_open(utc("2021-06-12T13:00"))  # 17:30 at +04:30


def test_open_saturday_to_wednesday_closed_thursday_and_friday() -> None:
    noon = [datetime(2026, 6, day, 12, tzinfo=IME.zone) for day in range(13, 20)]  # Saturday 13th to Friday 19th
    assert [at.weekday() for at in noon] == [SAT, SUN, MON, TUE, WED, THU, FRI]
    assert [IME.is_open(at) for at in noon] == [True] * 5 + [False] * 2


def test_instants_are_compared_whatever_their_zone() -> None:
    new_york = ZoneInfo("America/New_York")
    assert IME.is_open(datetime(2026, 6, 13, 1, 0, tzinfo=new_york))  # 05:00 UTC, 08:30 in Tehran
    assert not IME.is_open(datetime(2026, 6, 13, 0, 59, tzinfo=new_york))


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        IME.is_open(datetime(2026, 6, 13, 10, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        IME.next_change(datetime(2026, 6, 13, 10, 0))


def test_holidays_are_closed_all_day() -> None:
    calendar = TradingCalendar.parse(DEFAULT_IME_SESSIONS, holidays=["2026-06-14"])  # a Sunday
    assert not calendar.is_open(datetime(2026, 6, 14, 12, tzinfo=calendar.zone))
    assert calendar.is_open(datetime(2026, 6, 13, 12, tzinfo=calendar.zone))
    assert calendar.is_open(datetime(2026, 6, 15, 12, tzinfo=calendar.zone))
    # Saturday's close is followed by Monday's open, skipping the holiday.
    assert calendar.next_change(datetime(2026, 6, 13, 17, 30, tzinfo=calendar.zone)) == utc("2026-06-15T05:00")


class _AskedDays:
    """A public-holiday container that records which days it was asked about (as holidays.HolidayBase is)."""

    def __init__(self, *days: date) -> None:
        self.days = set(days)
        self.asked: set[date] = set()

    def __contains__(self, day: object) -> bool:
        assert isinstance(day, date)
        self.asked.add(day)
        return day in self.days


def test_public_holidays_are_asked_per_day_and_add_to_the_listed_ones() -> None:
    """A maintained calendar is consulted day by day (so it covers any year the bridge runs through), and its
    days close the calendar like listed holidays; next_change skips them."""
    public = _AskedDays(date(2031, 6, 14))  # a Saturday, years from the holidays any list was built for
    calendar = TradingCalendar.parse(DEFAULT_IME_SESSIONS, holidays=["2031-06-15"], public_holidays=public)
    assert not calendar.is_open(datetime(2031, 6, 14, 12, tzinfo=calendar.zone))
    assert not calendar.is_open(datetime(2031, 6, 15, 12, tzinfo=calendar.zone))
    assert calendar.is_open(datetime(2031, 6, 16, 12, tzinfo=calendar.zone))
    assert date(2031, 6, 14) in public.asked
    assert calendar.next_change(datetime(2031, 6, 11, 17, 30, tzinfo=calendar.zone)) == utc("2031-06-16T05:00")
    assert calendar.is_holiday(date(2031, 6, 14))
    assert calendar.is_holiday(date(2031, 6, 15))
    assert not calendar.is_holiday(date(2031, 6, 16))
    assert repr(calendar).endswith("holidays=['2031-06-15'], public_holidays=<_AskedDays>)")


def test_holidays_package_iran_closes_nowruz() -> None:
    """The holidays package's Iran, as ime.holiday_calendar: IR passes it: Nowruz 1405 (2026-03-21, a
    Saturday) is closed all day."""
    calendar = TradingCalendar.parse(DEFAULT_IME_SESSIONS, public_holidays=holidays.country_holidays("IR"))
    assert not calendar.is_open(datetime(2026, 3, 21, 12, tzinfo=calendar.zone))
    assert calendar.is_open(datetime(2026, 3, 28, 12, tzinfo=calendar.zone))


# --- next_change


@pytest.mark.parametrize(
    ("at", "change"),
    [
        ("2026-06-13T04:00", "2026-06-13T05:00"),  # Saturday before the open: the open
        ("2026-06-13T04:59:59.999999", "2026-06-13T05:00"),
        ("2026-06-13T05:00", "2026-06-13T14:00"),  # at the open: the close
        ("2026-06-13T10:00", "2026-06-13T14:00"),
        ("2026-06-13T14:00", "2026-06-14T05:00"),  # at the close: the next day's open
        ("2026-06-17T15:00", "2026-06-20T05:00"),  # Wednesday evening: over the weekend to Saturday
        ("2026-06-18T10:00", "2026-06-20T05:00"),  # Thursday
        ("2026-06-19T23:00", "2026-06-20T05:00"),  # Friday night, already Saturday in Tehran
    ],
)
def test_next_change(at: str, change: str) -> None:
    result = IME.next_change(utc(at))
    assert result == utc(change)
    assert result.tzinfo is UTC


def test_touching_and_overlapping_sessions_make_one_span() -> None:
    calendar = TradingCalendar.parse(
        ["sat 08:00-12:00", "sat 12:00-14:00", "sat 13:00-17:00", "sat 20:00-24:00", "sun 00:00-02:00"], zone="UTC"
    )
    assert calendar.next_change(utc("2026-06-13T09:00")) == utc("2026-06-13T17:00")
    assert calendar.is_open(utc("2026-06-13T12:00"))
    assert calendar.next_change(utc("2026-06-13T21:00")) == utc("2026-06-14T02:00")


def test_a_calendar_that_never_opens_is_an_error() -> None:
    saturdays = [(date(2026, 6, 13) + timedelta(weeks=week)).isoformat() for week in range(SEARCH_DAYS // 7 + 2)]
    calendar = TradingCalendar.parse(["sat 08:00-09:00"], holidays=saturdays)
    with pytest.raises(ValueError, match="never opens within 400 days"):
        calendar.next_change(utc("2026-06-12T00:00"))


@pytest.mark.parametrize(
    "at", ["2026-06-13T00:00", "2026-06-18T12:00", "2026-06-19T23:59:59.999999", "2030-01-01T00:00"]
)
def test_always_open(at: str) -> None:
    instant = utc(at)
    assert ALWAYS_OPEN.is_open(instant)
    horizon = ALWAYS_OPEN.next_change(instant)
    assert horizon - instant >= timedelta(days=SEARCH_DAYS)
    assert ALWAYS_OPEN.is_open(horizon - US)


# --- the property the watchdog relies on

zones = st.sampled_from(["Asia/Tehran", "UTC", "Europe/London", "America/New_York"])
CLOCK_CHANGES = [  # Tehran's last ones, then London's and New York's in 2026
    utc("2022-03-21T20:30"),
    utc("2022-09-21T19:30"),
    utc("2026-03-29T01:00"),
    utc("2026-10-25T01:00"),
    utc("2026-03-08T07:00"),
    utc("2026-11-01T06:00"),
]
instants = st.datetimes(
    min_value=datetime(2015, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
) | st.builds(
    lambda change, offset: change + timedelta(microseconds=offset),
    st.sampled_from(CLOCK_CHANGES),
    st.integers(-3 * 86_400_000_000, 3 * 86_400_000_000),
)
calendars = st.builds(
    lambda sessions, zone, holidays: TradingCalendar(sessions, ZoneInfo(zone), holidays),
    st.lists(sessions, min_size=1, max_size=4),
    zones,
    st.lists(st.dates(min_value=date(2015, 1, 1), max_value=date(2035, 1, 1)), max_size=5),
)


def assert_holds_until_next_change(calendar: TradingCalendar, at: datetime, fractions: list[float]) -> None:
    """is_open(at) holds at sampled instants until next_change(at), and flips there."""
    change = calendar.next_change(at)
    assert change > at
    state = calendar.is_open(at)
    span = change - at - US  # timedelta * float rounds to the microsecond: stay short of `change`
    for fraction in fractions:
        assert calendar.is_open(at + span * fraction) == state
    assert calendar.is_open(change - US) == state
    # A drawn calendar can be open all along; next_change then gives the end of its search.
    assert calendar.is_open(change) != state or (state and change - at >= timedelta(days=SEARCH_DAYS))


@given(
    st.one_of(st.just(IME), calendars),
    instants,
    st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), min_size=1, max_size=5),
)
def test_is_open_holds_until_next_change_and_flips_there(
    calendar: TradingCalendar, at: datetime, fractions: list[float]
) -> None:
    assert_holds_until_next_change(calendar, at, fractions)


@pytest.mark.parametrize(
    "specs",
    [
        ["fri 00:00-01:00"],
        ["sat-fri 00:00-00:30", "fri 00:00-01:00"],
        ["sat-fri 00:00-24:00", "sat-thu 00:00:00.000001-00:30"],
        ["fri 00:30-01:00", "sat 00:00-00:10"],  # Friday's session comes after Saturday's
    ],
)
def test_a_skipped_day_keeps_is_open_and_next_change_in_agreement(specs: list[str]) -> None:
    # Samoa skipped Friday 2011-12-30 (10:00 UTC went from Thursday 24:00 to Saturday 00:00). Its sessions
    # are read with the offset before the change, so they land on Saturday morning, and must not be lost.
    calendar = TradingCalendar.parse(specs, zone="Pacific/Apia")
    skipped = utc("2011-12-30T10:00")
    for step in range(-8, 9):
        assert_holds_until_next_change(calendar, skipped + step * timedelta(minutes=15), [0.5])
    assert calendar.is_open(skipped + timedelta(minutes=5))


def test_a_session_inside_a_skipped_hour_never_opens() -> None:
    # London skipped 01:00-02:00 on 2026-03-29: 01:30, read with GMT, is 02:30 BST, after the 02:10 end.
    calendar = TradingCalendar.parse(["sun 01:30-02:10"], zone="Europe/London")
    assert not calendar.is_open(utc("2026-03-29T01:05"))
    assert calendar.next_change(utc("2026-03-29T00:00")) == utc("2026-04-05T00:30")  # the next Sunday, in BST


def test_a_repeated_wall_time_is_read_as_its_first_occurrence() -> None:
    # Tehran's clocks went back from 24:00 to 23:00 on 2021-09-21: 23:30 happened twice.
    session = TradingSession(frozenset({TUE}), time(23, 30, fold=1), END_OF_DAY)
    assert (session.start.fold, session.end.fold) == (0, 0)
    calendar = TradingCalendar([session])
    assert calendar.next_change(utc("2021-09-21T18:00")) == utc("2021-09-21T19:00")  # 23:30 at +04:30
