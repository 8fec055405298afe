"""The publisher: rounds from the delivery buffer to the sink, one in flight, every record accounted for.

`Publisher` takes a round from the buffer, publishes it as per-partition batches, and settles it: every
record's outcome is observed, failed ones are queued again at the head (never re-sent out of order), a
record Kafka will never take becomes a dead letter, and a producer that became unusable is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.buffer import DeliveryBuffer, Round
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import RejectReason
from bridge.records import (
    KIND_UPDATE,
    Failed,
    NotSent,
    Outcome,
    OutgoingRecord,
    RawFrames,
    RecordKind,
    Sink,
    SinkUnavailable,
    Stale,
    TooLarge,
    dead_letter,
    frame_count,
    with_raw_frames,
)
from bridge.retry import Backoff

logger = logging.getLogger(__name__)

# A record Kafka refused as too large is dead-lettered with the start of its Avro body, this much.
TOO_LARGE_KEPT_BYTES = 64 * 1024


async def start_sink(sink: Sink) -> None:
    """Start `sink`, retrying with backoff while Kafka or the schema registry is unreachable (the bridge
    stays unready meanwhile; the logged error says which)."""
    backoff = Backoff(0.5, 30.0)
    while True:
        try:
            await sink.start()
            return
        except SinkUnavailable as exc:
            delay = backoff.next_delay()
            log_event(logger, logging.WARNING, "sink_unavailable", error=str(exc), retry_in=round(delay, 2))
            await asyncio.sleep(delay)


class Publisher:
    """Moves rounds from the buffer to the sink, one round in flight, and accounts for every record."""

    def __init__(
        self,
        buffer: DeliveryBuffer,
        sink: Sink,
        metrics: Metrics,
        *,
        max_batch_records: int,
        linger: float = 0.0,
        retry_backoff: Backoff | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
        stale: Callable[[], Callable[[OutgoingRecord], bool] | None] | None = None,
    ) -> None:
        """`linger` (seconds): how long a round may wait for more records (see DeliveryBuffer.take). `gate`: awaited
        before each round is sent; `stale`: what says which records must not be sent at all (the shard keeper's
        `ownership_confirmed` and `stale`, for a replica that may have been expelled)."""
        self.buffer = buffer
        self.sink = sink
        self.metrics = metrics
        self.max_batch_records = max_batch_records
        self.linger = linger
        self.in_flight: Round | None = None
        self.undeliverable = 0
        self.healthy = True
        self._backoff = retry_backoff or Backoff(0.1, 5.0)
        self.gate = gate
        self.stale = stale
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            taken = await self.buffer.take(self.max_batch_records, self.linger)
            self._idle.clear()
            # Cancelled while publishing (shutdown), the round stays in `in_flight` for the buffer to keep.
            self.in_flight = taken
            self.metrics.publish_rounds.inc()
            if self.gate is not None:
                await self.gate()
            started = time.monotonic()
            outcomes = await self._publish_fresh(taken.records, taken.raw)
            self.metrics.publish_round_duration.observe(time.monotonic() - started)
            done, failed = self._account(taken.records, taken.raw, outcomes)
            self.buffer.settle(taken, done)
            self.in_flight = None
            if not len(self.buffer):
                self._idle.set()
            self.healthy = failed == 0
            if failed:
                delay = self._backoff.next_delay()
                log_event(logger, logging.WARNING, "publish_retry", records=failed, retry_in=round(delay, 3))
                await asyncio.sleep(delay)
            else:
                self._backoff.reset()

    async def _publish_fresh(self, records: list[OutgoingRecord], raw: list[RawFrames]) -> list[Outcome]:
        """Publish the round less its stale records, which get the outcome `Stale`."""
        stale = self.stale() if self.stale is not None else None
        dropped = [stale(record) for record in records] if stale is not None else []
        if not any(dropped):
            return await self._publish(records, raw)
        kept = [record for record, drop in zip(records, dropped, strict=True) if not drop]
        outcomes = await self._publish(kept, raw)
        of_kept = iter(outcomes[: len(kept)])
        return [Stale() if drop else next(of_kept) for drop in dropped] + outcomes[len(kept) :]

    async def _publish(self, records: list[OutgoingRecord], raw: list[RawFrames]) -> list[Outcome]:
        try:
            return await self.sink.publish(records, raw)
        except SinkUnavailable as exc:
            # The producer is unusable (its sender died): replace it, and send the round again.
            log_event(logger, logging.ERROR, "producer_unusable", error=str(exc))
            self.metrics.producer_restarts.inc()
            await self._restart_sink()
            return [Failed(type(exc).__name__)] * (len(records) + frame_count(raw))

    async def _restart_sink(self) -> None:
        await self.sink.stop()
        await start_sink(self.sink)

    async def wait_drained(self) -> None:
        """Return once the buffer is empty and nothing is in flight."""
        while len(self.buffer) or self.in_flight is not None:
            self._idle.clear()
            await self._idle.wait()

    def _account(
        self, records: list[OutgoingRecord], raw: list[RawFrames], outcomes: list[Outcome]
    ) -> tuple[list[bool], int]:
        """Count outcomes (of the records, then of the raw frames): (True for each record or frame that needs no
        further send, how many failed)."""
        now = time.time()
        observe = self.metrics.publish_latency.observe
        if not any(outcomes):  # the usual round: everything acknowledged
            for record in records:
                if record.kind is KIND_UPDATE:
                    observe(now - record.received)
                elif record.dead_letter_reason is not None:
                    self.metrics.dead_letters.labels(record.dead_letter_reason).inc()
            kinds = collections.Counter(record.kind for record in records)
            if raw:
                kinds[RecordKind.RAW] += frame_count(raw)
            for kind, count in kinds.items():
                self.metrics.messages_published.labels(self.sink.topic(kind)).inc(count)
            return [True] * len(outcomes), 0
        if raw:  # the frames as records of their own: a failed round is no hot path
            records = with_raw_frames(records, raw)
        published: dict[RecordKind, int] = {}
        errors: dict[str, int] = {}
        done: list[bool] = []
        not_sent = 0
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                published[record.kind] = published.get(record.kind, 0) + 1
                if record.kind is RecordKind.UPDATE:
                    observe(now - record.received)
                elif record.dead_letter_reason is not None:
                    self.metrics.dead_letters.labels(record.dead_letter_reason).inc()
                done.append(True)
                continue
            if isinstance(outcome, NotSent):
                done.append(False)
                not_sent += 1
                continue
            if isinstance(outcome, Stale):
                done.append(True)
                self.metrics.stale_records_dropped.inc()
                continue
            errors[outcome.error] = errors.get(outcome.error, 0) + 1
            if isinstance(outcome, TooLarge):
                done.append(self._too_large(record))
            else:
                done.append(False)
        for kind, count in published.items():
            self.metrics.messages_published.labels(self.sink.topic(kind)).inc(count)
        for name, count in errors.items():
            self.metrics.produce_errors.labels(name).inc(count)
            log_event(logger, logging.WARNING, "records_not_acknowledged", error=name, records=count)
        failed = sum(
            1
            for record_done, outcome in zip(done, outcomes, strict=True)
            if not record_done and not isinstance(outcome, NotSent)
        )
        return done, failed

    def _too_large(self, record: OutgoingRecord) -> bool:
        """Kafka will never take this record: dead-letter it (a dead letter too large is dropped, loudly)."""
        if record.dead_letter_reason is not None:
            self.undeliverable += 1
            log_event(logger, logging.ERROR, "dead_letter_too_large_dropped", bytes=len(record.value))
            return True
        reason = RejectReason.RECORD_TOO_LARGE.value
        self.metrics.messages_rejected.labels(reason).inc()
        value, size = record.value[:TOO_LARGE_KEPT_BYTES], len(record.value)
        detail = f"Kafka refused the record of {size} bytes as too large; its first {len(value)} bytes are kept"
        letter = dead_letter(
            reason, value, key=record.key, received=record.received, headers=record.headers, detail=detail
        )
        self.buffer.add_record(letter)
        return True
