"""Rejection logs are rate-limited per reason; the metric and the dead letters still account for every frame."""

from __future__ import annotations

import json
import logging

import pytest

from bridge.logs import RateLimitedLog, log_event
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.records import RecordKind
from tests.unit.test_pipeline import BY_ID, frame, make_pipeline, sample, take_all

LOGGER = "tests.rejections"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [getattr(record, "event_fields", {}) for record in caplog.records if record.getMessage() == name]


def limited(clock: FakeClock, burst: int = 5, window: float = 10.0) -> RateLimitedLog:
    return RateLimitedLog(
        logging.getLogger(LOGGER), logging.WARNING, "thing", key_field="reason", burst=burst, window=window, clock=clock
    )


def offer(log: RateLimitedLog, reason: str, times: int) -> int:
    """Offer `times` events of `reason`, logging those allowed as the pipeline does; how many were allowed."""
    allowed = 0
    for _ in range(times):
        if log.allow(reason):
            log_event(log.logger, log.level, "thing", reason=reason)
            allowed += 1
    return allowed


def test_first_few_per_window_then_one_summary_with_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = FakeClock()
    log = limited(clock)

    assert offer(log, "invalid_json", 5) == 5
    assert offer(log, "invalid_json", 995) == 0
    clock.now += 9.9
    assert offer(log, "invalid_json", 3) == 0  # the window has not ended: no summary yet
    assert events(caplog, "thing_summary") == []

    clock.now += 0.1
    assert offer(log, "invalid_json", 1) == 1  # a new window: its summary, then its first line in full
    assert events(caplog, "thing_summary") == [{"reason": "invalid_json", "suppressed": 998, "window_seconds": 10.0}]
    assert [record.getMessage() for record in caplog.records][-2:] == ["thing_summary", "thing"]
    assert len(events(caplog, "thing")) == 6


def test_reasons_are_limited_independently_and_a_quiet_window_has_no_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    clock = FakeClock()
    log = limited(clock, burst=2)

    assert offer(log, "invalid_json", 10) == 2
    assert offer(log, "invalid_frame", 3) == 2
    clock.now += 60
    assert offer(log, "invalid_frame", 1) == 1
    assert events(caplog, "thing_summary") == [{"reason": "invalid_frame", "suppressed": 1, "window_seconds": 10.0}]

    clock.now += 60
    assert offer(log, "invalid_frame", 1) == 1  # the last window suppressed nothing
    assert len(events(caplog, "thing_summary")) == 1
    assert offer(log, "invalid_json", 1) == 1  # invalid_json's window ended long ago: its summary comes now
    assert events(caplog, "thing_summary")[-1] == {"reason": "invalid_json", "suppressed": 8, "window_seconds": 10.0}


async def test_a_thousand_bad_frames_log_a_handful_of_lines_and_are_all_counted_and_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.pipeline")
    pipeline, metrics = make_pipeline(capacity=10_000)
    wrong_type = json.dumps(
        {"contractId": "1001", "timestamp": "2026-05-29T12:00:00Z", "data": {"ContractInfo": {"open_interest": "n/a"}}}
    )
    for n in range(1000):
        pipeline.on_frame(b"<html>502</html>" if n % 2 else wrong_type, n, BY_ID)

    rejected = events(caplog, "frame_rejected")
    assert len(caplog.records) == len(rejected) == 10
    assert sorted({str(fields["reason"]) for fields in rejected}) == ["invalid_frame", "invalid_json"]
    assert rejected[0] == {
        "connection": "id-0/3",
        "reason": "invalid_frame",
        "detail": "Expected `int | float`, got `str` - at `$.data.ContractInfo.open_interest`",
        "bytes": len(wrong_type),
    }
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="invalid_json") == 500
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="invalid_frame") == 500
    records = await take_all(pipeline)
    assert len(records) == 1000
    assert all(record.kind is RecordKind.DEAD_LETTER for record in records)


async def test_dead_letter_headers_stay_per_frame_and_per_connection() -> None:
    pipeline, _ = make_pipeline()
    other = ConnectionInfo(Subscription("name-1", Endpoint.NAME, ("GC1405",)), attempt=2)
    pipeline.on_frame(b"{broken", 7, BY_ID)
    pipeline.on_frame(b"[1]", 8, other)
    pipeline.on_frame(frame({"contractId": "9999"}), 9, BY_ID)

    headers = [record.headers for record in await take_all(pipeline)]
    assert headers[0] == [
        ("reason", b"invalid_json"),
        ("detail", b"JSON is malformed: object keys must be strings (byte 1)"),
        ("endpoint", b"id"),
        ("connection", b"id-0/3"),
        ("receive-time-us", b"7"),
    ]
    assert [(name, value) for name, value in headers[1] if name != "detail"] == [
        ("reason", b"invalid_frame"),
        ("endpoint", b"name"),
        ("connection", b"name-1/2"),
        ("receive-time-us", b"8"),
    ]
    assert dict(headers[2])["reason"] == b"unknown_contract"
    assert dict(headers[2])["connection"] == b"id-0/3"
    assert dict(headers[2])["receive-time-us"] == b"9"
