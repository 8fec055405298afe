"""The raw topic in the Kafka sink: raw records go there keyed as given, in batches of their own compression; a
broker that refuses zstd (before Kafka 2.1) gets them uncompressed from then on."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.errors import UnknownError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from bridge.config import KafkaSettings
from bridge.records import Failed, OutgoingRecord, RecordKind
from bridge.sink import KafkaSink
from tests.unit.test_state_topic import DEAD, STATE, UPDATES, FakeProducer, update

RAW = "raw"


class RawFakeProducer(FakeProducer):
    """FakeProducer that also takes the raw topic's batches (built by the sink, not by create_batch)."""

    def __init__(self, batch_bytes: int) -> None:
        super().__init__(batch_bytes)
        self.raw_batches: list[BatchBuilder] = []

    async def send_batch(self, batch: object, topic: str, partition: int) -> asyncio.Future[None]:  # type: ignore[override]
        if not isinstance(batch, BatchBuilder):
            return await super().send_batch(batch, topic, partition)  # type: ignore[arg-type]
        assert topic == RAW
        assert batch.closed(), "a round's batches are sent closed"
        self.raw_batches.append(batch)
        return self.outcome(topic)


def raw(key: bytes | None, value: bytes) -> OutgoingRecord:
    return OutgoingRecord(RecordKind.RAW, key, value, [("receive-time-us", b"1")], 0.0)


def sink_over(producer: RawFakeProducer) -> KafkaSink:
    sink = KafkaSink(KafkaSettings(topic=UPDATES, dlq_topic=DEAD, state_topic=STATE, raw_topic=RAW))
    sink._producer = producer  # type: ignore[assignment]
    sink._partitions = {UPDATES: 1, DEAD: 1, STATE: 1, RAW: 1}
    sink._raw_codec = DefaultRecordBatch.CODEC_ZSTD
    return sink


async def test_raw_records_go_to_the_raw_topic_beside_the_updates() -> None:
    producer = RawFakeProducer(batch_bytes=1 << 16)
    sink = sink_over(producer)
    outcomes = await sink.publish([raw(b"1001", b"frame-1"), update("1001", b"v1"), raw(None, b"{bad")])
    assert outcomes == [None, None, None]
    assert [batch.record_count() for batch in producer.raw_batches] == [2]
    assert producer.values(UPDATES) == [b"v1"]
    assert sink.topic(RecordKind.RAW) == RAW


async def test_a_broker_refusing_zstd_gets_the_raw_topic_uncompressed(caplog: pytest.LogCaptureFixture) -> None:
    producer = RawFakeProducer(batch_bytes=1 << 16)
    producer.failing[RAW] = UnknownError("76")  # aiokafka has no class for UNSUPPORTED_COMPRESSION_TYPE
    sink = sink_over(producer)
    with caplog.at_level(logging.WARNING):
        outcomes = await sink.publish([raw(b"1001", b"frame-1"), update("1001", b"v1")])
    assert outcomes == [Failed("UnknownError"), None], "sent again next round"
    assert "raw_compression_refused" in caplog.text
    assert sink._raw_codec == DefaultRecordBatch.CODEC_NONE
    del producer.failing[RAW]
    assert await sink.publish([raw(b"1001", b"frame-1")]) == [None]


async def test_other_failures_keep_the_compression() -> None:
    producer = RawFakeProducer(batch_bytes=1 << 16)
    producer.failing[RAW] = UnknownError("x")
    sink = sink_over(producer)
    sink._raw_codec = DefaultRecordBatch.CODEC_LZ4  # only zstd needs a newer broker
    await sink.publish([raw(b"1001", b"frame-1")])
    assert sink._raw_codec == DefaultRecordBatch.CODEC_LZ4
