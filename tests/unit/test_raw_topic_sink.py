"""The raw topic in the Kafka sink: raw records go there keyed as given, in batches of their own compression; a
broker that refuses zstd (before Kafka 2.1) gets them uncompressed from then on."""

from __future__ import annotations

import logging
from itertools import groupby
from operator import itemgetter

import pytest
from aiokafka.errors import UnknownError
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatch

from bridge.config import KafkaSettings
from bridge.records import NOT_SENT, Failed, OutgoingRecord, RawFrames, RecordKind
from bridge.sink import KafkaSink
from tests.unit.test_state_topic import DEAD, STATE, UPDATES, FakeProducer, update

RAW = "raw"


def raw(key: bytes | None, value: bytes) -> OutgoingRecord:
    return OutgoingRecord(RecordKind.RAW, key, value, [("receive-time-us", b"1")], 0.0)


def sink_over(producer: FakeProducer) -> KafkaSink:
    sink = KafkaSink(KafkaSettings(topic=UPDATES, dlq_topic=DEAD, state_topic=STATE, raw_topic=RAW))
    sink._producer = producer  # type: ignore[assignment]
    sink._partitions = {UPDATES: 1, DEAD: 1, STATE: 1, RAW: 1}
    sink._raw_codec = DefaultRecordBatch.CODEC_ZSTD
    return sink


async def test_raw_records_go_to_the_raw_topic_beside_the_updates() -> None:
    producer = FakeProducer()
    sink = sink_over(producer)
    outcomes = await sink.publish([raw(b"1001", b"frame-1"), update("1001", b"v1"), raw(None, b"{bad")])
    assert outcomes == [None, None, None]
    assert [batch.record_count() for batch in producer.batches(RAW)] == [2]
    assert producer.values(UPDATES) == [b"v1"]
    assert sink.topic(RecordKind.RAW) == RAW


async def test_a_broker_refusing_zstd_gets_the_raw_topic_uncompressed(caplog: pytest.LogCaptureFixture) -> None:
    producer = FakeProducer()
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
    producer = FakeProducer()
    producer.failing[RAW] = UnknownError("x")
    sink = sink_over(producer)
    sink._raw_codec = DefaultRecordBatch.CODEC_LZ4  # only zstd needs a newer broker
    await sink.publish([raw(b"1001", b"frame-1")])
    assert sink._raw_codec == DefaultRecordBatch.CODEC_LZ4


LABELS = [("endpoint", b"id"), ("connection", b"id-0/1")]


def bursts(frames: list[tuple[bytes, bytes | None, int]]) -> list[RawFrames]:
    """(frame, key, receive time) as the buffer hands them over: a block per run of one receive time (a burst)."""
    return [
        RawFrames.of(LABELS, receive_time, [frame for frame, _, _ in burst], [key for _, key, _ in burst])
        for receive_time, burst in ((time, list(group)) for time, group in groupby(frames, key=itemgetter(2)))
    ]


async def test_raw_frames_go_after_the_records_to_their_keys_partitions_with_their_receive_times() -> None:
    producer = FakeProducer()
    sink = sink_over(producer)
    sink._partitions[RAW] = 4
    frames = [(b"f1", b"1001", 11), (b"f2", b"1002", 12), (b"f3", b"1001", 13), (b"bad", None, 14)]
    outcomes = await sink.publish([update("1001", b"v1"), raw(None, b"marker")], bursts(frames))
    assert outcomes == [None] * 6
    by_partition = producer.records(RAW)
    assert sorted(record[1] for records in by_partition.values() for record in records) == [
        b"bad",
        b"f1",
        b"f2",
        b"f3",
        b"marker",
    ]
    partition = (murmur2(b"1001") & 0x7FFFFFFF) % 4
    assert [value for key, value, _ in by_partition[partition] if key == b"1001"] == [b"f1", b"f3"]
    (f3_headers,) = [headers for _, value, headers in by_partition[partition] if value == b"f3"]
    assert f3_headers == {"endpoint": b"id", "connection": b"id-0/1", "receive-time-us": b"13"}


async def test_raw_frames_past_a_full_batch_wait_for_the_next_round_in_order() -> None:
    producer = FakeProducer()
    sink = sink_over(producer)
    sink._raw_codec = DefaultRecordBatch.CODEC_NONE
    frames = [(bytes([n]) * 200_000, b"1001", n) for n in range(4)]  # batches of kafka.max_batch_bytes, 512 KiB
    outcomes = await sink.publish([], bursts(frames))
    assert outcomes == [None, None, NOT_SENT, NOT_SENT], "a partition gets one batch per round"
    assert [value[0] for _, value, _ in producer.records(RAW)[0]] == [0, 1]


async def test_raw_records_carry_their_receive_time_as_their_kafka_timestamp() -> None:
    producer = FakeProducer()
    sink = sink_over(producer)
    received = 1_765_000_000_123_456  # µs since the epoch
    marker = OutgoingRecord(RecordKind.RAW, None, b"marker", [("raw-event", b"subscribed")], 1_765_000_000.5)
    frames = [(b"f1", b"1001", received), (b"f2", b"1001", received), (b"f3", None, received + 2_000)]
    outcomes = await sink.publish([marker], bursts(frames))
    assert outcomes == [None] * 4
    (batch,) = producer.batches(RAW)
    stamps = {record.value: record.timestamp for record in DefaultRecordBatch(batch._build())}
    assert stamps == {
        b"marker": 1_765_000_000_500,
        b"f1": 1_765_000_000_123,
        b"f2": 1_765_000_000_123,
        b"f3": 1_765_000_000_125,
    }
