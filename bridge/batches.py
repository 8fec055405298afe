"""The Kafka record batches of a publish round (bridge/sink.py sends one per partition and topic).

`RoundBatch` appends to aiokafka's C batch builder directly. zstd batches are compressed here rather than by
aiokafka: aiokafka compresses through cramjam's one-shot call, which sets up a new zstd context for every
batch (about 10 µs, as much as compressing two hundred frames), while `zstd_batch` reuses one context.
"""

from __future__ import annotations

import struct

import zstandard
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.util import calc_crc32c

from bridge.records import NOT_SENT, Headers, Outcome, TooLarge

ZSTD_LEVEL = 3  # Kafka's default zstd level (KIP-390), and aiokafka's
# One context for every batch: the bridge builds its batches on the event loop's thread only.
_ZSTD = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

# The v2 record batch header (Kafka's RecordBatch, 61 bytes): the length (int32 at 8) counts the bytes after
# itself, the CRC-32C (uint32 at 17) covers everything from the attributes (int16 at 21) on, and the records
# follow the header, compressed as one block under the codec of the attributes' low three bits.
_HEADER_BYTES = 61
_LENGTH = struct.Struct(">i")
_LENGTH_OFFSET = 8
_CRC = struct.Struct(">I")
_CRC_OFFSET = 17
_ATTRIBUTES = struct.Struct(">h")
_ATTRIBUTES_OFFSET = 21
_CODEC_BITS = 0x07


def zstd_batch(batch: bytearray) -> bytearray:
    """`batch`, a v2 record batch built uncompressed, with its records compressed by zstd (header rewritten: length,
    codec, CRC); `batch` itself when compression would not make it smaller (aiokafka's Python builder's rule)."""
    records = memoryview(batch)[_HEADER_BYTES:]
    compressed = _ZSTD.compress(records)
    if len(compressed) >= len(records):
        return batch
    out = batch[:_HEADER_BYTES]
    out += compressed
    _LENGTH.pack_into(out, _LENGTH_OFFSET, len(out) - _LENGTH_OFFSET - _LENGTH.size)
    (attributes,) = _ATTRIBUTES.unpack_from(out, _ATTRIBUTES_OFFSET)
    _ATTRIBUTES.pack_into(out, _ATTRIBUTES_OFFSET, (attributes & ~_CODEC_BITS) | DefaultRecordBatch.CODEC_ZSTD)
    _CRC.pack_into(out, _CRC_OFFSET, calc_crc32c(memoryview(out)[_ATTRIBUTES_OFFSET:]))
    return out


class RoundBatch(BatchBuilder):  # type: ignore[misc]  # aiokafka's classes are untyped here
    """One partition's batch of a publish round: aiokafka's batch builder, with the indices of the round's records
    in it and whether it is full.

    Records go straight to aiokafka's C builder: `BatchBuilder.append`'s Python layers (keyword arguments,
    serializers the sink does not use) cost more than the C append itself. `codec` is aiokafka's number of the
    batch's compression; zstd is applied when the batch is built (`zstd_batch`).
    """

    def __init__(self, batch_bytes: int, codec: int) -> None:
        self._zstd = codec == DefaultRecordBatch.CODEC_ZSTD
        super().__init__(batch_bytes, DefaultRecordBatch.CODEC_NONE if self._zstd else codec, is_transactional=False)
        # append(offset, timestamp, key, value, headers): None when the record does not fit.
        self.append_record = self._builder.append
        self.indices: list[int] = []
        self.full = False

    def add(self, key: bytes | None, value: bytes, headers: Headers, index: int) -> Outcome:
        """Add record `index`; its outcome when it is not in the batch."""
        indices = self.indices
        if not self.full and self.append_record(len(indices), None, key, value, headers) is not None:
            indices.append(index)
            return None
        return self.refused()

    def refused(self) -> Outcome:
        """The outcome of a record the batch did not take: it is full for this round, or the record alone is
        larger than a whole batch."""
        if self.indices:
            self.full = True
            return NOT_SENT
        return TooLarge()

    def close(self) -> None:
        """Take no more records, and let go of the C builder: aiokafka drops it once it has built the batch, and a
        compressed batch's builder holds the uncompressed records."""
        if not self.closed():
            del self.append_record
        super().close()

    def record_count(self) -> int:
        """How many records the batch holds (aiokafka numbers an idempotent producer's sequences by it)."""
        return len(self.indices)

    def _build(self) -> bytearray:
        """The batch's bytes, built once (aiokafka's sender calls this after setting the producer state)."""
        built: bytearray = super()._build()
        if self._zstd:
            self._zstd = False
            built = self._buffer = zstd_batch(built)
        return built
