"""pipeline: frames to records, flags and duplicates, and the publisher's accounting, in memory."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

from fastavro import schemaless_reader, schemaless_writer

from bridge.buffer import DeliveryBuffer
from bridge.config import BufferSettings
from bridge.encode import load_released_schemas, load_schema
from bridge.intake import Intake
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory, Normalizer
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.publisher import Publisher
from bridge.records import (
    Failed,
    MemorySink,
    Outcome,
    OutgoingRecord,
    RawFrames,
    RecordKind,
    SinkUnavailable,
    TooLarge,
    frame_count,
    with_raw_frames,
)
from bridge.retry import Backoff
from bridge.spool import Spool

SCHEMA = load_schema()
BY_ID = ConnectionInfo(Subscription("id-0", Endpoint.ID, ("1001", "1002")), attempt=3)
BY_NAME = ConnectionInfo(Subscription("name-0", Endpoint.NAME, ("GC1405",)), attempt=1)


def frame(identifier: dict[str, str], last_price: int = 100) -> str:
    return json.dumps(
        {
            "channel": "IME Stream",
            **identifier,
            "timestamp": "2026-05-29T12:00:00Z",
            "data": {"ContractInfo": {"open_interest": last_price, "open_interest_changes": 0}},
        }
    )


def make_pipeline(
    capacity: int = 100,
    max_frame_bytes: int = 10_000,
    suppress_duplicates: bool = False,
    *,
    capture_raw: bool = False,
    normalize: bool = True,
) -> tuple[Intake, Metrics]:
    metrics = Metrics()
    settings = BufferSettings(capacity_records=capacity, suppress_duplicates=suppress_duplicates)
    pipeline = Intake(
        normalizer=Normalizer(session_id="s", contracts=ContractDirectory({"1001": "GC1405"})),
        buffer=DeliveryBuffer(settings, metrics=metrics),
        metrics=metrics,
        schema=SCHEMA,
        max_frame_bytes=max_frame_bytes,
        suppress_duplicates=settings.suppress_duplicates,
        dead_letter_raw_bytes=settings.dead_letter_raw_bytes,
        capture_raw=capture_raw,
        normalize=normalize,
    )
    return pipeline, metrics


async def take_all(pipeline: Intake) -> list[OutgoingRecord]:
    """A round's records, then its raw frames as records."""
    taken = await pipeline.buffer.take(1000)
    return with_raw_frames(taken.records, taken.raw)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def decode(record: OutgoingRecord) -> dict[str, object]:
    value = schemaless_reader(io.BytesIO(record.value), SCHEMA.parsed, SCHEMA.parsed)
    assert isinstance(value, dict)
    return value


async def test_same_key_and_one_sequence_per_contract_whichever_endpoint() -> None:
    pipeline, _ = make_pipeline()
    pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID)
    pipeline.on_frame(frame({"contractName": "GC1405"}), 2, BY_NAME)
    pipeline.on_frame(frame({"contractId": "1002"}), 3, BY_ID)

    records = await take_all(pipeline)
    assert [record.key for record in records] == [b"1001", b"1001", b"1002"]
    assert [decode(record)["sequence"] for record in records] == [1, 2, 1]
    assert [decode(record)["endpoint"] for record in records] == ["ID", "NAME", "ID"]
    headers = dict(records[0].headers)
    assert headers == {
        "schema": b"ir.ime.bridge.ContractUpdate",
        "schema-fingerprint": SCHEMA.fingerprint.encode(),
        "endpoint": b"id",
        "connection": b"id-0/3",
    }
    assert dict(records[1].headers)["connection"] == b"name-0/1"


