"""zonecheck: zone-less timestamps lagging by whole half hours are reported as a wrong ime.naive_timezone."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest

from bridge.zonecheck import NaiveZoneCheck, NaiveZoneWarning, format_offset
from tests.unit.test_pipeline import BY_ID, make_pipeline

TEHRAN = ZoneInfo("Asia/Tehran")
START = datetime(2026, 5, 23, 9, 0, tzinfo=UTC).timestamp()  # a Saturday, in session in Tehran
HOURS_3_5 = 3.5 * 3600


def feed(
    check: NaiveZoneCheck, lags: Iterable[float], *, step: float = 1.0, start: float = START
) -> list[tuple[float, NaiveZoneWarning]]:
    """Offer one lag per `step` seconds; the warnings returned, with when."""
    warnings = []
    for index, lag in enumerate(lags):
        now = start + index * step
        warning = check.observe(lag, now)
        if warning is not None:
            warnings.append((now, warning))
    return warnings


def noisy(center: float, count: int, spread: float = 5.0, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [center + rng.uniform(-spread, spread) for _ in range(count)]


def test_tehran_wall_time_read_as_utc_is_reported_once_with_the_offset_that_explains_it() -> None:
    """The likely mistake: the exchange writes Tehran wall time, read as UTC it is 3.5 h in the future."""
    check = NaiveZoneCheck(UTC)
    warnings = feed(check, noisy(-HOURS_3_5, 300))

    assert len(warnings) == 1
    when, warning = warnings[0]
    assert when - START >= 60  # at least a minute of samples
    assert warning.fields() == {
        "setting": "ime.naive_timezone",
        "value": "UTC",
        "median_lag_seconds": pytest.approx(-HOURS_3_5, abs=5),
        "implied_offset": "+03:30",
        "samples": warning.samples,
        "agreeing": 1.0,
        "suggested": "Asia/Tehran",
    }
    assert 50 <= warning.samples <= 120


@pytest.mark.parametrize(
    ("zone", "lag", "implied", "suggested"),
    [
        (UTC, HOURS_3_5, "-03:30", None),  # timestamps 3.5 h behind receive time, read as UTC
        (TEHRAN, HOURS_3_5, "+00:00", "UTC"),  # UTC timestamps read as Tehran wall time
        (UTC, -7200.0, "+02:00", None),
        (TEHRAN, -1800.0, "+04:00", None),
    ],
)
def test_the_implied_offset_is_the_configured_offset_minus_the_lag(
    zone: tzinfo, lag: float, implied: str, suggested: str | None
) -> None:
    warnings = feed(NaiveZoneCheck(zone), noisy(lag, 120))

    assert [(warning.implied_offset, warning.suggested) for _, warning in warnings] == [(implied, suggested)]
    assert warnings[0][1].naive_timezone == str(getattr(zone, "key", zone))


@pytest.mark.parametrize("center", [0.0, 2.0, -3.0, 45.0, 400.0])
def test_a_lag_of_seconds_or_minutes_is_no_zone_mistake(center: float) -> None:
    assert feed(NaiveZoneCheck(UTC), noisy(center, 600)) == []


@pytest.mark.parametrize(
    ("count", "step"),
    [
        (49, 2.0),  # 49 samples over 96 s: too few
        (3000, 0.01),  # 3000 frames over 30 s: at most one sample a second, 30 samples, under a minute
        (59, 1.0),  # 59 samples over 58 s: a minute not yet covered
    ],
)
def test_too_few_samples_or_too_short_a_span_is_no_verdict(count: int, step: float) -> None:
    assert feed(NaiveZoneCheck(UTC), noisy(-HOURS_3_5, count), step=step) == []


def test_one_sample_a_second_at_most_however_fast_frames_come() -> None:
    """100 frames a second for 2 minutes: the verdict comes after a minute, from one sample a second."""
    warnings = feed(NaiveZoneCheck(UTC), noisy(-HOURS_3_5, 12_000), step=0.01)

    assert len(warnings) == 1
    when, warning = warnings[0]
    assert 60 <= when - START < 62
    assert 50 <= warning.samples <= 62


@pytest.mark.parametrize(
    "lags",
    [
        # half the samples near 0, half near -3.5 h, interleaved: no consistent lag
        [lag for pair in zip(noisy(0, 100), noisy(-HOURS_3_5, 100), strict=True) for lag in pair],
        # 70% near -3.5 h, 30% spread over hours: most, but not 80%, agree
        [lag if index % 10 < 7 else lag + 5000 * (index % 3 + 1) for index, lag in enumerate(noisy(-HOURS_3_5, 300))],
        # spread uniformly over ±5 h
        noisy(0, 300, spread=5 * 3600),
        # near a quarter hour between two half hours (45 min): outside the ±10 min tolerance
        noisy(2700, 300),
        # two days late: no zone is 48 h away, this is stale data
        noisy(48 * 3600, 300),
    ],
    ids=["split", "70-percent", "uniform", "quarter-hour", "two-days"],
)
def test_mixed_noisy_or_implausible_lags_are_no_verdict(lags: list[float]) -> None:
    assert feed(NaiveZoneCheck(UTC), lags) == []


def test_a_persisting_mistake_is_reported_at_most_once_an_hour() -> None:
    """Three hours of samples (the frames' receive times are the clock): a warning at the first minute, then
    one an hour."""
    warnings = feed(NaiveZoneCheck(UTC), noisy(-HOURS_3_5, 3 * 3600 + 120))

    times = [when - START for when, _ in warnings]
    assert len(times) == 4
    assert 60 <= times[0] < 120
    assert all(later - earlier >= 3600 for earlier, later in itertools.pairwise(times))
    assert all(warning.samples == 120 for _, warning in warnings[1:])  # the window stays bounded


def test_a_mistake_that_goes_away_is_not_reported_again() -> None:
    check = NaiveZoneCheck(UTC)
    assert len(feed(check, noisy(-HOURS_3_5, 120))) == 1
    # ime.naive_timezone aside, the exchange now writes UTC: the window turns over, nothing more is said
    assert feed(check, noisy(1.0, 3 * 3600), start=START + 120) == []


def test_hostile_inputs_never_raise() -> None:
    check = NaiveZoneCheck(UTC)
    lags = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 0.0]
    assert feed(check, lags * 30) == []
    assert check.observe(-HOURS_3_5, float("nan")) is None
    assert check.observe(-HOURS_3_5, 1e30) is None
    # the wall clock stepping back restarts the window instead of misjudging the span
    assert feed(check, noisy(-HOURS_3_5, 30), start=START + 10_000) == []
    assert feed(check, noisy(-HOURS_3_5, 59), start=START) == []


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "+00:00"), (12600, "+03:30"), (-12600, "-03:30"), (-1800, "-00:30"), (50400, "+14:00"), (20700, "+05:45")],
)
def test_format_offset(seconds: float, text: str) -> None:
    assert format_offset(seconds) == text


# --- Through the pipeline: frames with zone-less timestamps, the default naive zone (UTC).


def legacy_frame(contract_id: str, timestamp: str, value: int) -> str:
    return json.dumps(
        {
            "channel": "IME Stream",
            "ContractId": contract_id,
            "timestamp": timestamp,
            "data": {"ContractInfo": {"open_interest": value, "open_interest_changes": 0}},
        }
    )


def run_frames(offset: timedelta, *, naive: bool, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Three minutes of two frames a second whose timestamps are `offset` from their receive time."""
    pipeline, metrics = make_pipeline(capacity=1000)
    caplog.set_level(logging.WARNING, logger="bridge.pipeline")
    for index in range(360):
        received = START + index / 2
        written = datetime.fromtimestamp(received, UTC) + offset
        timestamp = written.replace(tzinfo=None).isoformat(timespec="microseconds") + ("" if naive else "Z")
        raw = legacy_frame("1001" if index % 2 else "1002", timestamp, index)
        pipeline.on_frame(raw, round(received * 1e6), BY_ID)
    assert metrics.registry.get_sample_value("ime_bridge_messages_rejected_total", {"reason": "internal_error"}) is None
    assert len(pipeline.buffer) > 0
    return [record for record in caplog.records if record.getMessage() == "naive_timestamps_lag"]


@pytest.mark.parametrize(
    ("offset", "implied"),
    [
        (timedelta(hours=-3.5), "-03:30"),  # naive timestamps 3.5 h behind their receive time
        (timedelta(hours=3.5), "+03:30"),  # Tehran wall time, read as UTC: 3.5 h ahead
    ],
)
def test_pipeline_logs_the_warning_once(offset: timedelta, implied: str, caplog: pytest.LogCaptureFixture) -> None:
    records = run_frames(offset, naive=True, caplog=caplog)

    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    fields = records[0].__dict__["event_fields"]
    assert fields["setting"] == "ime.naive_timezone"
    assert fields["value"] == "UTC"
    assert fields["implied_offset"] == implied
    assert fields["median_lag_seconds"] == pytest.approx(-offset.total_seconds(), abs=1)


def test_pipeline_says_nothing_of_timestamps_with_a_zone_or_on_time(caplog: pytest.LogCaptureFixture) -> None:
    assert run_frames(timedelta(hours=3.5), naive=False, caplog=caplog) == []  # `Z`: not the setting's doing
    assert run_frames(timedelta(seconds=-0.2), naive=True, caplog=caplog) == []
