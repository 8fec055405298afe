"""ContractUpdate → Avro binary, pure and synchronous.

The schema in schemas/contract_update.avsc is the contract with consumers; it is loaded and parsed
once here. The writer below is specialized to that schema because fastavro's generic writer costs
15-26 µs per record on this record (its union handling validates every candidate branch), three to
four times the whole budget of the stage. The specialized writer produces byte-identical output:
tests/unit/test_encode.py checks it against fastavro (the reference) on generated records, and checks that
it covers exactly the schema's fields, so a schema change cannot silently diverge from it.
"""

from __future__ import annotations

import importlib.resources
import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib.resources.abc import Traversable
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from bridge.normalize import ContractUpdate

CONTRACT_UPDATE_SCHEMA = "contract_update.avsc"


@dataclass(frozen=True)
class Schema:
    """A parsed Avro schema with the identifiers consumers see in record headers."""

    name: str
    definition: dict[str, Any]

    @cached_property
    def parsed(self) -> dict[str, Any]:
        """The fastavro-parsed form, for reading and for the reference writer."""
        parsed = parse_schema(self.definition)
        assert isinstance(parsed, dict)  # a record schema parses to a dict
        return parsed

    @cached_property
    def fingerprint(self) -> str:
        """CRC-64-AVRO fingerprint of the parsing canonical form, in hex."""
        canonical = to_parsing_canonical_form(self.parsed)
        return str(fingerprint(canonical, "CRC-64-AVRO"))


RELEASED_SCHEMAS = "history"  # every released version, schemas/history/<name>.v<N>.avsc


def schema_from_text(text: str) -> Schema:
    """A schema from the text of an .avsc file (a named record with a namespace, as schemas/ holds)."""
    definition = json.loads(text)
    return Schema(name=f"{definition['namespace']}.{definition['name']}", definition=definition)


def _schema_of(resource: Traversable) -> Schema:
    return schema_from_text(resource.read_text("utf-8"))


def load_schema(filename: str = CONTRACT_UPDATE_SCHEMA) -> Schema:
    """Load one .avsc file from the schemas shipped with the package."""
    return _schema_of(importlib.resources.files("bridge.schemas").joinpath(filename))


def load_released_schemas() -> list[Schema]:
    """Every released version of the shipped schemas (schemas/history), by file name."""
    folder = importlib.resources.files("bridge.schemas").joinpath(RELEASED_SCHEMAS)
    entries = sorted((entry for entry in folder.iterdir() if entry.name.endswith(".avsc")), key=lambda e: e.name)
    return [_schema_of(entry) for entry in entries]


class SchemaHistory:
    """The shipped schema and every released version of it, by fingerprint: what reads a value any version
    of the bridge wrote.

    Records outlive the process that encoded them: in the spool, after an upgrade that changed the
    schema, and on the topics, where a consumer meets values older versions wrote. A value is read with
    the version its `schema-fingerprint` header names and, for the spool, written again in the current
    schema (Avro schema resolution fills new fields with their defaults). Off the hot path, so fastavro's
    generic reader and writer are fast enough here.
    """

    def __init__(self, current: Schema, released: Sequence[Schema]) -> None:
        self.current = current
        self.fingerprint = current.fingerprint.encode()
        self._writers = {schema.fingerprint.encode(): schema for schema in released if schema.name == current.name}
        self._writers[self.fingerprint] = current

    @classmethod
    def shipped(cls) -> SchemaHistory:
        """The schema the package ships and its released versions (schemas/history)."""
        return cls(load_schema(), load_released_schemas())

    def writer(self, fingerprint: bytes) -> Schema | None:
        """The version with `fingerprint`; None for one this version does not ship (a newer bridge's)."""
        return self._writers.get(fingerprint)

    def upgrade(self, value: bytes, fingerprint: bytes) -> bytes | None:
        """`value` in the current schema (itself when already in it); None when `fingerprint` names no
        released version (a value written by a newer bridge, before a downgrade)."""
        if fingerprint == self.fingerprint:
            return value
        writer = self.writer(fingerprint)
        if writer is None:
            return None
        decoded = schemaless_reader(io.BytesIO(value), writer.parsed, self.current.parsed)
        out = io.BytesIO()
        schemaless_writer(out, self.current.parsed, decoded)
        return out.getvalue()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Varints are built from 14-bit groups looked up in tables rather than 7 bits at a time in a loop:
# _FINAL[n] encodes n < 2**14 as a last group, _MIDDLE[n] as two bytes with the continuation bit set.
_FINAL = tuple(_varint(group) for group in range(1 << 14))
_MIDDLE = tuple(bytes(((group & 0x7F) | 0x80, (group >> 7) | 0x80)) for group in range(1 << 14))


def _long(value: int) -> bytes:
    zigzag = (value << 1) ^ (value >> 63)
    if zigzag < 0x4000:
        return _FINAL[zigzag]
    if zigzag < 0x10000000:
        return _MIDDLE[zigzag & 0x3FFF] + _FINAL[zigzag >> 14]
    if zigzag < 0x40000000000:
        return _MIDDLE[zigzag & 0x3FFF] + _MIDDLE[(zigzag >> 14) & 0x3FFF] + _FINAL[zigzag >> 28]
    if zigzag < 0x100000000000000:  # microsecond timestamps land here
        return (
            _MIDDLE[zigzag & 0x3FFF]
            + _MIDDLE[(zigzag >> 14) & 0x3FFF]
            + _MIDDLE[(zigzag >> 28) & 0x3FFF]
            + _FINAL[zigzag >> 42]
        )
    return _varint(zigzag)


