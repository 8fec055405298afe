"""`ime-bridge tail`: read a topic and print its records decoded, as JSON lines or a live table.

Both framings are decoded, into the shipped schema. Plain Avro values are read with the released version
their `schema-fingerprint` header names (schemas/history). Values in Confluent's wire format (magic byte
0, schema id, Avro body: the bridge with a schema registry) are read with the schema the registry holds
under that id when `schema_registry` is given, else the same way as plain ones. A ContractUpdate's plain
encoding never starts with byte 0 (its first field is a non-empty string), so the first byte tells the
framings apart. Dead letters, and values no known schema reads, print their headers and raw bytes. This
is what a downstream developer runs to see what the bridge publishes.

Filters: only given keys (contract ids), only records written at or after a time (each partition starts at
the first offset Kafka holds for that time). `dead_letters` reads the dead-letter topic as such: each record's
reason, detail and a readable excerpt of the refused frame. The confluent-kafka registry client is loaded
only when a registry is given (bridge/registry.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from fastavro import schemaless_reader

from bridge.config import KafkaSettings, SchemaRegistrySettings
from bridge.encode import Schema, SchemaHistory
from bridge.records import HEADER_CONNECTION, HEADER_DETAIL, HEADER_ENDPOINT, HEADER_REASON, HEADER_RECEIVE_TIME
from bridge.registry import SchemaRegistry, split_framed
from bridge.sink import client_options

Decoded = dict[str, Any]
# How much of a refused frame a dead letter's excerpt shows, in characters.
EXCERPT_CHARS = 160


def decode_record(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    history: SchemaHistory,
    registered: Mapping[int, Schema] | None = None,
) -> Decoded:
    """A consumed record as plain data: key, headers, and the value decoded when its schema is known.

    The value is read with its writer schema (the registry's under the framed id, in `registered`, or the
    released version its `schema-fingerprint` header names) into the shipped one, so records any version
    of the bridge wrote come out with the same fields.
    """
    header_map = {name: raw.decode("utf-8", "replace") for name, raw in headers}
    decoded: Decoded = {"key": key.decode("utf-8", "replace") if key is not None else None, "headers": header_map}
    reader = history.current if header_map.get("schema") == history.current.name else None
    body, writer = value, history.writer(header_map.get("schema-fingerprint", "").encode())
    framed = split_framed(value) if value is not None and reader is not None else None
    if framed is not None:
        schema_id, body = framed
        decoded["schema_id"] = schema_id
        writer = (registered or {}).get(schema_id, writer)
    if reader is not None and writer is not None and body is not None:
        try:
            decoded["value"] = schemaless_reader(io.BytesIO(body), writer.parsed, reader.parsed)
            return decoded
        except Exception as exc:  # fastavro's errors for a body its schema does not describe vary by field
            decoded["error"] = f"not readable as {writer.name} {writer.fingerprint}: {exc!r}"
    decoded["raw"] = (value or b"").decode("utf-8", "replace")
    return decoded


def excerpt(raw: bytes | None, limit: int = EXCERPT_CHARS) -> str:
    """A refused frame fit for one terminal line: UTF-8 where it is, escapes for control characters and
    undecodable bytes, cut at `limit` characters with the frame's full size said."""
    data = raw or b""
    readable = _printable(data.decode("utf-8", "backslashreplace"))
    if len(readable) <= limit:
        return readable
    return f"{readable[:limit]}… ({len(data)} bytes)"


def _printable(text: str) -> str:
    """`text` with control characters (newlines, terminal escapes) escaped: one line, nothing a terminal runs."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def decode_dead_letter(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> Decoded:
    """A dead letter as plain data: why it was refused (`reason`, `detail`), where it came from, when it was
    received, and an excerpt of the raw frame."""
    header_map = {name: raw.decode("utf-8", "replace") for name, raw in headers}
    return {
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "reason": header_map.get(HEADER_REASON),
        "detail": header_map.get(HEADER_DETAIL),
        "endpoint": header_map.get(HEADER_ENDPOINT),
        "connection": header_map.get(HEADER_CONNECTION),
        "received": _receive_time(header_map.get(HEADER_RECEIVE_TIME, "")),
        "size": len(value or b""),
        "excerpt": excerpt(value),
    }


def _receive_time(microseconds: str) -> str | None:
    """The `receive-time-us` header as an ISO time; None when it is not a time (a header is whatever was written)."""
    if not (microseconds.isascii() and microseconds.isdigit()):
        return None
    try:
        return datetime.fromtimestamp(int(microseconds) / 1_000_000, UTC).isoformat()
    except (OverflowError, OSError, ValueError):  # past what the platform's time can hold
        return None


def format_dead_letter(record: Decoded) -> str:
    """One line per dead letter, for a terminal: time, reason, key, detail, then the frame's excerpt."""
    received = (record.get("received") or "")[11:23]
    reason, key, detail = (_printable(record[field] or "") for field in ("reason", "key", "detail"))
    return f"{received:<12} {reason or '?':<20} key={key or '-':<8} {detail} | {record['excerpt']}"


