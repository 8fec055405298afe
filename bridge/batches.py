"""The Kafka record batches of a publish round: bridge/sink.py fills one per partition and topic, and hands it to
aiokafka's producer closed.

aiokafka's batch builders compress zstd through `aiokafka.codec.zstd_encode`, a one-shot call that sets up a new
zstd context for every batch (about 9 µs: a 9-frame raw batch costs twice what compressing it does) at level 3.
`compress_zstd_at` gives them one reused context per thread instead, at `kafka.zstd_level`. The builders look the
function up in their module at each batch, so replacing it there is enough; the batch is still built, compressed
and checksummed once, by aiokafka's C builder.
"""

from __future__ import annotations

import threading

import zstandard
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record import default_records

from bridge.records import NOT_SENT, Headers, Outcome, TooLarge

try:  # aiokafka's C builder, the one used unless AIOKAFKA_NO_EXTENSIONS is set
    from aiokafka.record._crecords import default_records as c_default_records
except ImportError:  # pragma: no cover - aiokafka always ships it for the platforms the bridge runs on
    c_default_records = None


class _ZstdContext(threading.local):
    """One zstd compressor per thread (a compressor is not thread-safe; the bridge builds on its loop's thread)."""

    def __init__(self, level: int) -> None:
        self.compressor = zstandard.ZstdCompressor(level=level)


def compress_zstd_at(level: int) -> None:
    """Make every aiokafka batch builder of this process compress zstd at `level` (kafka.zstd_level), reusing one
    zstd context per thread. Each call replaces the previous one's function."""
    context = _ZstdContext(level)

    def zstd_encode(payload: bytes, level: int | None = None) -> bytes:
        """aiokafka.codec.zstd_encode's signature; `level` is ignored: the bridge's applies."""
        return context.compressor.compress(payload)

    default_records.zstd_encode = zstd_encode
    if c_default_records is not None:
        c_default_records.zstd_encode = zstd_encode


class RoundBatch(BatchBuilder):  # type: ignore[misc]  # aiokafka's classes are untyped here
    """One partition's batch of a publish round: aiokafka's batch builder (compressed with aiokafka's number of a
    codec, `codec`), with the indices of the round's records in it and whether it is full.

    Records go straight to aiokafka's C builder: `BatchBuilder.append`'s Python layers (keyword arguments,
    serializers the sink does not use) cost more than the C append itself.
    """

    def __init__(self, batch_bytes: int, codec: int) -> None:
        super().__init__(batch_bytes, codec, is_transactional=False)
        # append(offset, timestamp, key, value, headers): None when the record does not fit.
        self.append_record = self._builder.append
        self.indices: list[int] = []
        self.full = False

    def add(
        self, key: bytes | None, value: bytes, headers: Headers, index: int, timestamp: int | None = None
    ) -> Outcome:
        """Add record `index`, with `timestamp` (ms since the epoch; None: now); its outcome when it is not in the
        batch."""
        indices = self.indices
        if not self.full and self.append_record(len(indices), timestamp, key, value, headers) is not None:
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
