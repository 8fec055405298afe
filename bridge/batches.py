"""The Kafka record batches of a publish round: bridge/sink.py fills one per partition and topic, and hands it to
aiokafka's producer closed."""

from __future__ import annotations

from aiokafka.producer.message_accumulator import BatchBuilder

from bridge.records import NOT_SENT, Headers, Outcome, TooLarge


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
