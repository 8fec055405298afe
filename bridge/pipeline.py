"""Between source and sink: frame → record, a bounded buffer, and the publisher loop.

`FramePipeline.on_frame` runs synchronously in the WebSocket reader for each frame: normalize, give
the update its per-contract sequence number, encode, and append to the buffer (or build a
dead-letter record for a rejected frame). Only when the buffer is full does it hand the reader an
awaitable, so the reader stops taking frames until Kafka catches up; nothing is dropped.
`Publisher` takes everything buffered at once, publishes it as one set of per-partition batches and
accounts for every record's outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable

from bridge.encode import Schema, encode_update
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import ContractUpdate, Normalizer, Rejected, RejectReason
from bridge.sink import Headers, OutgoingRecord, Sink
from bridge.source import ConnectionInfo

logger = logging.getLogger(__name__)

# Header names on every record; docs/consumers.md documents them.
HEADER_SCHEMA = "schema"
HEADER_FINGERPRINT = "schema-fingerprint"
HEADER_ENDPOINT = "endpoint"
HEADER_CONNECTION = "connection"
HEADER_REASON = "reason"
HEADER_DETAIL = "detail"
HEADER_RECEIVE_TIME = "receive-time-us"
# Kafka's default max.message.bytes is 1 MiB; a dead letter keeps at most this much of its frame.
DEAD_LETTER_MAX_RAW = 512 * 1024


class RecordBuffer:
    """A FIFO of records with a capacity. Never drops: a full buffer tells the caller to wait."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: deque[OutgoingRecord] = deque()
        self._not_empty = asyncio.Event()
        self._has_space = asyncio.Event()
        self._has_space.set()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def full(self) -> bool:
        """At or over capacity: producers should await `wait_for_space()`."""
        return len(self._records) >= self.capacity

    def put(self, record: OutgoingRecord) -> None:
        """Append a record."""
        self._records.append(record)
        if len(self._records) == 1:
            self._not_empty.set()
        if len(self._records) >= self.capacity:
            self._has_space.clear()

    async def wait_for_space(self) -> None:
        """Return once the buffer is below capacity."""
        await self._has_space.wait()

    async def take(self, max_records: int) -> list[OutgoingRecord]:
        """Wait for at least one record; remove and return up to `max_records`, oldest first."""
        while not self._records:
            self._not_empty.clear()
            await self._not_empty.wait()
        records = self._records
        if len(records) <= max_records:
            taken = list(records)
            records.clear()
        else:
            taken = [records.popleft() for _ in range(max_records)]
        if len(records) < self.capacity:
            self._has_space.set()
        return taken


