"""Frames a hostile or broken server may send: each becomes one record or one dead letter, never an exception.

Pure: normalize, encode and the frame pipeline are fed bytes, including by hypothesis.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import msgspec
import pytest
from fastavro import parse_schema, schemaless_reader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.encode import encode_update, load_schema
from bridge.normalize import ContractDirectory, ContractUpdate, Normalizer, Rejected, RejectReason
from bridge.protocol import Endpoint
from tests.unit.test_pipeline import BY_ID, BY_NAME, make_pipeline

SCHEMA = load_schema()


def _without_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_logical_types(value) for key, value in node.items() if key != "logicalType"}
    if isinstance(node, list):
        return [_without_logical_types(item) for item in node]
    return node


# The writer's schema read without logical types: timestamps and dates come back as the numbers written.
PLAIN_SCHEMA = parse_schema(_without_logical_types(SCHEMA.definition))
NORMALIZE = Normalizer(session_id="s", contracts=ContractDirectory({"1001": "GC1405"}))


def snapshot(contract: str = "1001", **data: Any) -> dict[str, Any]:
    return {"channel": "IME Stream", "contractId": contract, "timestamp": "2026-05-29T12:00:00Z", "data": data}


def level(price: Any = 1, quantity: Any = 1) -> dict[str, Any]:
    return {"1": {"buy_quantity": quantity, "buy_price": price, "sell_quantity": 1, "sell_price": 2}}


def encoded(document: Any) -> bytes:
    return json.dumps(document).encode()


HOSTILE: list[tuple[str, bytes, RejectReason]] = [
    (
        "nesting 100,000 deep in an unknown field",
        encoded(snapshot())[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        RejectReason.TOO_DEEP,
    ),
    ("an array nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, RejectReason.INVALID_FRAME),
    ("a 400-digit price", encoded(snapshot(BestLimit=level(price=10**400))), RejectReason.INVALID_VALUE),
    ("a quantity beyond int64", encoded(snapshot(BestLimit=level(quantity=2**63))), RejectReason.INVALID_VALUE),
    (
        "open interest of 10^20",
        encoded(snapshot(ContractInfo={"open_interest": 10**20, "open_interest_changes": 0})),
        RejectReason.INVALID_VALUE,
    ),
    (
        "a price of 1e400",
        encoded(snapshot(BestLimit=level(price=1)))[:-1].replace(b'"buy_price": 1', b'"buy_price": 1e400') + b"}",
        RejectReason.INVALID_VALUE,
    ),
    ("NaN", encoded(snapshot(BestLimit=level(price=math.nan))), RejectReason.INVALID_JSON),
    ("Infinity", encoded(snapshot(BestLimit=level(price=math.inf))), RejectReason.INVALID_JSON),
    ("a lone surrogate escape", encoded({**snapshot(), "channel": "\ud800"}), RejectReason.INVALID_JSON),
    ("invalid UTF-8", encoded(snapshot()).replace(b"IME Stream", b"IME \xff\xfe"), RejectReason.INVALID_UTF8),
    ("an array", b"[1, 2]", RejectReason.INVALID_FRAME),
    ("a string", b'"IME"', RejectReason.INVALID_FRAME),
    ("null", b"null", RejectReason.INVALID_FRAME),
    ("an empty frame", b"", RejectReason.INVALID_JSON),
    ("a level key of 20 digits", encoded(snapshot(BestLimit={"9" * 20: level()["1"]})), RejectReason.INVALID_VALUE),
    (
        "a level key in another script",
        encoded(snapshot(BestLimit={"\u0661": level()["1"]})),
        RejectReason.INVALID_VALUE,
    ),
    (
        "a timestamp that is no time",
        encoded({**snapshot(), "timestamp": "29 May, noon"}),
        RejectReason.INVALID_TIMESTAMP,
    ),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [(raw, reason) for _, raw, reason in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_hostile_frames_are_rejected_with_their_reason(raw: bytes, reason: RejectReason) -> None:
    result = NORMALIZE(raw, Endpoint.ID, 0)
    assert isinstance(result, Rejected), result
    assert result.reason is reason, result.detail
    assert result.raw == raw


async def test_a_contract_nobody_subscribed_is_a_dead_letter_and_leaves_no_state() -> None:
    pipeline, metrics = make_pipeline()
    for n in range(200):
        pipeline.on_frame(encoded(snapshot(f"U{n}")), 0, BY_ID)
    pipeline.on_frame(encoded(snapshot("x" * 5000)), 0, BY_ID)
    pipeline.on_frame(encoded(snapshot("1002")), 0, BY_NAME)  # subscribed on another connection, not this one
    records = (await pipeline.buffer.take(1000)).records
    assert len(records) == 202
    assert {record.dead_letter_reason for record in records} == {"unknown_contract"}
    assert pipeline._last_published == {}, "no per-contract state grows with ids nobody subscribed"
    assert (
        metrics.registry.get_sample_value("ime_bridge_messages_rejected_total", {"reason": "unknown_contract"}) == 202
    )


async def test_an_unexpected_exception_while_handling_a_frame_is_a_dead_letter_and_the_stream_goes_on() -> None:
    pipeline, metrics = make_pipeline()

    def broken(*args: object) -> ContractUpdate | Rejected:
        raise ZeroDivisionError("a bug")

    pipeline.normalizer = broken  # type: ignore[assignment]
    pipeline.on_frame(encoded(snapshot()), 0, BY_ID)
    pipeline.normalizer = NORMALIZE
    pipeline.on_frame(encoded(snapshot()), 0, BY_ID)
    letter, update = (await pipeline.buffer.take(1000)).records
    assert letter.dead_letter_reason == "internal_error"
    assert b"ZeroDivisionError" in dict(letter.headers)["detail"]
    assert update.dead_letter_reason is None
    assert metrics.registry.get_sample_value("ime_bridge_messages_rejected_total", {"reason": "internal_error"}) == 1


async def test_a_frame_that_fails_mid_burst_is_a_dead_letter_and_the_whole_burst_is_captured_raw() -> None:
    pipeline, metrics = make_pipeline(capture_raw=True)
    good = encoded(snapshot())

    class SecondCallFails:
        """The pipeline's normalizer, but its second call raises."""

        def __init__(self, normalizer: Normalizer) -> None:
            self.normalizer, self.calls = normalizer, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.normalizer, name)

        def __call__(self, *args: Any) -> ContractUpdate | Rejected:
            self.calls += 1
            if self.calls == 2:
                raise ZeroDivisionError("a bug")
            return self.normalizer(*args)

    pipeline.normalizer = SecondCallFails(pipeline.normalizer)  # type: ignore[assignment]
    pipeline.on_burst([good, b"{}", good], 7, BY_ID)
    taken = await pipeline.buffer.take(1000)
    assert [record.dead_letter_reason for record in taken.records] == [None, "internal_error", None]
    (block,) = taken.raw
    assert (block.frames, block.keys, block.receive_time) == ([good, b"{}", good], [b"1001", None, b"1001"], 7)
    assert metrics.registry.get_sample_value("ime_bridge_messages_rejected_total", {"reason": "internal_error"}) == 1


