"""tail's decoding, fed bytes: both framings, every released writer schema, what no schema reads, the table's
numbers and dead letters."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import given
from hypothesis import strategies as st

from bridge.encode import Schema, SchemaHistory, load_released_schemas
from bridge.registry import wire_prefix
from bridge.tail import (
    decode_dead_letter,
    decode_record,
    excerpt,
    format_dead_letter,
    format_number,
    format_table,
)
from tests.support.schema_evolution import samples

HISTORY = SchemaHistory.shipped()
CURRENT = HISTORY.current
OLDEST = load_released_schemas()[0]


def written(schema: Schema, value: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, schema.parsed, value)
    return out.getvalue()


def headers(schema: Schema) -> list[tuple[str, bytes]]:
    return [("schema", schema.name.encode()), ("schema-fingerprint", schema.fingerprint.encode()), ("endpoint", b"id")]


def read(schema: Schema, body: bytes) -> Any:
    """What the shipped schema reads from `body` written with `schema` (the reference: fastavro)."""
    return schemaless_reader(io.BytesIO(body), schema.parsed, CURRENT.parsed)


@pytest.fixture
def value() -> dict[str, Any]:
    sample = samples(CURRENT.definition)[0]
    assert isinstance(sample, dict)
    return sample


def test_plain_avro_in_the_shipped_schema(value: dict[str, Any]) -> None:
    body = written(CURRENT, value)
    decoded = decode_record(b"1001", body, headers(CURRENT), HISTORY)
    assert decoded["key"] == "1001"
    assert decoded["headers"]["endpoint"] == "id"
    assert decoded["value"] == read(CURRENT, body)
    assert "schema_id" not in decoded


def test_plain_avro_an_older_version_wrote_is_read_with_that_version(value: dict[str, Any]) -> None:
    assert OLDEST.fingerprint != CURRENT.fingerprint
    body = written(OLDEST, value)
    decoded = decode_record(b"1001", body, headers(OLDEST), HISTORY)
    assert decoded["value"] == read(OLDEST, body)
    assert decoded["value"]["first_after_subscribe"] is False  # a field v1 lacks, at its default


def test_framed_values_are_read_with_the_registry_schema_under_their_id(value: dict[str, Any]) -> None:
    body = written(OLDEST, value)
    # The header says current; the registry's id is what a framed value's writer really is.
    decoded = decode_record(b"1001", wire_prefix(7) + body, headers(CURRENT), HISTORY, {7: OLDEST})
    assert decoded["schema_id"] == 7
    assert decoded["value"] == read(OLDEST, body)


def test_framed_values_without_the_registry_are_read_by_their_fingerprint_header(value: dict[str, Any]) -> None:
    body = written(CURRENT, value)
    decoded = decode_record(b"1001", wire_prefix(3) + body, headers(CURRENT), HISTORY)
    assert (decoded["schema_id"], decoded["value"]) == (3, read(CURRENT, body))


def test_an_unknown_writer_schema_prints_the_raw_bytes(value: dict[str, Any]) -> None:
    unknown = [("schema", CURRENT.name.encode()), ("schema-fingerprint", b"0000000000000000")]
    decoded = decode_record(b"1001", written(CURRENT, value), unknown, HISTORY)
    assert "value" not in decoded
    assert decoded["raw"]


def test_a_body_its_schema_does_not_describe_is_an_error_not_a_crash() -> None:
    decoded = decode_record(b"1001", b"\x02", headers(CURRENT), HISTORY)
    assert "value" not in decoded
    assert CURRENT.fingerprint in decoded["error"]


def test_dead_letters_print_their_raw_frame() -> None:
    decoded = decode_record(b"1001", b'{"not": "json"', [("reason", b"invalid_json")], HISTORY)
    assert decoded == {"key": "1001", "headers": {"reason": "invalid_json"}, "raw": '{"not": "json"'}


# --- tail --table keeps decimals; tail --dead-letters --------------------------------------------------


def test_the_table_keeps_the_decimals_a_price_has(value: dict[str, Any]) -> None:
    level = {"level": 1, "buy_quantity": 5, "buy_price": 1234.5, "sell_quantity": 7, "sell_price": 1250.0}
    record = value | {"best_limit": [level], "aggregate": None}
    table = format_table({"1001": {"value": read(CURRENT, written(CURRENT, record))}})
    row = table.splitlines()[1]
    assert " 1,234.5 " in row
    assert " 1,250 " in row  # whole prices stay without a fraction
    assert format_number(0.125) == "0.125"
    assert format_number(2_500_000.0) == "2,500,000"


def test_an_excerpt_is_one_readable_line_cut_at_the_limit() -> None:
    assert excerpt(b'{"a": 1}') == '{"a": 1}'
    assert excerpt("قیمت\n\t".encode()) == "قیمت\\n\\t"  # UTF-8 stays readable, control characters escaped
    assert excerpt(b"\xff\x00ok") == "\\xff\\x00ok"  # bytes that are not UTF-8, escaped
    long = excerpt(b"x" * 500, limit=20)
    assert long == "x" * 20 + "… (500 bytes)"
    assert excerpt(None) == ""


def test_a_dead_letter_shows_its_reason_detail_origin_and_an_excerpt() -> None:
    frame = b'{"ContractInfo": {"open_interest": "n/a"}}\n' + b"y" * 400
    decoded = decode_dead_letter(
        b"1001",
        frame,
        [
            ("reason", b"invalid_frame"),
            ("detail", b"open_interest: expected an integer"),
            ("endpoint", b"id"),
            ("connection", b"id-0/1"),
            ("receive-time-us", b"1765000000123456"),
        ],
    )
    assert decoded["key"] == "1001"
    assert decoded["reason"] == "invalid_frame"
    assert decoded["detail"] == "open_interest: expected an integer"
    assert (decoded["endpoint"], decoded["connection"]) == ("id", "id-0/1")
    assert decoded["received"] == "2025-12-06T05:46:40.123456+00:00"
    assert decoded["size"] == len(frame)
    assert decoded["excerpt"].startswith('{"ContractInfo": {"open_interest": "n/a"}}\\nyyy')
    assert decoded["excerpt"].endswith(f"… ({len(frame)} bytes)")
    line = format_dead_letter(decoded)
    assert line.startswith("05:46:40.123 invalid_frame")
    assert "key=1001" in line
    assert "open_interest: expected an integer | {" in line


def test_a_dead_letter_without_key_or_headers_still_prints() -> None:
    decoded = decode_dead_letter(None, b"\x00\x01", [])
    assert decoded == {
        "key": None,
        "reason": None,
        "detail": None,
        "endpoint": None,
        "connection": None,
        "received": None,
        "size": 2,
        "excerpt": "\\x00\\x01",
    }
    assert "key=-" in format_dead_letter(decoded)


header_names = st.sampled_from(["reason", "detail", "endpoint", "connection", "receive-time-us", "other"])


@given(
    st.none() | st.binary(max_size=50),
    st.none() | st.binary(max_size=500),
    st.lists(st.tuples(header_names, st.binary(max_size=40) | st.text(max_size=30).map(str.encode)), max_size=8),
)
def test_any_dead_letter_bytes_decode_and_print(key: bytes | None, value: bytes | None, headers: list[Any]) -> None:
    """A dead letter's headers are whatever a producer wrote: tail shows them, it does not fail on them."""
    decoded = decode_dead_letter(key, value, headers)
    assert "\n" not in format_dead_letter(decoded)


@pytest.mark.parametrize("written", [b"\xc2\xb2", "١٢٣".encode(), b"9" * 30, b"-5", b""])
def test_a_receive_time_that_is_not_one_is_left_out(written: bytes) -> None:
    assert decode_dead_letter(None, b"x", [("receive-time-us", written)])["received"] is None


def test_a_dead_letter_line_escapes_what_a_terminal_would_run() -> None:
    line = format_dead_letter(decode_dead_letter(None, b"x", [("reason", b"r\x1b[2J"), ("detail", b"a\nb")]))
    assert "\x1b" not in line
    assert "\n" not in line
    assert "r\\x1b[2J" in line
    assert "a\\nb" in line