def _string(value: str) -> bytes:
    data = value.encode()
    return _long(len(data)) + data


# Contract ids and names, the channel and the session id repeat on every record: encode each once.
_STRING_CACHE: dict[str, bytes] = {}
_STRING_CACHE_LIMIT = 100_000


def _cached_string(value: str) -> bytes:
    encoded = _STRING_CACHE.get(value)
    if encoded is None:
        if len(_STRING_CACHE) >= _STRING_CACHE_LIMIT:
            _STRING_CACHE.clear()
        encoded = _STRING_CACHE[value] = _string(value)
    return encoded


_double = struct.Struct("<d").pack
_two_doubles = struct.Struct("<dd").pack
_seven_doubles = struct.Struct("<ddddddd").pack
_NULL = b"\x00"  # union branch 0 (null); also the end of an array
_PRESENT = b"\x02"  # union branch 1
_ENDPOINT_SYMBOLS = {"ID": _long(0), "NAME": _long(1)}
_TRUE, _FALSE = b"\x01", b"\x00"
# Levels, quantities, counts and open interest are small non-negative numbers: one lookup, not a call.
_SMALL = 1 << 13
_SMALL_LONGS = tuple(_FINAL[value << 1] for value in range(_SMALL))
# Microsecond timestamps from 1970-01-26 to the year 3111 encode as exactly four 14-bit groups.
_TIME_LOW, _TIME_HIGH = 1 << 41, 1 << 55

# The fields up to the endpoint and channel repeat on every record of a contract: encoded once per contract.
_HEADS: dict[tuple[str, str | None, str, str], bytes] = {}


def _head(contract_id: str, name: str | None, endpoint: str, channel: str) -> bytes:
    if len(_HEADS) >= _STRING_CACHE_LIMIT:
        _HEADS.clear()
    head = _HEADS[contract_id, name, endpoint, channel] = b"".join(
        (
            _cached_string(contract_id),
            _NULL if name is None else _PRESENT + _cached_string(name),
            _ENDPOINT_SYMBOLS[endpoint],
            _cached_string(channel),
        )
    )
    return head


def encode_update(update: ContractUpdate) -> bytes:
    """The Avro binary encoding of `update` under schemas/contract_update.avsc (no framing)."""
    contract_id, name, endpoint, channel = update.contract_id, update.contract_name, update.endpoint, update.channel
    head = _HEADS.get((contract_id, name, endpoint, channel)) or _head(contract_id, name, endpoint, channel)
    parts = [head]
    for value in (update.exchange_time, update.receive_time):
        if _TIME_LOW <= value < _TIME_HIGH:  # zigzag is value << 1, four groups: no zigzag, no range tests
            zigzag = value << 1
            parts += (
                _MIDDLE[zigzag & 0x3FFF],
                _MIDDLE[(zigzag >> 14) & 0x3FFF],
                _MIDDLE[(zigzag >> 28) & 0x3FFF],
                _FINAL[zigzag >> 42],
            )
        else:
            parts.append(_long(value))
    levels = update.best_limit
    if levels:
        count = len(levels)
        parts.append(_SMALL_LONGS[count] if count < _SMALL else _long(count))
        for level in levels:
            number, buy, sell = level.level, level.buy_quantity, level.sell_quantity
            parts += (
                _SMALL_LONGS[number] if 0 <= number < _SMALL else _long(number),
                _SMALL_LONGS[buy] if 0 <= buy < _SMALL else _long(buy),
                _double(level.buy_price),
                _SMALL_LONGS[sell] if 0 <= sell < _SMALL else _long(sell),
                _double(level.sell_price),
            )
    parts.append(_NULL)

    aggregate = update.aggregate
    if aggregate is None:
        parts.append(_NULL)
    else:
        trade_date, trade_time = aggregate.trade_date, aggregate.trade_time
        trades, volume = aggregate.trade_count, aggregate.total_volume
        parts += (
            _PRESENT,
            _NULL if trade_date is None else _PRESENT + _long(trade_date),
            _NULL if trade_time is None else _PRESENT + _long(trade_time),
            _SMALL_LONGS[trades] if 0 <= trades < _SMALL else _long(trades),
            _SMALL_LONGS[volume] if 0 <= volume < _SMALL else _long(volume),
            _seven_doubles(
                aggregate.total_value,
                aggregate.closing_price,
                aggregate.last_price,
                aggregate.low_price,
                aggregate.high_price,
                aggregate.open_price,
                aggregate.previous_close,
            ),
        )

    price_range = update.allowed_price_range
    info = update.contract_info
    sequence, skipped = update.sequence, update.skipped
    parts += (
        _NULL if price_range is None else _PRESENT + _two_doubles(price_range.min_price, price_range.max_price),
        _NULL if info is None else _PRESENT + _long(info.open_interest) + _long(info.open_interest_change),
        _SMALL_LONGS[sequence] if 0 <= sequence < _SMALL else _long(sequence),
        _cached_string(update.session_id),
        _SMALL_LONGS[skipped] if 0 <= skipped < _SMALL else _long(skipped),
        _TRUE if update.first_after_subscribe else _FALSE,
    )
    return b"".join(parts)
