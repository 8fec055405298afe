"""encode: the specialized writer against fastavro, the reference, on generated records."""

from __future__ import annotations

import io
from typing import Any

import msgspec
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.encode import encode_update, load_schema
from bridge.normalize import Aggregate, AllowedPriceRange, BookLevel, ContractInfo, ContractUpdate

SCHEMA = load_schema()

longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
small = st.integers(min_value=0, max_value=20_000)
prices = st.one_of(st.integers(min_value=0, max_value=10**12), st.floats(allow_nan=False, allow_infinity=False))
texts = st.text(max_size=40)

levels = st.builds(BookLevel, st.integers(min_value=1, max_value=10), st.one_of(small, longs), prices, small, prices)
aggregates = st.builds(
    Aggregate,
    st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    st.one_of(st.none(), st.integers(min_value=0, max_value=86_400_000_000 - 1)),
    small,
    longs,
    prices,
    prices,
    prices,
    prices,
    prices,
    prices,
    prices,
)
updates = st.builds(
    ContractUpdate,
    st.text(min_size=1, max_size=12),
    st.one_of(st.none(), texts),
    st.sampled_from(["ID", "NAME"]),
    texts,
    longs,
    longs,
    st.lists(levels, max_size=5),
    st.one_of(st.none(), aggregates),
    st.one_of(st.none(), st.builds(AllowedPriceRange, prices, prices)),
    st.one_of(st.none(), st.builds(ContractInfo, longs, longs)),
    st.integers(min_value=0, max_value=2**40),
    texts,
    st.integers(min_value=0, max_value=2**40),
    st.booleans(),
)


def reference_encoding(update: ContractUpdate) -> bytes:
    buffer = io.BytesIO()
    schemaless_writer(buffer, SCHEMA.parsed, msgspec.to_builtins(update))
    return buffer.getvalue()


def decode(data: bytes) -> Any:
    return schemaless_reader(io.BytesIO(data), SCHEMA.parsed, SCHEMA.parsed, return_record_name=False)


@settings(max_examples=400, deadline=None)
@given(updates)
def test_specialized_writer_is_byte_identical_to_fastavro(update: ContractUpdate) -> None:
    assert encode_update(update) == reference_encoding(update)


def test_struct_fields_are_exactly_the_schema_fields() -> None:
    """A field added to the schema (or the record) without the other fails here, not in production."""

    def fields(record_schema: dict[str, Any]) -> list[str]:
        return [field["name"] for field in record_schema["fields"]]

    definition = SCHEMA.definition
    by_name = {field["name"]: field["type"] for field in definition["fields"]}
    assert fields(definition) == list(ContractUpdate.__struct_fields__)
    assert fields(by_name["best_limit"]["items"]) == list(BookLevel.__struct_fields__)
    assert fields(by_name["aggregate"][1]) == list(Aggregate.__struct_fields__)
    assert fields(by_name["allowed_price_range"][1]) == list(AllowedPriceRange.__struct_fields__)
    assert fields(by_name["contract_info"][1]) == list(ContractInfo.__struct_fields__)


def test_round_trip_through_the_schema() -> None:
    update = ContractUpdate(
        "1001",
        "GC1405",
        "NAME",
        "IME Stream",
        1_780_000_000_123_456,
        1_780_000_000_223_456,
        [BookLevel(1, 150, 245000, 100, 246000.5)],
        Aggregate(20_602, None, 3, 40, 1e9, 1, 2, 3, 4, 5, 6),
        None,
        ContractInfo(5400, -120),
        17,
        "session",
    )
    decoded = decode(encode_update(update))
    assert decoded["contract_id"] == "1001"
    assert decoded["endpoint"] == "NAME"
    assert decoded["best_limit"] == [
        {"level": 1, "buy_quantity": 150, "buy_price": 245000.0, "sell_quantity": 100, "sell_price": 246000.5}
    ]
    assert decoded["aggregate"]["trade_time"] is None
    assert decoded["aggregate"]["trade_date"].isoformat() == "2026-05-29"
    assert decoded["exchange_time"].isoformat() == "2026-05-28T20:26:40.123456+00:00"
    assert decoded["allowed_price_range"] is None
    assert decoded["contract_info"] == {"open_interest": 5400, "open_interest_change": -120}
    assert decoded["sequence"] == 17


def test_schema_identity_is_stable() -> None:
    assert SCHEMA.name == "ir.ime.bridge.ContractUpdate"
    assert len(SCHEMA.fingerprint) == 16
    int(SCHEMA.fingerprint, 16)


EDGES = [
    -(2**63),
    -(2**55),
    -(2**41),
    -8193,
    -8192,
    -1,
    0,
    1,
    8191,
    8192,
    2**41 - 1,
    2**41,
    2**55 - 1,
    2**55,
    2**63 - 1,
]


@given(st.sampled_from(EDGES), st.sampled_from(EDGES), updates)
def test_the_writers_fast_paths_end_where_they_must(first: int, second: int, update: ContractUpdate) -> None:
    """The table lookups for small numbers and the four-group path for timestamps, at and past their edges."""
    update.exchange_time, update.receive_time, update.sequence, update.skipped = first, second, first, second
    if update.aggregate is not None:
        update.aggregate.trade_count, update.aggregate.total_volume = first, second
    update.best_limit = [BookLevel(first, second, 1.5, first, 2), *update.best_limit]
    assert encode_update(update) == reference_encoding(update)
