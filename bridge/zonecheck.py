"""Is `ime.naive_timezone` right? A pure, cheap check on the exchange lag of frames whose timestamp had no zone.

A zone-less timestamp read in the wrong zone is off by the difference of two UTC offsets, a whole number of
half hours for every zone IME could use, and nothing else would say so: the lag histogram would just show
hours. With lag = receive time - exchange time, lag ≈ (offset of the configured zone) - (offset of the zone
the exchange writes in): Tehran wall time read as UTC lags -3.5 h (timestamps in the future), UTC read as
Asia/Tehran +3.5 h. `NaiveZoneCheck` keeps at most one sample per `sample_interval` seconds in a bounded
window and, once the window holds `min_samples` over `min_span_seconds`, reports when most samples sit
within `tolerance_seconds` of the same non-zero whole number of half hours: once, then at most once per
`repeat_seconds` while it persists. docs/protocol.md ("Timestamps without a zone") explains the choice.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HALF_HOUR = 1800.0
# UTC offsets of real zones span -12:00 to +14:00: a lag implying anything else is not a zone mistake.
_OFFSET_RANGE = (-12 * 3600.0, 14 * 3600.0)
# Zones worth naming when the implied offset matches theirs (IME is in Tehran; the ht document says UTC).
_CANDIDATES = ("UTC", "Asia/Tehran")


@dataclass(frozen=True, slots=True)
class NaiveZoneWarning:
    """The lag of zone-less timestamps looks like a wrong `ime.naive_timezone`."""

    naive_timezone: str
    median_lag_seconds: float
    implied_offset: str  # the UTC offset the timestamps seem to be written in, e.g. "+03:30"
    samples: int
    agreeing: float  # share of the samples near the same whole number of half hours
    suggested: str | None  # a candidate zone with that offset, if any

    def fields(self) -> dict[str, object]:
        """Short key=value fields for the `naive_timestamps_lag` log line."""
        fields: dict[str, object] = {
            "setting": "ime.naive_timezone",
            "value": self.naive_timezone,
            "median_lag_seconds": self.median_lag_seconds,
            "implied_offset": self.implied_offset,
            "samples": self.samples,
            "agreeing": self.agreeing,
        }
        if self.suggested is not None:
            fields["suggested"] = self.suggested
        return fields


def format_offset(seconds: float) -> str:
    """A UTC offset in seconds as `+hh:mm` / `-hh:mm`."""
    minutes = round(seconds / 60)
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def _offset_seconds(zone: tzinfo, at: float) -> float:
    """`zone`'s UTC offset at epoch second `at` (0 if it cannot be told)."""
    try:
        offset = datetime.fromtimestamp(at, zone).utcoffset()
    except (OverflowError, OSError, ValueError):
        offset = None
    return 0.0 if offset is None else offset.total_seconds()


class NaiveZoneCheck:
    """Fed the lag of frames whose timestamp had no zone; says when it looks like a wrong `ime.naive_timezone`.

    Cost per frame: one call and one comparison, except on the (at most one per `sample_interval`) sampled
    frame, which appends to a window of at most `window` samples and sorts it. Memory: that window.
    Time is the frame's receive time (epoch seconds), so the check needs no clock and tests need no sleep.
    """

    def __init__(
        self,
        naive_timezone: tzinfo,
        *,
        name: str | None = None,
        sample_interval: float = 1.0,
        window: int = 120,
        min_samples: int = 50,
        min_span_seconds: float = 60.0,
        tolerance_seconds: float = 600.0,
        agreement: float = 0.8,
        repeat_seconds: float = 3600.0,
    ) -> None:
        if not 1 <= min_samples <= window:
            raise ValueError("need 1 <= min_samples <= window")
        self.zone = naive_timezone
        self.name = name or getattr(naive_timezone, "key", None) or str(naive_timezone)
        self.sample_interval = sample_interval
        self.min_samples = min_samples
        self.min_span_seconds = min_span_seconds
        self.tolerance_seconds = tolerance_seconds
        self.agreement = agreement
        self.repeat_seconds = repeat_seconds
        self._window: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self._last_sample = -math.inf
        self._next_sample = -math.inf
        self._warned_at: float | None = None

    def observe(self, lag_seconds: float, now: float) -> NaiveZoneWarning | None:
        """Offer the lag of one frame with a zone-less timestamp, received at `now` (epoch seconds).

        Returns a warning when one is due, else None. Never raises."""
        if self._last_sample <= now < self._next_sample:
            return None
        return self._sample(lag_seconds, now)

    def _sample(self, lag: float, now: float) -> NaiveZoneWarning | None:
        if not (math.isfinite(lag) and math.isfinite(now)):
            return None
        window = self._window
        if now < self._last_sample:  # the wall clock stepped back: start over rather than misjudge the span
            window.clear()
        self._last_sample, self._next_sample = now, now + self.sample_interval
        window.append((now, lag))
        if len(window) < self.min_samples or now - window[0][0] < self.min_span_seconds:
            return None
        lags = sorted(sample for _, sample in window)
        middle = len(lags) // 2
        median = lags[middle] if len(lags) % 2 else (lags[middle - 1] + lags[middle]) / 2
        steps = round(median / HALF_HOUR)
        target = steps * HALF_HOUR
        tolerance = self.tolerance_seconds
        if steps == 0 or abs(median - target) > tolerance:
            return None
        agreeing = sum(1 for sample in lags if abs(sample - target) <= tolerance) / len(lags)
        if agreeing < self.agreement:
            return None
        implied = _offset_seconds(self.zone, now) - target
        if not _OFFSET_RANGE[0] <= implied <= _OFFSET_RANGE[1]:
            return None
        if self._warned_at is not None and 0 <= now - self._warned_at < self.repeat_seconds:
            return None
        self._warned_at = now
        return NaiveZoneWarning(
            self.name,
            round(median, 1),
            format_offset(implied),
            len(lags),
            round(agreeing, 3),
            self._suggest(implied, now),
        )

    def _suggest(self, implied: float, now: float) -> str | None:
        for candidate in _CANDIDATES:
            if candidate == self.name:
                continue
            zone = _zone(candidate)
            if zone is not None and _offset_seconds(zone, now) == implied:
                return candidate
        return None


def _zone(name: str) -> tzinfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
