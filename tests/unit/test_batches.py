"""A publish round's Kafka batches (bridge/batches.py): what aiokafka's own builder would write, read back by
aiokafka; zstd batches compressed by the bridge with one reused context."""

from __future__ import annotations

import os
import struct

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.batches import RoundBatch, zstd_batch
from bridge.records import NOT_SENT

NONE, ZSTD = DefaultRecordBatch.CODEC_NONE, DefaultRecordBatch.CODEC_ZSTD
Record = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


def built(batch: BatchBuilder, producer_state: tuple[int, int, int] = (7, 1, 40)) -> DefaultRecordBatch:
    """`batch` closed, given an idempotent producer's state as aiokafka's sender does, built and read back (its
    records can be iterated once)."""
    batch.close()
    batch._set_producer_state(*producer_state)
    data = bytes(batch._build())
    # The length (int32 at 8) counts the bytes after itself: a reader of several batches finds the next by it.
    assert struct.unpack_from(">i", data, 8)[0] == len(data) - 12
    return DefaultRecordBatch(data)


def contents(batch: DefaultRecordBatch) -> list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    return [(record.offset, record.timestamp, record.key, record.value, list(record.headers)) for record in batch]


def header(batch: DefaultRecordBatch) -> tuple[int, ...]:
    """The header fields a compressed batch must keep from the uncompressed one (all but length, codec and CRC)."""
    return (
        batch.base_offset,
        batch.magic,
        batch.last_offset_delta,
        batch.first_timestamp,
        batch.max_timestamp,
        batch.producer_id,
        batch.producer_epoch,
        batch.base_sequence,
        batch.timestamp_type,
        int(batch.is_transactional),
    )


def twins(codec: int, records: list[Record], batch_bytes: int = 1 << 20) -> tuple[RoundBatch, BatchBuilder]:
    """A round batch and aiokafka's own builder, given the same records (the same timestamp, for comparison)."""
    ours, theirs = RoundBatch(batch_bytes, codec), BatchBuilder(batch_bytes, codec, is_transactional=False)
    for index, (key, value, headers) in enumerate(records):
        assert ours.append_record(index, 1_700_000_000_000, key, value, headers) is not None
        ours.indices.append(index)
        theirs.append(key=key, value=value, timestamp=1_700_000_000_000, headers=headers)
    return ours, theirs


@pytest.mark.parametrize("codec", [NONE, ZSTD])
async def test_a_round_batch_holds_what_aiokafkas_own_append_would(codec: int) -> None:
    """The sink appends to aiokafka's C builder directly: the records read back, their offsets and the count
    aiokafka numbers an idempotent producer's sequences by must be those of `BatchBuilder.append`."""
    records = [(b"1", b"a" * 500, [("h", b"1")]), (None, b"{bad", []), (b"2", b"b" * 500, [("h", b"2"), ("i", b"")])]
    ours, theirs = RoundBatch(1024, codec), BatchBuilder(1024, codec, is_transactional=False)
    outcomes = [ours.add(key, value, headers, index) for index, (key, value, headers) in enumerate(records)]
    for key, value, headers in records:
        theirs.append(key=key, value=value, timestamp=None, headers=headers)
    assert outcomes == [None, None, NOT_SENT], "the third does not fit 1024 bytes"
    assert ours.indices == [0, 1]
    assert ours.record_count() == theirs.record_count() == 2
    # What the sender counts the partition's next sequence number by, once the batch is acknowledged.
    assert MessageBatch(TopicPartition("t", 0), ours, 30.0, 0.0).record_count == 2

    read_ours, read_theirs = built(ours), built(theirs)
    assert (read_ours.producer_id, read_ours.base_sequence, read_ours.last_offset_delta) == (7, 40, 1)
    assert read_ours.compression_type == read_theirs.compression_type == codec
    assert read_ours.validate_crc()
    assert [(offset, key, value, headers) for offset, _, key, value, headers in contents(read_ours)] == [
        (offset, key, value, headers) for offset, _, key, value, headers in contents(read_theirs)
    ]


records_strategy = st.lists(
    st.tuples(
        st.none() | st.binary(max_size=12),
        st.binary(max_size=900) | st.sampled_from([b'{"contract":"1001","price":12.5}' * 20, b""]),
        st.lists(st.tuples(st.text(max_size=16), st.binary(max_size=24)), max_size=3),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(records=records_strategy, sequence=st.integers(0, 2**31 - 1))
def test_a_zstd_round_batch_reads_back_as_aiokafkas_own_would(records: list[Record], sequence: int) -> None:
    """Any records: the batch the bridge compresses is a valid batch (CRC, length, codec) with the records and
    header fields aiokafka's own zstd builder writes; zstd exactly when that makes it smaller than the
    uncompressed batch (aiokafka's Python builder's rule; its C builder compresses even when that grows it)."""
    ours, theirs = twins(ZSTD, records)
    plain, _ = twins(NONE, records)
    read_ours, read_theirs = built(ours, (3, 2, sequence)), built(theirs, (3, 2, sequence))
    assert read_ours.validate_crc()
    assert header(read_ours) == header(read_theirs)
    assert contents(read_ours) == contents(read_theirs)
    smaller = len(ours._build()) < len(plain._build())
    assert read_ours.compression_type == (ZSTD if smaller else NONE)


def test_frames_compress_and_an_incompressible_batch_stays_as_built() -> None:
    frames: list[Record] = [(b"1001", b'{"channel":"bestLimit","levels":[1,2,3]}' * 20, [("endpoint", b"id")])] * 50
    ours, _ = twins(ZSTD, frames)
    compressed = ours._build()
    plain, _ = twins(NONE, frames)
    assert len(compressed) < len(plain._build()) / 10
    assert DefaultRecordBatch(bytes(compressed)).compression_type == ZSTD

    noise, _ = twins(NONE, [(None, os.urandom(2000), [])])
    uncompressed = noise._build()
    assert zstd_batch(uncompressed) is uncompressed
