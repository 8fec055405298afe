"""IME trading sessions: when the exchange can be expected to send updates.

Pure and synchronous. IME sends a contract's snapshot only when it changes and is silent outside its
sessions, so the data watchdog asks `is_open` before calling a quiet feed stale, and `next_change` to know
when to look again.

`DEFAULT_IME_SESSIONS` is a default, not a fact: IME changes its hours (Ramadan hours; a move of Iran's
weekend has been discussed), so operators configure the sessions and holidays. Public holidays can come from
a maintained calendar (`public_holidays`, e.g. the `holidays` package's Iran, whose lunar dates move every
year), consulted day by day so that it covers whatever years the bridge runs through. Tehran has kept
UTC+03:30 all year since Iran abolished daylight saving time in 2022; the zone data knows the earlier years.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

TEHRAN = ZoneInfo("Asia/Tehran")

# Saturday to Wednesday, one window covering IME's markets, Tehran time: the physical market trades in the
# morning, the derivatives (futures ~10:00-17:00 in recent years) through the afternoon.
DEFAULT_IME_SESSIONS: tuple[str, ...] = ("sat-wed 08:30-17:30",)

# Day names in the Iranian week order, Saturday first; ranges in specs wrap through this order.
DAY_NAMES = ("sat", "sun", "mon", "tue", "wed", "thu", "fri")
_WEEKDAY_OF_NAME = {name: (position + 5) % 7 for position, name in enumerate(DAY_NAMES)}  # sat → 5 (Saturday)

END_OF_DAY = time(0)  # as a session's end: the midnight that ends the day, written 24:00 in specs
SEARCH_DAYS = 400  # how far ahead next_change looks

_ONE_DAY = timedelta(days=1)
_SPEC = re.compile(r"(?P<days>\S+)\s+(?P<start>[^\s-]+)-(?P<end>[^\s-]+)")
_TIME = re.compile(r"\d{2}:\d{2}(?::\d{2}(?:\.\d{6})?)?")
_SPEC_SHAPE = "expected 'DAYS HH:MM-HH:MM' such as 'sat-wed 08:30-17:30' or 'sat,sun,mon 10:00-12:30'"


@dataclass(frozen=True)
class TradingSession:
    """One weekly session: on each of `weekdays` (Monday=0 … Sunday=6), open from `start` until, not at, `end`.

    Times are wall-clock times in the calendar's zone; an `end` of time(0) is the midnight ending the day.
    """

    weekdays: frozenset[int]
    start: time
    end: time

    def __post_init__(self) -> None:
        object.__setattr__(self, "weekdays", frozenset(self.weekdays))  # a set would make the session unhashable
        # fold=1 would read a repeated wall time as its second occurrence; equal sessions must behave alike.
        object.__setattr__(self, "start", self.start.replace(fold=0))
        object.__setattr__(self, "end", self.end.replace(fold=0))
        if not self.weekdays:
            raise ValueError("a trading session needs at least one weekday")
        if not self.weekdays <= frozenset(range(7)):
            raise ValueError(f"weekdays are 0 (Monday) to 6 (Sunday), got {sorted(self.weekdays)}")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("session times are wall-clock times in the calendar's zone: give them without tzinfo")
        if self.end != END_OF_DAY and self.end <= self.start:
            raise ValueError(
                f"session end {_format_time(self.end)} is not after its start {_format_time(self.start)}: "
                "overnight sessions are not supported, split them at midnight"
            )

    @classmethod
    def parse(cls, spec: str) -> TradingSession:
        """Read a spec such as "sat-wed 08:45-17:00" or "sat,sun,mon 10:00-12:30" (end 24:00 = midnight)."""
        match = _SPEC.fullmatch(spec.strip())
        if match is None:
            raise ValueError(f"bad trading session {spec!r}: {_SPEC_SHAPE}")
        weekdays = _parse_days(match["days"], spec)
        start = _parse_time(match["start"], spec)
        end = END_OF_DAY if match["end"] == "24:00" else _parse_time(match["end"], spec)
        try:
            return cls(weekdays, start, end)
        except ValueError as exc:
            raise ValueError(f"bad trading session {spec!r}: {exc}") from None

    def __str__(self) -> str:
        """The spec `parse` reads back to this session."""
        end = "24:00" if self.end == END_OF_DAY else _format_time(self.end)
        return f"{_format_days(self.weekdays)} {_format_time(self.start)}-{end}"


class TradingCalendar:
    """Weekly sessions in a time zone, minus holidays: when the exchange is open.

    A session on a day is the span of instants from its start to its end, both read as wall-clock times in
    `zone` on that day (for a clock change, Python's default reading: a time skipped or repeated is taken
    with the offset in force before the change); holidays are whole days in `zone`: the listed `holidays`
    and any day in `public_holidays` (a container asked per day, such as a `holidays.HolidayBase`).
    """

    def __init__(
        self,
        sessions: Sequence[TradingSession],
        zone: ZoneInfo = TEHRAN,
        holidays: Collection[date] = (),
        public_holidays: Container[date] | None = None,
    ) -> None:
        if not sessions:
            raise ValueError("a trading calendar needs at least one session")
        self.sessions = tuple(sessions)
        self.zone = zone
        self.holidays = frozenset(holidays)
        self.public_holidays = public_holidays
        self._by_weekday = tuple(
            tuple(session for session in self.sessions if weekday in session.weekdays) for weekday in range(7)
        )

    @classmethod
    def parse(
        cls,
        specs: Sequence[str],
        zone: str = "Asia/Tehran",
        holidays: Sequence[str] = (),
        public_holidays: Container[date] | None = None,
    ) -> TradingCalendar:
        """A calendar from session specs (see `TradingSession.parse`), a zone name, ISO holiday dates and an
        optional maintained public-holiday calendar."""
        if isinstance(specs, str):
            raise TypeError("specs is a sequence of session specs, not one string")
        try:
            tz = ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r}") from None
        days = []
        for text in holidays:
            try:
                days.append(date.fromisoformat(text))
            except ValueError:
                raise ValueError(f"bad holiday {text!r}: expected a date such as 2026-03-20") from None
        return cls([TradingSession.parse(spec) for spec in specs], tz, days, public_holidays)

    @property
    def specs(self) -> tuple[str, ...]:
        """The sessions as specs, for configuration and logs."""
        return tuple(str(session) for session in self.sessions)

    def __repr__(self) -> str:
        holidays = sorted(day.isoformat() for day in self.holidays)
        public = "" if self.public_holidays is None else f", public_holidays=<{type(self.public_holidays).__name__}>"
        return f"TradingCalendar.parse({list(self.specs)!r}, zone={self.zone.key!r}, holidays={holidays!r}{public})"

    def is_open(self, at: datetime) -> bool:
        """Whether a session is open at the aware instant `at`."""
        day = self._local_day(at)
        # Neighbouring days too: a clock change can move a session's instants across midnight.
        return any(
            start <= at < end for offset in (-1, 0, 1) for start, end in self._day_spans(day + offset * _ONE_DAY)
        )

    def next_change(self, at: datetime) -> datetime:
        """The first instant after `at` when the calendar opens or closes, in UTC (safe for arithmetic).

        When it stays open for the whole search (ALWAYS_OPEN), the end of the search, a little more than
        SEARCH_DAYS days ahead: ask again then. ValueError when it stays closed that long: it never opens.
        """
        for start, end in self._merged_spans(self._local_day(at) - _ONE_DAY):
            if at < start:
                return start
            if at < end:
                return end
        raise ValueError(f"the trading calendar never opens within {SEARCH_DAYS} days after {at.isoformat()}")

    def is_holiday(self, day: date) -> bool:
        """Whether local `day` is a listed holiday or one of `public_holidays`."""
        return day in self.holidays or (self.public_holidays is not None and day in self.public_holidays)

    def _local_day(self, at: datetime) -> date:
        if at.utcoffset() is None:
            raise ValueError(f"a timezone-aware datetime is needed, got {at.isoformat()}")
        return at.astimezone(self.zone).date()

    def _day_spans(self, day: date) -> list[tuple[datetime, datetime]]:
        """The open spans of the sessions on local `day`, as UTC instants."""
        if self.is_holiday(day):
            return []
        spans = []
        for session in self._by_weekday[day.weekday()]:
            start = datetime.combine(day, session.start, self.zone).astimezone(UTC)
            end_day = day + _ONE_DAY if session.end == END_OF_DAY else day
            end = datetime.combine(end_day, session.end, self.zone).astimezone(UTC)
            if start < end:  # a session inside a skipped hour can come out empty
                spans.append((start, end))
        return spans

    def _merged_spans(self, first: date) -> Iterator[tuple[datetime, datetime]]:
        """Open spans of local days `first` to `first` + SEARCH_DAYS + 2 in time order, overlapping or touching
        ones merged. A span is settled once it ends before the next day's midnight, before which no later day's
        sessions start."""
        pending: list[tuple[datetime, datetime]] = []
        for offset in range(SEARCH_DAYS + 3):
            day = first + offset * _ONE_DAY
            pending = _merge(sorted(pending + self._day_spans(day)))
            # Sorting across days matters only where a clock change moves a day's sessions past the next day's
            # (Samoa skipped 2011-12-30).
            settled = datetime.combine(day + _ONE_DAY, time(0), self.zone).astimezone(UTC)
            while pending and pending[0][1] < settled:
                yield pending.pop(0)
        yield from pending


def _merge(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Sorted spans with the overlapping or touching ones joined."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _parse_days(text: str, spec: str) -> frozenset[int]:
    weekdays: set[int] = set()
    for item in text.lower().split(","):
        first, dash, last = item.partition("-")
        names = [first, last] if dash else [first]
        for name in names:
            if name not in _WEEKDAY_OF_NAME:
                raise ValueError(f"bad trading session {spec!r}: unknown day {name!r} (days: {' '.join(DAY_NAMES)})")
        begin, stop = DAY_NAMES.index(names[0]), DAY_NAMES.index(names[-1])
        for step in range((stop - begin) % 7 + 1):
            weekdays.add(_WEEKDAY_OF_NAME[DAY_NAMES[(begin + step) % 7]])
    return frozenset(weekdays)


def _parse_time(text: str, spec: str) -> time:
    if _TIME.fullmatch(text):
        try:
            return time.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(
        f"bad trading session {spec!r}: bad time {text!r} (expected HH:MM, 00:00 to 23:59, or 24:00 as end)"
    )


def _format_time(value: time) -> str:
    return value.isoformat("minutes" if not (value.second or value.microsecond) else "auto")


def _format_days(weekdays: frozenset[int]) -> str:
    """Days in the Iranian week order, runs of three or more as ranges: {5, 6, 0, 1, 2} → "sat-wed"."""
    names = [name for name in DAY_NAMES if _WEEKDAY_OF_NAME[name] in weekdays]
    runs: list[list[str]] = []
    for name in names:
        if runs and DAY_NAMES.index(name) == DAY_NAMES.index(runs[-1][-1]) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) >= 3 else ",".join(run) for run in runs)


# Never closes: for tests, and for operators who want the data watchdog on at all hours.
ALWAYS_OPEN = TradingCalendar.parse(["sat-fri 00:00-24:00"], zone="UTC")