class FramePipeline:
    """The synchronous per-frame work of the readers."""

    def __init__(
        self,
        *,
        normalizer: Normalizer,
        buffer: RecordBuffer,
        metrics: Metrics,
        schema: Schema,
        topic: str,
        dlq_topic: str,
        max_frame_bytes: int,
    ) -> None:
        self.normalizer = normalizer
        self.buffer = buffer
        self.metrics = metrics
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.max_frame_bytes = max_frame_bytes
        self._schema_headers: Headers = [
            (HEADER_SCHEMA, schema.name.encode()),
            (HEADER_FINGERPRINT, schema.fingerprint.encode()),
        ]
        self._sequences: dict[str, int] = {}
        self._headers: dict[str, tuple[str, Headers]] = {}
        self._observe_lag = metrics.exchange_lag.observe

    def on_frame(self, raw: str | bytes, receive_time: int, connection: ConnectionInfo) -> Awaitable[None] | None:
        """Turn one frame into a record in the buffer; returns an awaitable when the reader must wait."""
        received = time.monotonic()
        result: ContractUpdate | Rejected
        if len(raw) > self.max_frame_bytes:
            detail = f"frame of {len(raw)} characters exceeds ime.max_frame_bytes={self.max_frame_bytes}"
            result = Rejected(RejectReason.OVERSIZED, detail, _as_bytes(raw))
        else:
            result = self.normalizer(raw, connection.subscription.endpoint, receive_time)
        if isinstance(result, Rejected):
            self._dead_letter(result, receive_time, connection, received)
        else:
            contract_id = result.contract_id
            sequence = self._sequences.get(contract_id, 0) + 1
            self._sequences[contract_id] = sequence
            result.sequence = sequence
            self._observe_lag((receive_time - result.exchange_time) / 1e6)
            label, headers = self._headers.get(connection.subscription.name) or ("", [])
            if label != connection.label:
                headers = self._connection_headers(connection)
            self.buffer.put(OutgoingRecord(self.topic, contract_id.encode(), encode_update(result), headers, received))
        return self.buffer.wait_for_space() if self.buffer.full else None

    def _connection_headers(self, connection: ConnectionInfo) -> Headers:
        headers = [
            *self._schema_headers,
            (HEADER_ENDPOINT, connection.subscription.endpoint.value.encode()),
            (HEADER_CONNECTION, connection.label.encode()),
        ]
        self._headers[connection.subscription.name] = (connection.label, headers)
        return headers

    def _dead_letter(self, rejected: Rejected, receive_time: int, connection: ConnectionInfo, received: float) -> None:
        reason = rejected.reason.value
        self.metrics.messages_rejected.labels(reason).inc()
        log_event(
            logger,
            logging.WARNING,
            "frame_rejected",
            connection=connection.label,
            reason=reason,
            detail=rejected.detail[:300],
            bytes=len(rejected.raw),
        )
        headers: Headers = [
            (HEADER_REASON, reason.encode()),
            (HEADER_DETAIL, rejected.detail[:1000].encode()),
            (HEADER_ENDPOINT, connection.subscription.endpoint.value.encode()),
            (HEADER_CONNECTION, connection.label.encode()),
            (HEADER_RECEIVE_TIME, str(receive_time).encode()),
        ]
        key = rejected.contract_id.encode() if rejected.contract_id else None
        raw = rejected.raw[:DEAD_LETTER_MAX_RAW]
        self.buffer.put(OutgoingRecord(self.dlq_topic, key, raw, headers, received, dead_letter_reason=reason))


def _as_bytes(raw: str | bytes) -> bytes:
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw


class Publisher:
    """Moves records from the buffer to the sink and accounts for each one."""

    def __init__(self, buffer: RecordBuffer, sink: Sink, metrics: Metrics, *, max_batch_records: int = 10_000) -> None:
        self.buffer = buffer
        self.sink = sink
        self.metrics = metrics
        self.max_batch_records = max_batch_records
        self.in_flight = 0
        self.undelivered = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            records = await self.buffer.take(self.max_batch_records)
            self._idle.clear()
            self.in_flight = len(records)
            try:
                outcomes = await self.sink.publish(records)
                self._account(records, outcomes)
            finally:
                self.in_flight = 0
                if not len(self.buffer):
                    self._idle.set()

    async def wait_drained(self) -> None:
        """Return once the buffer is empty and nothing is in flight."""
        while len(self.buffer) or self.in_flight:
            self._idle.clear()
            await self._idle.wait()

    def _account(self, records: list[OutgoingRecord], outcomes: list[Exception | None]) -> None:
        now = time.monotonic()
        observe = self.metrics.publish_latency.observe
        published: dict[str, int] = {}
        errors: dict[str, int] = {}
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                published[record.topic] = published.get(record.topic, 0) + 1
                if record.dead_letter_reason is None:
                    observe(now - record.received)
                else:
                    self.metrics.dead_letters.labels(record.dead_letter_reason).inc()
            else:
                name = type(outcome).__name__
                errors[name] = errors.get(name, 0) + 1
        for topic, count in published.items():
            self.metrics.messages_published.labels(topic).inc(count)
        for name, count in errors.items():
            self.metrics.produce_errors.labels(name).inc(count)
            self.undelivered += count
            log_event(logger, logging.ERROR, "records_not_delivered", error=name, records=count)
