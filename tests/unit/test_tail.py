"""tail's decoding, fed bytes: both framings, every released writer schema, and what no schema reads."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer

from bridge.encode import Schema, SchemaHistory, load_released_schemas
from bridge.registry import wire_prefix
from bridge.tail import decode_record
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