async def test_with_raw_capture_each_frame_goes_as_received_keyed_like_its_update() -> None:
    pipeline, _ = make_pipeline(capture_raw=True)
    pipeline.on_connection_open(BY_ID)
    good = frame({"contractId": "1001"}).encode()
    pipeline.on_frame(good, 7, BY_ID)
    pipeline.on_frame(b"{broken", 8, BY_ID)

    # The raw frames wait apart from the records (after the marker, a record of its own), in order.
    marker, update, broken, raw_good, raw_broken = await take_all(pipeline)
    assert [r.kind for r in (marker, update, broken, raw_good, raw_broken)] == [
        RecordKind.RAW,
        RecordKind.UPDATE,
        RecordKind.DEAD_LETTER,
        RecordKind.RAW,
        RecordKind.RAW,
    ]
    assert dict(marker.headers)["raw-event"] == b"subscribed"
    assert (raw_good.key, raw_good.value, dict(raw_good.headers)["receive-time-us"]) == (b"1001", good, b"7")
    assert (raw_broken.key, raw_broken.value) == (None, b"{broken")
    assert decode(update)["sequence"] == 1
    pipeline.on_frame(frame({"contractId": "9999"}), 9, BY_ID)  # an id nobody subscribed: not a key
    unknown, raw_unknown = await take_all(pipeline)
    assert dict(unknown.headers)["reason"] == b"unknown_contract"
    assert (raw_unknown.kind, raw_unknown.key) == (RecordKind.RAW, None)


async def test_capture_only_parses_nothing() -> None:
    pipeline, metrics = make_pipeline(capture_raw=True, normalize=False)
    pipeline.on_frame(b"{broken", 8, BY_ID)
    pipeline.on_frame(frame({"contractId": "1001"}), 9, BY_ID)
    assert [record.kind for record in await take_all(pipeline)] == [RecordKind.RAW, RecordKind.RAW]
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="invalid_json") == 0


async def test_without_raw_capture_a_connection_opening_adds_nothing() -> None:
    pipeline, _ = make_pipeline()
    pipeline.on_connection_open(BY_ID)
    assert len(pipeline.buffer) == 0


async def test_rejected_and_oversized_frames_become_dead_letters() -> None:
    pipeline, metrics = make_pipeline(max_frame_bytes=2000)
    pipeline.on_frame("{broken", 5, BY_ID)
    pipeline.on_frame(frame({"contractId": "1001"}) + " " * 3000, 6, BY_ID)

    broken, oversized = await take_all(pipeline)
    assert (broken.kind, broken.key, broken.value) == (RecordKind.DEAD_LETTER, None, b"{broken")
    assert dict(broken.headers)["reason"] == b"invalid_json"
    assert dict(broken.headers)["receive-time-us"] == b"5"
    assert dict(broken.headers)["connection"] == b"id-0/3"
    assert dict(oversized.headers)["reason"] == b"oversized"
    assert b"exceeds ime.max_frame_bytes=2000" in dict(oversized.headers)["detail"]
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="invalid_json") == 1
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="oversized") == 1


async def test_first_record_after_each_subscription_is_flagged() -> None:
    pipeline, _ = make_pipeline()
    reconnected = ConnectionInfo(BY_ID.subscription, attempt=4)
    for connection in (BY_ID, BY_ID, reconnected, reconnected):
        pipeline.on_frame(frame({"contractId": "1001"}), 1, connection)
    pipeline.on_frame(frame({"contractId": "1002"}), 1, reconnected)
    flags = [(record.key, decode(record)["first_after_subscribe"]) for record in await take_all(pipeline)]
    assert flags == [(b"1001", True), (b"1001", False), (b"1001", True), (b"1001", False), (b"1002", True)]


async def test_identical_snapshots_are_suppressed_when_configured_and_counted() -> None:
    pipeline, metrics = make_pipeline(suppress_duplicates=True)
    reconnected = ConnectionInfo(BY_ID.subscription, attempt=4)
    pipeline.on_frame(frame({"contractId": "1001"}, 5), 1, BY_ID)
    pipeline.on_frame(frame({"contractId": "1001"}, 5), 2, BY_ID)
    pipeline.on_frame(frame({"contractId": "1001"}, 5), 3, reconnected)  # a resend after the reconnect
    pipeline.on_frame(frame({"contractId": "1001"}, 6), 4, reconnected)
    values = [decode(record) for record in await take_all(pipeline)]
    assert [(v["sequence"], v["first_after_subscribe"]) for v in values] == [(1, True), (2, True)]
    assert values[1]["contract_info"]["open_interest"] == 6
    assert sample(metrics, "ime_bridge_duplicates_suppressed_total") == 2


async def test_without_suppression_identical_snapshots_are_published() -> None:
    pipeline, _ = make_pipeline()
    for _ in range(3):
        pipeline.on_frame(frame({"contractId": "1001"}, 5), 1, BY_ID)
    assert [decode(record)["sequence"] for record in await take_all(pipeline)] == [1, 2, 3]


