"""A publish round's Kafka batches (bridge/batches.py): the sink appends to aiokafka's C builder directly, and what
it builds must read back as what aiokafka's own `BatchBuilder.append` would have built; zstd batches are compressed
at kafka.zstd_level with a reused context, and read back whatever they hold."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zstandard
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.record import default_records
from aiokafka.record._crecords import default_records as c_default_records
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.batches import RoundBatch, compress_zstd_at
from bridge.records import NOT_SENT, TooLarge

HEADER_BYTES = 61  # a v2 record batch's header; the records (compressed as one block) follow it
TIMESTAMP = 1_765_000_000_000


@pytest.fixture(autouse=True)
def aiokafkas_own_zstd() -> Iterator[None]:
    """`compress_zstd_at` replaces aiokafka's zstd function process-wide: put aiokafka's back after each test."""
    python, c = default_records.zstd_encode, c_default_records.zstd_encode
    yield
    default_records.zstd_encode, c_default_records.zstd_encode = python, c


@pytest.mark.parametrize("codec", [DefaultRecordBatch.CODEC_NONE, DefaultRecordBatch.CODEC_ZSTD])
async def test_a_round_batch_holds_what_aiokafkas_own_append_would(codec: int) -> None:
    """The records read back, their offsets and the count aiokafka numbers an idempotent producer's sequences by
    must be those of `BatchBuilder.append`."""
    records = [(b"1", b"a" * 500, [("h", b"1")]), (None, b"{bad", []), (b"2", b"b" * 500, [("h", b"2"), ("i", b"")])]
    ours, theirs = RoundBatch(1024, codec), BatchBuilder(1024, codec, is_transactional=False)
    outcomes = [ours.add(key, value, headers, index) for index, (key, value, headers) in enumerate(records)]
    for key, value, headers in records:
        theirs.append(key=key, value=value, timestamp=None, headers=headers)
    assert outcomes == [None, None, NOT_SENT], "the third does not fit 1024 bytes"
    assert ours.indices == [0, 1]
    assert ours.record_count() == theirs.record_count() == 2

    def read(batch: BatchBuilder) -> list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        batch.close()
        batch._set_producer_state(7, 1, 40)  # as aiokafka's sender does for an idempotent producer
        built = DefaultRecordBatch(batch._build())
        assert (built.producer_id, built.base_sequence, built.last_offset_delta) == (7, 40, 1)
        assert built.compression_type == codec
        return [(r.offset, r.key, r.value, list(r.headers)) for r in built]

    assert read(ours) == read(theirs)
    # What the sender counts the partition's next sequence number by, once the batch is acknowledged.
    assert MessageBatch(TopicPartition("t", 0), ours, 30.0, 0.0).record_count == 2


def test_a_round_batch_takes_any_first_record_and_refuses_past_its_bytes() -> None:
    alone = RoundBatch(1024, DefaultRecordBatch.CODEC_NONE)
    assert alone.add(b"1", b"a" * 5000, [], 0) is None, "the broker judges a record larger than a batch"
    assert alone.add(b"1", b"b", [], 1) is NOT_SENT
    assert alone.full
    assert isinstance(RoundBatch(1024, 0).refused(), TooLarge), "a batch that took none refuses a record for its size"


def built_records(records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]], codec: int) -> bytes:
    """A round batch of `records` (one fixed timestamp, so that two builds are byte-equal), built."""
    batch = RoundBatch(1 << 20, codec)
    for offset, (key, value, headers) in enumerate(records):
        assert batch.append_record(offset, TIMESTAMP, key, value, headers) is not None
    batch.close()
    return bytes(batch._build())


FRAMES = [(b"%d" % (1000 + n % 7), b'{"contractId": "%d", "bid": %d}' % (1000 + n % 7, n) * 20, []) for n in range(40)]


@pytest.mark.parametrize("level", [1, 3, 9])
def test_zstd_batches_are_compressed_at_the_configured_level(level: int) -> None:
    compress_zstd_at(level)
    plain = built_records(FRAMES, DefaultRecordBatch.CODEC_NONE)
    compressed = built_records(FRAMES, DefaultRecordBatch.CODEC_ZSTD)
    expected = zstandard.ZstdCompressor(level=level).compress(plain[HEADER_BYTES:])
    assert compressed[HEADER_BYTES:] == expected
    assert DefaultRecordBatch(compressed).compression_type == DefaultRecordBatch.CODEC_ZSTD
    assert [record.value for record in DefaultRecordBatch(compressed)] == [value for _, value, _ in FRAMES]


def test_the_levels_differ_so_the_level_test_can_fail() -> None:
    plain = built_records(FRAMES, DefaultRecordBatch.CODEC_NONE)[HEADER_BYTES:]
    assert zstandard.ZstdCompressor(level=1).compress(plain) != zstandard.ZstdCompressor(level=9).compress(plain)


def test_each_thread_compresses_with_its_own_context() -> None:
    compress_zstd_at(1)
    built: list[bytes] = []
    zstd = DefaultRecordBatch.CODEC_ZSTD
    threads = [threading.Thread(target=lambda: built.append(built_records(FRAMES, zstd))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 4
    assert set(built) == {built_records(FRAMES, zstd)}


HEADER = st.tuples(st.text(max_size=20), st.binary(max_size=40))
RECORD = st.tuples(st.one_of(st.none(), st.binary(max_size=30)), st.binary(max_size=3000), st.lists(HEADER, max_size=4))


@settings(max_examples=150, deadline=None)
@given(records=st.lists(RECORD, min_size=1, max_size=30), level=st.integers(1, 22))
def test_any_zstd_batch_reads_back_as_its_records(
    records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]], level: int
) -> None:
    """aiokafka's reader (CRC, length, decompression) takes whatever the bridge's zstd builds."""
    compress_zstd_at(level)
    batch = DefaultRecordBatch(built_records(records, DefaultRecordBatch.CODEC_ZSTD))
    assert batch.validate_crc()
    assert [(r.key, r.value, list(r.headers)) for r in batch] == records
