"""The Kafka record batches of a publish round (bridge/sink.py sends one per partition and topic).

`RoundBatch` appends to aiokafka's C batch builder, which compresses with the batch's codec. The raw topic's zstd
batches are `FrameBatch`es, written here instead: aiokafka's builder grows its buffer frame by frame (copying it
at each reallocation), copies the records out, and compresses them through cramjam's one-shot call, which sets up
a new zstd context for every batch (about 10 µs). A `FrameBatch` joins its frames once and compresses them with
one reused zstd context (docs/performance.md has the figures).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import zstandard
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.util import calc_crc32c

from bridge.records import NOT_SENT, Headers, Outcome, TooLarge

_ZSTD_LEVEL = 3  # Kafka's default zstd level (KIP-390), and aiokafka's
# One context for every batch: the bridge builds its batches on the event loop's thread only.
_ZSTD = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)

# Kafka's v2 record batch (magic 2): a 61-byte header, then the records, compressed as one block under the codec
# of the attributes' low three bits. The length counts the bytes after itself; the CRC-32C covers everything
# from the attributes (byte 21) on.
_BATCH_HEADER = struct.Struct(
    ">q"  # base offset (the broker sets it)
    "i"  # length
    "i"  # partition leader epoch
    "b"  # magic
    "I"  # CRC-32C
    "h"  # attributes
    "i"  # last offset delta
    "q"  # first timestamp
    "q"  # max timestamp
    "q"  # producer id
    "h"  # producer epoch
    "i"  # base sequence
    "i"  # records count
)
_AFTER_LENGTH = 12
_CRC = struct.Struct(">I")
_CRC_OFFSET = 17
_CRC_FROM = 21
_NO_LEADER_EPOCH = -1
_MAGIC = 2


def _varint(value: int) -> bytes:
    """Kafka's signed varint (zigzag, seven bits a byte)."""
    zigzag = (value << 1) ^ (value >> 63)
    out = bytearray()
    while zigzag > 0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


_SMALL = 1 << 14
_SMALL_VARINTS = tuple(_varint(value) for value in range(_SMALL))
_NULL = _varint(-1)  # the length of a null key
_ATTRIBUTES_AND_TIMESTAMP_DELTA = b"\x00\x00"  # no record attributes; every frame has the batch's timestamp


class _RoundRecords:
    """What the sink keeps of a batch's records: their indices in the round, and whether it took its last."""

    indices: list[int]
    full: bool
    append_record: Any  # (offset, timestamp, key, value, headers) -> None when the record does not fit

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

    def record_count(self) -> int:
        """How many records the batch holds (aiokafka numbers an idempotent producer's sequences by it)."""
        return len(self.indices)


class RoundBatch(_RoundRecords, BatchBuilder):  # type: ignore[misc]  # aiokafka's classes are untyped here
    """One partition's batch of a publish round: aiokafka's batch builder, compressed with aiokafka's number of
    a codec, `codec`.

    Records go straight to aiokafka's C builder: `BatchBuilder.append`'s Python layers (keyword arguments,
    serializers the sink does not use) cost more than the C append itself.
    """

    def __init__(self, batch_bytes: int, codec: int) -> None:
        super().__init__(batch_bytes, codec, is_transactional=False)
        self.append_record = self._builder.append
        self.indices = []
        self.full = False

    def close(self) -> None:
        """Take no more records, and let go of the C builder: aiokafka drops it once it has built the batch, and a
        compressed batch's builder holds the uncompressed records."""
        if not self.closed():
            del self.append_record
        super().close()


class FrameBatch(_RoundRecords):
    """One partition's batch of raw frames in a publish round, zstd-compressed (the raw topic's default).

    What aiokafka's producer asks of a batch it sends: `closed`, `close`, `record_count`, `_set_producer_state`
    (its sender gives an idempotent producer's id, epoch and first sequence number) and `_build` (the bytes).
    Every record has the batch's timestamp (the frames' receive times are in their headers).
    """

    def __init__(self, batch_bytes: int) -> None:
        self.indices = []
        self.full = False
        self._limit = batch_bytes
        self._size = _BATCH_HEADER.size
        self._parts: list[bytes] = []
        self._keys: dict[bytes | None, bytes] = {}  # each key's length and bytes, encoded
        self._headers_of: Headers | None = None  # a round's frames share their burst's headers list
        self._headers = b""
        self._timestamp = int(time.time() * 1000)
        self._producer_state = (-1, -1, -1)
        self._closed = False
        self._built: bytearray | None = None

    def append_record(
        self, offset: int, timestamp: None, key: bytes | None, value: bytes, headers: Headers
    ) -> bool | None:
        """Append a record at `offset` in the batch (`timestamp` is always None: the batch's); None when it would
        take the batch past its bytes and is not its first."""
        if headers is not self._headers_of:
            self._headers_of, self._headers = headers, _encoded_headers(headers)
        key_part = self._keys.get(key)
        if key_part is None:
            key_part = self._keys[key] = _NULL if key is None else _varint(len(key)) + key
        value_bytes = len(value)
        head = (
            _ATTRIBUTES_AND_TIMESTAMP_DELTA
            + (_SMALL_VARINTS[offset] if offset < _SMALL else _varint(offset))
            + key_part
            + (_SMALL_VARINTS[value_bytes] if value_bytes < _SMALL else _varint(value_bytes))
        )
        headers_part = self._headers
        body = len(head) + value_bytes + len(headers_part)
        length = _SMALL_VARINTS[body] if body < _SMALL else _varint(body)
        size = self._size + len(length) + body
        if size > self._limit and self.indices:
            return None
        self._size = size
        self._parts += (length, head, value, headers_part)
        return True

    def close(self) -> None:
        """Take no more records (the sink sends its batches closed)."""
        self._closed = True

    def closed(self) -> bool:
        return self._closed

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        self._producer_state = (producer_id, producer_epoch, base_sequence)

    def _build(self) -> bytearray:
        """The batch's bytes, built once: its records compressed when that makes them smaller."""
        if self._built is None:
            self._closed = True
            records = b"".join(self._parts)
            self._parts = []
            compressed = _ZSTD.compress(records)
            codec = DefaultRecordBatch.CODEC_ZSTD
            if len(compressed) >= len(records):
                compressed, codec = records, DefaultRecordBatch.CODEC_NONE
            count = len(self.indices)
            built = bytearray(_BATCH_HEADER.size)
            _BATCH_HEADER.pack_into(
                built,
                0,
                0,
                _BATCH_HEADER.size - _AFTER_LENGTH + len(compressed),
                _NO_LEADER_EPOCH,
                _MAGIC,
                0,  # the CRC, once the rest is written
                codec,
                count - 1,
                self._timestamp,
                self._timestamp,
                *self._producer_state,
                count,
            )
            built += compressed
            _CRC.pack_into(built, _CRC_OFFSET, calc_crc32c(memoryview(built)[_CRC_FROM:]))
            self._built = built
        return self._built


def _encoded_headers(headers: Headers) -> bytes:
    """A record's headers as the v2 record format has them: their count, then each key and value."""
    parts = [_varint(len(headers))]
    for name, value in headers:
        name_bytes = name.encode()
        parts += (_varint(len(name_bytes)), name_bytes, _varint(len(value)), value)
    return b"".join(parts)


Batch = RoundBatch | FrameBatch
