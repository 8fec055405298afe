"""A publish round's Kafka batches (bridge/batches.py), read back by aiokafka against what its own builder
writes: the sink's appends to aiokafka's builder, and the raw frames' zstd batches the bridge writes itself."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.batches import FrameBatch, RoundBatch
from bridge.records import NOT_SENT, TooLarge

NONE, ZSTD = DefaultRecordBatch.CODEC_NONE, DefaultRecordBatch.CODEC_ZSTD


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


@pytest.mark.parametrize(
    ("make", "codec"),
    [(lambda: RoundBatch(1024, NONE), NONE), (lambda: RoundBatch(1024, ZSTD), ZSTD), (lambda: FrameBatch(1024), ZSTD)],
    ids=["RoundBatch-none", "RoundBatch-zstd", "FrameBatch"],
)
async def test_a_batch_holds_what_aiokafkas_own_append_would(make: Any, codec: int) -> None:
    """The sink's batches: the records read back, their offsets and the count aiokafka numbers an idempotent
    producer's sequences by must be those of aiokafka's own `BatchBuilder.append`."""
    records = [(b"1", b"a" * 500, [("h", b"1")]), (None, b"{bad", []), (b"2", b"b" * 500, [("h", b"2"), ("i", b"")])]
    ours, theirs = make(), BatchBuilder(1024, codec, is_transactional=False)
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


@pytest.mark.parametrize("make", [lambda size: RoundBatch(size, NONE), FrameBatch], ids=["RoundBatch", "FrameBatch"])
def test_a_batch_takes_records_up_to_its_bytes_and_any_first_record(make: Any) -> None:
    batch = make(1024)
    assert [batch.add(b"1", b"a" * 450, [], index) for index in range(3)] == [None, None, NOT_SENT]
    assert batch.full
    alone = make(1024)
    assert alone.add(b"1", b"a" * 5000, [], 0) is None, "the broker judges a record larger than a batch"
    assert isinstance(make(1024).refused(), TooLarge), "a batch that took none refuses a record for its size"


headers_strategy = st.lists(st.tuples(st.text(max_size=16), st.binary(max_size=24)), max_size=3)
frames_strategy = st.lists(
    st.tuples(
        st.none() | st.binary(max_size=12),
        st.binary(max_size=900) | st.sampled_from([b'{"contract":"1001","price":12.5}' * 20, b"", b"x" * 20_000]),
        st.none() | headers_strategy,  # none: the previous frame's headers list (a burst shares one)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(frames=frames_strategy, sequence=st.integers(0, 2**31 - 1))
def test_a_frame_batch_reads_back_as_aiokafkas_own_zstd_batch_would(
    frames: list[tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]], sequence: int
) -> None:
    """Any frames: a FrameBatch is a valid batch (CRC, length) holding what aiokafka's own builder writes, every
    record with the batch's timestamp; zstd exactly when that makes it smaller than the records uncompressed."""
    before = int(time.time() * 1000)
    ours, theirs = FrameBatch(1 << 26), BatchBuilder(1 << 26, ZSTD, is_transactional=False)
    plain = BatchBuilder(1 << 26, NONE, is_transactional=False)
    headers: list[tuple[str, bytes]] = []
    for index, (key, value, frame_headers) in enumerate(frames):
        headers = headers if frame_headers is None else frame_headers
        assert ours.add(key, value, headers, index) is None
        theirs.append(key=key, value=value, timestamp=None, headers=headers)
        plain.append(key=key, value=value, timestamp=before, headers=headers)
    assert ours.record_count() == theirs.record_count() == len(frames)
    assert not ours.closed()

    read_ours, read_theirs = built(ours, (3, 2, sequence)), built(theirs, (3, 2, sequence))
    assert ours.closed()
    assert read_ours.validate_crc()
    assert header(read_ours)[:3] == header(read_theirs)[:3]  # up to the timestamps
    assert header(read_ours)[5:] == header(read_theirs)[5:]
    assert before <= read_ours.first_timestamp == read_ours.max_timestamp <= int(time.time() * 1000)
    ours_records, theirs_records = contents(read_ours), contents(read_theirs)
    assert {timestamp for _, timestamp, *_ in ours_records} == {read_ours.first_timestamp}
    assert [(offset, *rest) for offset, _, *rest in ours_records] == [
        (offset, *rest) for offset, _, *rest in theirs_records
    ]
    uncompressed = len(plain._build()) - 61
    smaller = len(ours._build()) - 61 < uncompressed
    assert read_ours.compression_type == (ZSTD if smaller else NONE)


def test_frames_compress_with_one_context_batch_after_batch() -> None:
    frame = b'{"channel":"bestLimit","levels":[1,2,3]}' * 20
    sizes = []
    for round_number in range(3):
        batch = FrameBatch(1 << 20)
        for index in range(50):
            batch.add(b"1001", frame, [("receive-time-us", b"%d" % round_number)], index)
        sizes.append(len(batch._build()))
        assert [record.value for record in DefaultRecordBatch(bytes(batch._build()))] == [frame] * 50
    assert max(sizes) < 50 * len(frame) / 10
    assert len(set(sizes)) == 1, "no state carried from one batch to the next"
