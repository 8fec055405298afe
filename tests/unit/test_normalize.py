"""normalize: every envelope variant of both reference documents, fed as bytes, no I/O."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bridge.normalize import ContractDirectory, ContractUpdate, Normalizer, Rejected, RejectReason
from bridge.protocol import Endpoint

SESSION = "00000000-0000-4000-8000-000000000000"
RECEIVED = 1_780_000_000_000_000

# ref/ht-data-engine-ime-websocket.md, "9. Complete Example Payload", verbatim.
HT_DOCUMENT_EXAMPLE = """{ "channel": "IME Stream", "contractId": "1001", "timestamp": "2026-05-29T12:00:00.000000Z",
"data": { "BestLimit": { "1": { "buy_quantity": 150, "buy_price": 245000, "sell_quantity": 100, "sell_price": 246000 },
"2": { "buy_quantity": 120, "buy_price": 244500, "sell_quantity": 90, "sell_price": 246500 }, "3": { "buy_quantity": 80,
"buy_price": 244000, "sell_quantity": 70, "sell_price": 247000 } }, "Aggregate": { "date": "2026-05-29", "time":
"12:00:00", "trade_count": 120, "total_volume": 4500, "total_value": 1102500000, "closing_price": 245500, "last_price":
245700, "low_price": 244000, "high_price": 247000, "open_price": 244500, "previous_close": 243000 },
"AllowedPriceRange": { "minAllowedPrice": 220000, "maxAllowedPrice": 270000 }, "ContractInfo": { "open_interest": 5400,
"open_interest_changes": 120 } } }"""

# ref/ime-live-data-websocket.md: "Response Structure (Contract ID)" with its "Full Payload Example" as data.
LEGACY_DOCUMENT_EXAMPLE = {
    "channel": "IME Stream",
    "ContractId": "12345",
    "timestamp": "2026-05-23T15:10:00.000000",
    "data": {
        "BestLimit": {
            level: {"buy_quantity": 0, "buy_price": 0, "sell_quantity": 0, "sell_price": 0} for level in ("1", "2", "3")
        },
        "Aggregate": {
            "date": "",
            "time": "",
            "trade_count": 0,
            "total_volume": 0,
            "total_value": 0,
            "closing_price": 0,
            "last_price": 0,
            "low_price": 0,
            "high_price": 0,
            "open_price": 0,
            "previous_close": 0,
        },
        "AllowedPriceRange": {"minAllowedPrice": 1, "maxAllowedPrice": 9999999999},
        "ContractInfo": {"open_interest": 0, "open_interest_changes": 0},
    },
}


def micros(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1_000_000)


def normalizer(**kwargs: Any) -> Normalizer:
    return Normalizer(session_id=SESSION, **kwargs)


def accepted(result: ContractUpdate | Rejected) -> ContractUpdate:
    assert isinstance(result, ContractUpdate), result
    return result


def rejected(result: ContractUpdate | Rejected, reason: RejectReason) -> Rejected:
    assert isinstance(result, Rejected), result
    assert result.reason is reason, result
    return result


def test_ht_document_example_is_normalized_field_by_field() -> None:
    update = accepted(
        normalizer(contracts=ContractDirectory({"1001": "GOLD-APR"}))(HT_DOCUMENT_EXAMPLE, Endpoint.ID, RECEIVED)
    )

    assert update.contract_id == "1001"
    assert update.contract_name == "GOLD-APR"
    assert update.endpoint == "ID"
    assert update.channel == "IME Stream"
    assert update.exchange_time == micros("2026-05-29T12:00:00+00:00")
    assert update.receive_time == RECEIVED
    assert [(level.level, level.buy_quantity, level.buy_price) for level in update.best_limit] == [
        (1, 150, 245000),
        (2, 120, 244500),
        (3, 80, 244000),
    ]
    assert update.best_limit[2].sell_quantity == 70
    assert update.best_limit[2].sell_price == 247000
    aggregate = update.aggregate
    assert aggregate is not None
    assert aggregate.trade_date == (datetime(2026, 5, 29) - datetime(1970, 1, 1)).days
    assert aggregate.trade_time == 12 * 3600 * 1_000_000
    assert (aggregate.trade_count, aggregate.total_volume, aggregate.total_value) == (120, 4500, 1102500000)
    assert (aggregate.last_price, aggregate.previous_close) == (245700, 243000)
    assert update.allowed_price_range is not None
    assert (update.allowed_price_range.min_price, update.allowed_price_range.max_price) == (220000, 270000)
    assert update.contract_info is not None
    assert (update.contract_info.open_interest, update.contract_info.open_interest_change) == (5400, 120)
    assert update.session_id == SESSION
    assert update.sequence == 0


def test_legacy_document_example_capital_contract_id_naive_timestamp_and_empty_strings() -> None:
    update = accepted(normalizer()(json.dumps(LEGACY_DOCUMENT_EXAMPLE), Endpoint.ID, RECEIVED))

    assert update.contract_id == "12345"
    assert update.contract_name is None
    assert update.exchange_time == micros("2026-05-23T15:10:00+00:00")
    assert update.aggregate is not None
    assert update.aggregate.trade_date is None
    assert update.aggregate.trade_time is None
    assert update.allowed_price_range is not None
    assert update.allowed_price_range.max_price == 9999999999
    assert all(level.buy_price == 0 and level.sell_quantity == 0 for level in update.best_limit)


def test_naive_timestamps_are_read_in_the_configured_zone() -> None:
    tehran = normalizer(naive_timezone=ZoneInfo("Asia/Tehran"))
    update = accepted(tehran(json.dumps(LEGACY_DOCUMENT_EXAMPLE), Endpoint.ID, RECEIVED))
    assert update.exchange_time == micros("2026-05-23T15:10:00+03:30")


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2026-05-29T12:00:00Z", "2026-05-29T12:00:00+00:00"),
        ("2026-05-29T12:00:00.5+03:30", "2026-05-29T12:00:00.5+03:30"),
        ("2026-05-29T12:00:00.123", "2026-05-29T12:00:00.123+00:00"),
        ("2026-05-29 12:00:00", "2026-05-29T12:00:00+00:00"),
    ],
)
def test_timestamp_forms(timestamp: str, expected: str) -> None:
    frame = {"contractId": "1", "timestamp": timestamp, "data": {}}
    update = accepted(normalizer()(json.dumps(frame), Endpoint.ID, RECEIVED))
    assert update.exchange_time == micros(expected)


def test_name_endpoint_frame_is_keyed_by_the_resolved_id() -> None:
    frame = {"channel": "IME Stream", "contractName": "GOLD-APR", "timestamp": "2026-05-29T12:00:00Z", "data": {}}
    update = accepted(
        normalizer(contracts=ContractDirectory({"1001": "GOLD-APR"}))(json.dumps(frame), Endpoint.NAME, RECEIVED)
    )
    assert (update.contract_id, update.contract_name, update.endpoint) == ("1001", "GOLD-APR", "NAME")


def test_unresolved_name_is_rejected_not_published_under_a_guessed_key() -> None:
    frame = {"contractName": "NOPE", "timestamp": "2026-05-29T12:00:00Z", "data": {}}
    result = rejected(normalizer()(json.dumps(frame), Endpoint.NAME, RECEIVED), RejectReason.UNKNOWN_CONTRACT)
    assert "NOPE" in result.detail
    assert result.contract_id is None


def test_numeric_contract_id_and_float_prices_and_extra_fields() -> None:
    frame = {
        "channel": "IME Stream",
        "contractId": 1001,
        "timestamp": "2026-05-29T12:00:00Z",
        "sequence": 7,
        "data": {
            "BestLimit": {"1": {"buy_quantity": 5.0, "buy_price": 12.25, "sell_quantity": 6, "sell_price": 13.5}},
            "Incremental": {"future": "section"},
        },
    }
    update = accepted(normalizer()(json.dumps(frame), Endpoint.ID, RECEIVED))
    assert update.contract_id == "1001"
    assert update.best_limit[0].buy_quantity == 5
    assert isinstance(update.best_limit[0].buy_quantity, int)
    assert update.best_limit[0].buy_price == 12.25


def test_missing_sections_are_null_and_levels_are_sorted() -> None:
    frame = {
        "contractId": "7",
        "timestamp": "2026-05-29T12:00:00Z",
        "data": {
            "BestLimit": {
                key: {"buy_quantity": int(key), "buy_price": 1, "sell_quantity": 1, "sell_price": 2} for key in "312"
            }
        },
    }
    update = accepted(normalizer()(json.dumps(frame).encode(), Endpoint.ID, RECEIVED))
    assert [level.level for level in update.best_limit] == [1, 2, 3]
    assert (update.aggregate, update.allowed_price_range, update.contract_info) == (None, None, None)


@pytest.mark.parametrize(
    ("frame", "reason", "in_detail"),
    [
        (b"not json", RejectReason.INVALID_JSON, "malformed"),
        (b"\xff\xfe\x00", RejectReason.INVALID_JSON, ""),
        (b"[1, 2]", RejectReason.INVALID_FRAME, "object"),
        (b'{"contractId": "1", "data": {}}', RejectReason.INVALID_FRAME, "timestamp"),
        (b'{"contractId": "1", "timestamp": "2026-05-29T12:00:00Z"}', RejectReason.INVALID_FRAME, "data"),
        (
            b'{"contractId": "1", "timestamp": "2026-05-29T12:00:00Z", "data": {"ContractInfo": {"open_interest": "x",'
            b' "open_interest_changes": 1}}}',
            RejectReason.INVALID_FRAME,
            "$.data.ContractInfo.open_interest",
        ),
        (
            b'{"contractId": "1", "timestamp": "2026-05-29T12:00:00Z", "data": {"AllowedPriceRange": {}}}',
            RejectReason.INVALID_FRAME,
            "minAllowedPrice",
        ),
        (b'{"timestamp": "2026-05-29T12:00:00Z", "data": {}}', RejectReason.MISSING_IDENTIFIER, "contractId"),
        (b'{"contractId": "", "timestamp": "2026-05-29T12:00:00Z", "data": {}}', RejectReason.MISSING_IDENTIFIER, ""),
        (b'{"contractId": "1", "timestamp": "yesterday", "data": {}}', RejectReason.INVALID_TIMESTAMP, "yesterday"),
        (
            b'{"contractId": "1", "timestamp": "2026-05-29T12:00:00Z", "data": {"ContractInfo": {"open_interest": 1.5,'
            b' "open_interest_changes": 1}}}',
            RejectReason.INVALID_VALUE,
            "open_interest",
        ),
        (
            b'{"contractId": "1", "timestamp": "2026-05-29T12:00:00Z", "data": {"BestLimit": {"best": '
            b'{"buy_quantity": 1, "buy_price": 1, "sell_quantity": 1, "sell_price": 1}}}}',
            RejectReason.INVALID_VALUE,
            "level key",
        ),
    ],
)
def test_rejections_carry_a_bounded_reason_a_precise_detail_and_the_raw_bytes(
    frame: bytes, reason: RejectReason, in_detail: str
) -> None:
    result = rejected(normalizer()(frame, Endpoint.ID, RECEIVED), reason)
    assert in_detail in result.detail
    assert result.raw == frame


def test_rejection_after_identification_keeps_the_contract_id() -> None:
    frame = b'{"contractId": "42", "timestamp": "bad", "data": {}}'
    assert rejected(normalizer()(frame, Endpoint.ID, RECEIVED), RejectReason.INVALID_TIMESTAMP).contract_id == "42"


def test_text_frames_are_kept_as_utf8_bytes_when_rejected() -> None:
    result = rejected(normalizer()("سلام", Endpoint.ID, RECEIVED), RejectReason.INVALID_JSON)
    assert result.raw == "سلام".encode()


def test_exchange_time_is_utc_microseconds() -> None:
    frame = {"contractId": "1", "timestamp": "1970-01-01T00:00:01.000002Z", "data": {}}
    assert accepted(normalizer()(json.dumps(frame), Endpoint.ID, RECEIVED)).exchange_time == 1_000_002
