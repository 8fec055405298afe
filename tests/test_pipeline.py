"""pipeline: frames to records, the buffer's backpressure and the publisher's accounting, in memory."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from fastavro import schemaless_reader

from bridge.encode import load_schema
from bridge.metrics import Metrics
from bridge.normalize import Normalizer
from bridge.pipeline import FramePipeline, Publisher, RecordBuffer
from bridge.planner import Subscription
from bridge.protocol import Endpoint
from bridge.sink import MemorySink, OutgoingRecord, SinkUnavailable
from bridge.source import ConnectionInfo

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


def make_pipeline(capacity: int = 100, max_frame_bytes: int = 10_000) -> tuple[FramePipeline, Metrics]:
    metrics = Metrics()
    pipeline = FramePipeline(
        normalizer=Normalizer(session_id="s", names_by_id={"1001": "GC1405"}, ids_by_name={"GC1405": "1001"}),
        buffer=RecordBuffer(capacity),
        metrics=metrics,
        schema=SCHEMA,
        topic="updates",
        dlq_topic="dead",
        max_frame_bytes=max_frame_bytes,
    )
    return pipeline, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def decode(record: OutgoingRecord) -> dict[str, object]:
    value = schemaless_reader(io.BytesIO(record.value), SCHEMA.parsed, SCHEMA.parsed)
    assert isinstance(value, dict)
    return value


async def test_same_key_and_one_sequence_per_contract_whichever_endpoint() -> None:
    pipeline, _ = make_pipeline()
    assert pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID) is None
    pipeline.on_frame(frame({"contractName": "GC1405"}), 2, BY_NAME)
    pipeline.on_frame(frame({"contractId": "1002"}), 3, BY_ID)

    records = await pipeline.buffer.take(10)
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


async def test_rejected_and_oversized_frames_become_dead_letters() -> None:
    pipeline, metrics = make_pipeline(max_frame_bytes=2000)
    pipeline.on_frame("{broken", 5, BY_ID)
    pipeline.on_frame(frame({"contractId": "1001"}) + " " * 3000, 6, BY_ID)

    broken, oversized = await pipeline.buffer.take(10)
    assert (broken.topic, broken.key, broken.value) == ("dead", None, b"{broken")
    assert dict(broken.headers)["reason"] == b"invalid_json"
    assert dict(broken.headers)["receive-time-us"] == b"5"
    assert dict(broken.headers)["connection"] == b"id-0/3"
    assert dict(oversized.headers)["reason"] == b"oversized"
    assert b"exceeds ime.max_frame_bytes=2000" in dict(oversized.headers)["detail"]
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="invalid_json") == 1
    assert sample(metrics, "ime_bridge_messages_rejected_total", reason="oversized") == 1


async def test_a_full_buffer_makes_the_reader_wait_and_loses_nothing() -> None:
    pipeline, _ = make_pipeline(capacity=2)
    assert pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID) is None
    waiter = pipeline.on_frame(frame({"contractId": "1001"}), 2, BY_ID)
    assert waiter is not None
    waiting = asyncio.ensure_future(waiter)
    await asyncio.sleep(0)
    assert not waiting.done()
    assert len(await pipeline.buffer.take(1)) == 1
    await asyncio.wait_for(waiting, timeout=5)
    assert len(pipeline.buffer) == 1


async def test_publisher_accounts_for_every_outcome() -> None:
    pipeline, metrics = make_pipeline()
    sink = MemorySink()
    publisher = Publisher(pipeline.buffer, sink, metrics)
    task = asyncio.create_task(publisher.run())
    for price in range(5):
        pipeline.on_frame(frame({"contractId": "1001"}, price), price, BY_ID)
    pipeline.on_frame("garbage", 9, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()

    assert [record.topic for record in sink.records] == ["updates"] * 5 + ["dead"]
    assert sample(metrics, "ime_bridge_messages_published_total", topic="updates") == 5
    assert sample(metrics, "ime_bridge_dead_letters_total", reason="invalid_json") == 1
    assert sample(metrics, "ime_bridge_publish_latency_seconds_count") == 5


async def test_publisher_counts_records_kafka_did_not_take() -> None:
    pipeline, metrics = make_pipeline()
    publisher = Publisher(pipeline.buffer, MemorySink(fail_with=SinkUnavailable("down")), metrics)
    task = asyncio.create_task(publisher.run())
    pipeline.on_frame(frame({"contractId": "1001"}), 1, BY_ID)
    await asyncio.wait_for(publisher.wait_drained(), timeout=5)
    task.cancel()
    assert sample(metrics, "ime_bridge_produce_errors_total", error="SinkUnavailable") == 1
    assert publisher.undelivered == 1


@pytest.mark.parametrize("count", [0, 1, 7])
async def test_buffer_take_returns_oldest_first_up_to_the_limit(count: int) -> None:
    buffer = RecordBuffer(100)
    for n in range(count):
        buffer.put(OutgoingRecord("t", None, bytes([n]), [], 0.0))
    if count == 0:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(buffer.take(3), timeout=0.05)
        return
    taken = await buffer.take(3)
    assert [record.value for record in taken] == [bytes([n]) for n in range(min(count, 3))]
    assert len(buffer) == max(0, count - 3)