# --- property tests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_give_exactly_one_record_or_dead_letter(raw: bytes) -> None:
    pipeline, _ = make_pipeline()
    pipeline.on_frame(raw, 0, BY_ID)
    assert len(pipeline.buffer) == 1


numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e20, max_value=1e20),
)
texts = st.text(max_size=30)
json_frames = st.fixed_dictionaries(
    {
        "channel": texts,
        "contractId": st.sampled_from(["1001", "1002"]),
        "timestamp": st.one_of(
            st.datetimes().map(lambda moment: moment.isoformat()),
            st.just("2026-05-29T12:00:00+03:30"),
            texts,
        ),
        "data": st.fixed_dictionaries(
            {},
            optional={
                "BestLimit": st.dictionaries(
                    st.sampled_from(["1", "2", "3", "10", "0", "x"]),
                    st.fixed_dictionaries(
                        {"buy_quantity": numbers, "buy_price": numbers, "sell_quantity": numbers, "sell_price": numbers}
                    ),
                    max_size=3,
                ),
                "Aggregate": st.fixed_dictionaries(
                    dict.fromkeys(
                        (
                            "trade_count",
                            "total_volume",
                            "total_value",
                            "closing_price",
                            "last_price",
                            "low_price",
                            "high_price",
                            "open_price",
                            "previous_close",
                        ),
                        numbers,
                    )
                    | {"date": st.sampled_from(["", "2026-05-29", "0001-01-01", "9999-12-31", "x"])}
                    | {"time": st.sampled_from(["", "12:00:00", "23:59:59.999999", "25:00"])}
                ),
                "AllowedPriceRange": st.fixed_dictionaries({"minAllowedPrice": numbers, "maxAllowedPrice": numbers}),
                "ContractInfo": st.fixed_dictionaries({"open_interest": numbers, "open_interest_changes": numbers}),
            },
        ),
    }
)


@settings(max_examples=400, deadline=None)
@given(json_frames)
def test_every_frame_normalize_accepts_encodes_and_reads_back_equal(document: dict[str, Any]) -> None:
    result = NORMALIZE(json.dumps(document).encode(), Endpoint.ID, 0)
    if isinstance(result, Rejected):
        return
    read = schemaless_reader(io.BytesIO(encode_update(result)), PLAIN_SCHEMA, PLAIN_SCHEMA)
    assert read == msgspec.to_builtins(result)


async def test_a_dead_letter_keeps_the_configured_start_of_its_frame() -> None:
    pipeline, _ = make_pipeline(max_frame_bytes=100_000)
    pipeline.dead_letter_raw_bytes = 1024
    raw = b"<html>" + b"x" * 5000
    pipeline.on_frame(raw, 0, BY_ID)
    (letter,) = (await pipeline.buffer.take(10)).records
    assert letter.value == raw[:1024]