def format_number(value: Any) -> str:
    """A price with thousands separators and the decimals it has (none for whole numbers)."""
    if isinstance(value, float) and value.is_integer():
        return f"{value:,.0f}"
    return f"{value:,}"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def format_table(latest: dict[str, Decoded]) -> str:
    """The live table: one row per contract (its latest record), prices with the decimals they have."""
    lines = [f"{'contract':>10} {'name':<14} {'seq':>7} {'bid':>12} {'ask':>12} {'last':>12}  exchange time"]
    for contract_id in sorted(latest):
        value = latest[contract_id]["value"]
        level = value["best_limit"][0] if value["best_limit"] else {}
        aggregate = value["aggregate"] or {}
        exchange_time = value["exchange_time"]
        lines.append(
            f"{contract_id:>10} {(value['contract_name'] or ''):<14} {value['sequence']:>7} "
            f"{format_number(level.get('buy_price', 0)):>12} {format_number(level.get('sell_price', 0)):>12} "
            f"{format_number(aggregate.get('last_price', 0)):>12}  {exchange_time.astimezone(UTC):%H:%M:%S.%f}"
        )
    return "\n".join(lines)


async def tail(
    kafka: KafkaSettings,
    topic: str,
    *,
    from_beginning: bool = True,
    max_records: int | None = None,
    idle_timeout: float | None = None,
    table: bool = False,
    out: TextIO | None = sys.stdout,
    on_record: Callable[[Decoded], None] | None = None,
    schema_registry: SchemaRegistrySettings | None = None,
    keys: Sequence[str] = (),
    since: datetime | None = None,
    dead_letters: bool = False,
) -> int:
    """Print records of `topic` (on the cluster `kafka` connects to) until `max_records` were read or
    nothing arrived for `idle_timeout` s.

    Each decoded record goes to `on_record` when given, and to `out` (JSON lines, the table, or one line
    per dead letter) unless None. Framed values are read with the schema `schema_registry` holds under
    their id, when given. Only records keyed by one of `keys` (when given) and written at or after
    `since` (when given) are read and counted; `dead_letters` decodes them as dead letters.
    """
    history = SchemaHistory.shipped()
    lookup = _RegistryLookup(schema_registry) if schema_registry is not None else None
    wanted = {key.encode() for key in keys}
    consumer = AIOKafkaConsumer(
        *([] if since is not None else [topic]),
        **client_options(kafka),
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    if since is not None:
        try:
            await _seek_to_time(consumer, topic, since)
        except BaseException:
            await consumer.stop()
            raise
    printed = 0
    latest: dict[str, Decoded] = {}
    loop = asyncio.get_running_loop()
    last_seen = loop.time()
    try:
        while max_records is None or printed < max_records:
            batches = await consumer.getmany(
                timeout_ms=200, max_records=None if max_records is None else max_records - printed
            )
            for messages in batches.values():
                for message in messages:
                    if wanted and message.key not in wanted:
                        continue
                    if dead_letters:
                        decoded = decode_dead_letter(message.key, message.value, message.headers)
                    else:
                        registered = await lookup.schemas_for(message) if lookup is not None else None
                        decoded = decode_record(message.key, message.value, message.headers, history, registered)
                    decoded |= {"partition": message.partition, "offset": message.offset}
                    printed += 1
                    if on_record is not None:
                        on_record(decoded)
                    if out is None:
                        continue
                    if dead_letters and table:
                        out.write(format_dead_letter(decoded) + "\n")
                    elif table and "value" in decoded:
                        latest[decoded["key"]] = decoded
                    elif not table:
                        out.write(json.dumps(decoded, default=_json_default, ensure_ascii=False) + "\n")
            if batches:
                last_seen = loop.time()
                if out is not None:
                    if table and not dead_letters:
                        out.write("\x1b[H\x1b[J" + format_table(latest) + "\n")
                    out.flush()
            elif idle_timeout is not None and loop.time() - last_seen > idle_timeout:
                break
    finally:
        await consumer.stop()
        if lookup is not None:
            lookup.close()
    return printed


async def _seek_to_time(consumer: AIOKafkaConsumer, topic: str, since: datetime) -> None:
    """Read every partition of `topic` from the first record written at or after `since` (a partition with
    none yet starts at its end)."""
    await consumer.topics()  # fetches the cluster's metadata
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise LookupError(f"topic {topic!r} does not exist")
    assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
    consumer.assign(assigned)
    millis = int(since.timestamp() * 1000)
    found = await consumer.offsets_for_times(dict.fromkeys(assigned, millis))
    for partition, position in found.items():
        if position is None:
            await consumer.seek_to_end(partition)
        else:
            consumer.seek(partition, position.offset)


class _RegistryLookup:
    """The registry's schema for a framed value's id (SchemaRegistry caches it); an id it cannot give is
    not asked for again."""

    def __init__(self, settings: SchemaRegistrySettings) -> None:
        self._registry = SchemaRegistry(settings)
        self._failed: set[int] = set()

    async def schemas_for(self, message: ConsumerRecord[Any, Any]) -> Mapping[int, Schema]:
        """The schema `message` is framed with, by its id, when the registry has it (else nothing)."""
        value, has_schema = message.value, any(name == "schema" for name, _ in message.headers)
        framed = split_framed(value) if value is not None and has_schema else None
        if framed is None or framed[0] in self._failed:
            return {}
        schema_id = framed[0]
        try:
            return {schema_id: await self._registry.schema(schema_id)}
        except Exception as exc:
            self._failed.add(schema_id)
            print(f"ime-bridge tail: schema id {schema_id}: {exc}", file=sys.stderr)
            return {}

    def close(self) -> None:
        """Close the registry's HTTP session."""
        self._registry.close()