async def test_publisher_accounts_for_every_outcome() -> None:
    pipeline, metrics = make_pipeline()
    sink = MemorySink()
    publisher = Publisher(pipeline.buffer, sink, metrics, max_batch_records=10_000)
    task = asyncio.create_task(publisher.run())
    for price in range(5):
        pipeline.on_frame(frame({"contractId": "1001"}, price), price, BY_ID)
    pipeline.on_frame("garbage", 9, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()

    assert [record.kind for record in sink.records] == [RecordKind.UPDATE] * 5 + [RecordKind.DEAD_LETTER]
    assert sample(metrics, "ime_bridge_messages_published_total", topic="update") == 5
    assert sample(metrics, "ime_bridge_dead_letters_total", reason="invalid_json") == 1
    assert sample(metrics, "ime_bridge_publish_latency_seconds_count") == 5


class SlowSink(MemorySink):
    """Takes `seconds` to acknowledge each round, like a distant broker."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        await asyncio.sleep(self.seconds)
        return await super().publish(records, raw)


async def test_each_rounds_duration_is_timed_apart_from_the_wait_before_it() -> None:
    """ime_bridge_publish_round_seconds is Kafka's share of the publish latency: the round, not its linger."""
    pipeline, metrics = make_pipeline()
    publisher = Publisher(pipeline.buffer, SlowSink(0.05), metrics, max_batch_records=10_000, linger=0.2)
    task = asyncio.create_task(publisher.run())
    for price in range(3):
        pipeline.on_frame(frame({"contractId": "1001"}, price), time.time_ns() // 1000, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()
    rounds = sample(metrics, "ime_bridge_publish_rounds_total")
    assert rounds >= 1
    assert sample(metrics, "ime_bridge_publish_round_seconds_count") == rounds
    assert sample(metrics, "ime_bridge_publish_round_seconds_bucket", le="0.025") == 0, "each round took 50 ms"
    assert sample(metrics, "ime_bridge_publish_round_seconds_sum") < 0.2 * rounds, "without the 200 ms linger"
    assert sample(metrics, "ime_bridge_publish_latency_seconds_bucket", le="0.1") == 0, "latency: linger + round"


async def test_failed_records_are_sent_again_in_order_and_counted() -> None:
    pipeline, metrics = make_pipeline()
    sink = FlakySink(failures=2)
    publisher = Publisher(pipeline.buffer, sink, metrics, max_batch_records=10_000, retry_backoff=Backoff(0.001, 0.01))
    task = asyncio.create_task(publisher.run())
    for price in range(4):
        pipeline.on_frame(frame({"contractId": "1001"}, price), price, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()
    assert [decode(record)["sequence"] for record in sink.records] == [1, 2, 3, 4]
    assert sample(metrics, "ime_bridge_produce_errors_total", error="SinkUnavailable") == 8
    assert sample(metrics, "ime_bridge_messages_published_total", topic="update") == 4


async def test_raw_frames_of_a_failed_round_are_sent_again_once_each_in_order_and_counted() -> None:
    pipeline, metrics = make_pipeline(capture_raw=True)
    sink = FlakySink(failures=1)
    publisher = Publisher(pipeline.buffer, sink, metrics, max_batch_records=10_000, retry_backoff=Backoff(0.001, 0.01))
    task = asyncio.create_task(publisher.run())
    frames = [frame({"contractId": "1001"}, price).encode() for price in range(4)] + [b"garbage"]
    for receive_time, sent in enumerate(frames):
        pipeline.on_frame(sent, receive_time, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()
    assert [record.value for record in sink.records if record.kind is RecordKind.RAW] == frames
    assert sample(metrics, "ime_bridge_messages_published_total", topic="raw") == 5
    assert sample(metrics, "ime_bridge_messages_published_total", topic="update") == 4
    assert sample(metrics, "ime_bridge_produce_errors_total", error="SinkUnavailable") == 4 + 1 + 5


class FlakySink(MemorySink):
    """Fails the first `failures` rounds entirely."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        if self.failures:
            self.failures -= 1
            return [Failed("SinkUnavailable")] * (len(records) + frame_count(raw))
        return await super().publish(records, raw)


class BrokenProducerSink(MemorySink):
    """A sink whose producer dies once (its sender task failed): publish raises until restarted."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        self.broken = False
        await super().start()

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        if self.broken:
            raise SinkUnavailable("the producer failed: RuntimeError('sender died')")
        return await super().publish(records, raw)


async def test_an_unusable_producer_is_replaced_and_the_round_sent_again() -> None:
    pipeline, metrics = make_pipeline()
    sink = BrokenProducerSink()
    publisher = Publisher(pipeline.buffer, sink, metrics, max_batch_records=10_000, retry_backoff=Backoff(0.001, 0.01))
    task = asyncio.create_task(publisher.run())
    pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()
    assert sink.starts == 1
    assert sample(metrics, "ime_bridge_producer_restarts_total") == 1
    assert [decode(record)["sequence"] for record in sink.records] == [1]


class TooLargeSink(MemorySink):
    """Kafka refuses records on the updates topic as too large."""

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for record in records:
            if record.kind is RecordKind.UPDATE:
                outcomes.append(TooLarge())
            else:
                self.records.append(record)
                outcomes.append(None)
        return outcomes


async def test_a_record_kafka_finds_too_large_goes_to_the_dead_letter_topic() -> None:
    pipeline, metrics = make_pipeline()
    sink = TooLargeSink()
    publisher = Publisher(pipeline.buffer, sink, metrics, max_batch_records=10_000)
    task = asyncio.create_task(publisher.run())
    pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()
    (letter,) = sink.records
    assert (letter.kind, letter.key, dict(letter.headers)["reason"]) == (
        RecordKind.DEAD_LETTER,
        b"1001",
        b"record_too_large",
    )
    assert decode(letter)["contract_id"] == "1001", "the dead letter keeps the encoded record"
    assert sample(metrics, "ime_bridge_dead_letters_total", reason="record_too_large") == 1


async def test_spooled_updates_an_older_version_wrote_go_out_in_the_current_schema(tmp_path: Path) -> None:
    """After an upgrade that changed the schema, the spool still holds values written with the previous one."""
    older = next(schema for schema in load_released_schemas() if schema.fingerprint != SCHEMA.fingerprint)
    pipeline, _ = make_pipeline()
    pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID)
    (current,) = await take_all(pipeline)
    written = io.BytesIO()
    schemaless_writer(written, older.parsed, decode(current))  # what the previous version spooled
    headers = [(name, value) for name, value in current.headers if name != "schema-fingerprint"]
    previous = OutgoingRecord(
        RecordKind.UPDATE,
        b"1001",
        written.getvalue(),
        [*headers, ("schema-fingerprint", older.fingerprint.encode())],
        1.0,
    )
    from_a_newer_version = OutgoingRecord(
        RecordKind.UPDATE,
        b"1002",
        b"\x08abcd",
        [("schema", SCHEMA.name.encode()), ("schema-fingerprint", b"f" * 16)],
        2.0,
    )
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    for record in (previous, current, from_a_newer_version):
        spool.append(record)
    spool.close()

    metrics = Metrics()
    restarted = Spool(tmp_path, max_bytes=1 << 20)
    restarted.open()
    spooling = BufferSettings(overflow="spool", spool_dir=tmp_path)
    buffer = DeliveryBuffer(spooling, metrics=metrics, spool=restarted)
    sink = MemorySink()
    publisher = Publisher(buffer, sink, metrics, max_batch_records=10_000)
    task = asyncio.create_task(publisher.run())
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()

    upgraded, unchanged, dead = sink.records
    # The previous version's value in the current schema, the fields it lacked at their defaults.
    assert decode(current)["first_after_subscribe"] is True
    assert decode(upgraded) == {**decode(current), "first_after_subscribe": False, "skipped": 0}
    assert dict(upgraded.headers) == dict(current.headers)  # the current fingerprint, other headers kept
    assert (unchanged.value, unchanged.headers) == (current.value, current.headers)
    assert (dead.kind, dead.value, dict(dead.headers)["reason"]) == (
        RecordKind.DEAD_LETTER,
        b"\x08abcd",
        b"unknown_schema",
    )
    assert b"ffffffffffffffff" in dict(dead.headers)["detail"]
    assert sample(metrics, "ime_bridge_dead_letters_total", reason="unknown_schema") == 1
    assert sample(metrics, "ime_bridge_messages_published_total", topic="update") == 2
