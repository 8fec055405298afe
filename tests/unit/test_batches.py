"""A publish round's Kafka batches (bridge/batches.py): the sink appends to aiokafka's C builder directly, and what
it builds must read back as what aiokafka's own `BatchBuilder.append` would have built."""

from __future__ import annotations

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder, MessageBatch
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition

from bridge.batches import RoundBatch
from bridge.records import NOT_SENT, TooLarge


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
