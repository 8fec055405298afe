"""Between source and sink: frame → record into the delivery buffer, and the publisher loop.

`FramePipeline.on_frame` runs synchronously in the WebSocket reader for each frame and never waits:
normalize, mark the first snapshot of each contract after a (re)subscription, drop exact repeats when
configured, give the update its per-contract sequence number, and add it to the buffer (or a
dead-letter record for a rejected frame). `Publisher` takes a round from the buffer, publishes it as
per-partition batches, and settles it: every record's outcome is observed, failed ones are queued
again at the head (never re-sent out of order), and a producer that became unusable is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from aiokafka.errors import MessageSizeTooLargeError

from bridge.backoff import Backoff
from bridge.buffer import DeliveryBuffer, Round
from bridge.encode import Schema, SchemaHistory
from bridge.logs import RateLimitedLog, log_event, log_exception
from bridge.metrics import Metrics
from bridge.normalize import ContractUpdate, Normalizer, Rejected, RejectReason
from bridge.planner import Subscription
from bridge.protocol import Endpoint
from bridge.sink import Headers, NotSent, OutgoingRecord, Sink, SinkUnavailable
from bridge.source import ConnectionInfo
from bridge.spool import SpooledRecord
from bridge.zonecheck import NaiveZoneCheck

logger = logging.getLogger(__name__)

# Header names on every record; docs/consumers.md documents them.
HEADER_SCHEMA = "schema"
HEADER_FINGERPRINT = "schema-fingerprint"
HEADER_ENDPOINT = "endpoint"
HEADER_CONNECTION = "connection"
HEADER_REASON = "reason"
HEADER_DETAIL = "detail"
HEADER_RECEIVE_TIME = "receive-time-us"
# A record Kafka refused as too large is dead-lettered with the start of its Avro body, this much.
TOO_LARGE_KEPT_BYTES = 64 * 1024


class FramePipeline:
    """The synchronous per-frame work of the readers."""

    def __init__(
        self,
        *,
        normalizer: Normalizer,
        buffer: DeliveryBuffer,
        metrics: Metrics,
        schema: Schema,
        topic: str,
        dlq_topic: str,
        max_frame_bytes: int,
        suppress_duplicates: bool = False,
        dead_letter_raw_bytes: int = 512 * 1024,
        naive_zone_check: NaiveZoneCheck | None = None,
    ) -> None:
        self.normalizer = normalizer
        self.buffer = buffer
        self.metrics = metrics
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.max_frame_bytes = max_frame_bytes
        self.dead_letter_raw_bytes = dead_letter_raw_bytes  # Kafka's default max.message.bytes is 1 MiB
        self._schema_headers: Headers = [
            (HEADER_SCHEMA, schema.name.encode()),
            (HEADER_FINGERPRINT, schema.fingerprint.encode()),
        ]
        self.suppress_duplicates = suppress_duplicates
        self._sequences: dict[str, int] = {}
        self._headers: dict[str, tuple[str, Headers]] = {}
        # Per subscription: the attempt seen last, and the contracts seen on it since it opened.
        self._subscribed: dict[str, tuple[int, set[str]]] = {}
        self._last_state: dict[str, tuple[object, ...]] = {}
        self._carry_first: set[str] = set()  # a suppressed first-after-subscribe passes its flag on
        self._current: ConnectionInfo | None = None
        self._current_seen: set[str] = set()
        self._current_headers: Headers = []
        self._contracts: dict[str, tuple[Subscription, frozenset[str]]] = {}
        self._current_contracts: frozenset[str] = frozenset()
        self._current_by_name = False
        self._observe_lag = metrics.exchange_lag.observe
        # Zone-less timestamps lagging by whole half hours mean a wrong ime.naive_timezone (bridge/zonecheck.py).
        self._zone_check = naive_zone_check or NaiveZoneCheck(normalizer.naive_timezone)
        # A flood of bad frames must not cost a log line each: the first few per reason, then a summary
        # (ime_bridge_messages_rejected_total still counts every frame).
        self._rejection_log = RateLimitedLog(logger, logging.WARNING, "frame_rejected", key_field="reason")
        # Per reason: its counter's inc and its header; per connection: its two headers (built once, not per frame).
        self._by_reason: dict[str, tuple[Callable[[], None], tuple[str, bytes]]] = {}
        self._dead_letter_connection: ConnectionInfo | None = None
        self._dead_letter_headers: Headers = []

    def on_frame(self, raw: str | bytes, receive_time: int, connection: ConnectionInfo) -> None:
        """Turn one frame into a record in the buffer (or a dead letter). Never blocks, never raises: a frame
        whose handling fails unexpectedly becomes an `internal_error` dead letter, and the stream goes on."""
        try:
            self._on_frame(raw, receive_time, connection)
        except Exception as exc:
            detail = f"{type(exc).__name__} while handling the frame: {str(exc)[:200]}"
            log_exception(logger, "frame_handling_failed", connection=connection.label, error=type(exc).__name__)
            rejected = Rejected(RejectReason.INTERNAL_ERROR, detail, _as_bytes(raw))
            self._dead_letter(rejected, receive_time, connection, receive_time / 1e6)

    def _on_frame(self, raw: str | bytes, receive_time: int, connection: ConnectionInfo) -> None:
        received = receive_time / 1e6
        result: ContractUpdate | Rejected
        if len(raw) > self.max_frame_bytes:
            detail = f"frame of {len(raw)} bytes exceeds ime.max_frame_bytes={self.max_frame_bytes}"
            result = Rejected(RejectReason.OVERSIZED, detail, _as_bytes(raw))
        else:
            result = self.normalizer(raw, connection.subscription.endpoint, receive_time)
        if isinstance(result, Rejected):
            self._dead_letter(result, receive_time, connection, received)
            return
        contract_id = result.contract_id
        if connection is not self._current:  # frames come in bursts per connection: look up once per switch
            self._switch_to(connection)
        if not self._subscribed_here(result):
            # An id the server invents must not become a key, nor per-contract state that grows without bound.
            detail = f"contract {contract_id[:60]!r} is not subscribed on connection {connection.label}"
            rejected = Rejected(RejectReason.UNKNOWN_CONTRACT, detail, _as_bytes(raw))
            self._dead_letter(rejected, receive_time, connection, received)
            return
        seen = self._current_seen
        if contract_id not in seen:
            seen.add(contract_id)
            result.first_after_subscribe = True
        if self.suppress_duplicates and self._is_repeat(result):
            return
        sequence = self._sequences.get(contract_id, 0) + 1
        self._sequences[contract_id] = sequence
        result.sequence = sequence
        lag = (receive_time - result.exchange_time) / 1e6
        self._observe_lag(lag)
        # A snapshot resent on (re)subscription may carry the time of its last change: not a sample.
        if self.normalizer.timestamp_was_naive and not result.first_after_subscribe:
            warning = self._zone_check.observe(lag, received)
            if warning is not None:
                log_event(logger, logging.WARNING, "naive_timestamps_lag", **warning.fields())
        self.buffer.add_update(result, self.topic, self._current_headers, received)

    def on_frame_too_large(self, connection: ConnectionInfo, detail: str) -> None:
        """A frame past the WebSocket's size limit ended its connection (1009) unread: dead-letter the fact,
        without the bytes, so that it is as visible as any other refused frame."""
        receive_time = time.time_ns() // 1000
        detail = f"{detail}: the connection was closed (1009) before the frame was read, and reopens"
        rejected = Rejected(RejectReason.OVERSIZED, detail, b"")
        self._dead_letter(rejected, receive_time, connection, receive_time / 1e6)

    def _subscribed_here(self, update: ContractUpdate) -> bool:
        """Whether the current connection subscribed `update`'s contract (by id, or by name on the name endpoint)."""
        if self._current_by_name:
            return update.contract_name in self._current_contracts
        return update.contract_id in self._current_contracts

    def _switch_to(self, connection: ConnectionInfo) -> None:
        """Per-connection state: the record headers, the contracts subscribed, and those seen since it
        (re)subscribed."""
        subscription = connection.subscription
        known, contracts = self._contracts.get(subscription.name) or (None, frozenset[str]())
        if known != subscription:
            contracts = frozenset(subscription.contracts)
            self._contracts[subscription.name] = (subscription, contracts)
        self._current_contracts = contracts
        self._current_by_name = subscription.endpoint is Endpoint.NAME
        name = connection.subscription.name
        attempt, seen = self._subscribed.get(name) or (0, set())
        if attempt != connection.attempt:
            seen = set()
            self._subscribed[name] = (connection.attempt, seen)
        label, headers = self._headers.get(name) or ("", [])
        if label != connection.label:
            headers = self._connection_headers(connection)
        self._current, self._current_seen, self._current_headers = connection, seen, headers

    def _is_repeat(self, update: ContractUpdate) -> bool:
        """The same market data as the contract's previous snapshot (a resend, e.g. after a reconnect)."""
        state = (update.best_limit, update.aggregate, update.allowed_price_range, update.contract_info)
        if self._last_state.get(update.contract_id) == state:
            self.metrics.duplicates_suppressed.inc()
            if update.first_after_subscribe:
                self._carry_first.add(update.contract_id)
            return True
        self._last_state[update.contract_id] = state
        if update.contract_id in self._carry_first:
            self._carry_first.discard(update.contract_id)
            update.first_after_subscribe = True
        return False

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
        known = self._by_reason.get(reason)
        if known is None:
            known = self._by_reason[reason] = (
                self.metrics.messages_rejected.labels(reason).inc,
                (HEADER_REASON, reason.encode()),
            )
        count, reason_header = known
        count()
        if self._rejection_log.allow(reason):
            log_event(
                logger,
                logging.WARNING,
                "frame_rejected",
                connection=connection.label,
                reason=reason,
                detail=rejected.detail[:300],
                bytes=len(rejected.raw),
            )
        if connection is not self._dead_letter_connection:
            self._dead_letter_connection = connection
            self._dead_letter_headers = [
                (HEADER_ENDPOINT, connection.subscription.endpoint.value.encode()),
                (HEADER_CONNECTION, connection.label.encode()),
            ]
        endpoint_header, connection_header = self._dead_letter_headers
        headers: Headers = [
            reason_header,
            (HEADER_DETAIL, rejected.detail[:1000].encode(errors="replace")),
            endpoint_header,
            connection_header,
            (HEADER_RECEIVE_TIME, str(receive_time).encode()),
        ]
        key = rejected.contract_id.encode() if rejected.contract_id else None
        raw = rejected.raw[: self.dead_letter_raw_bytes]
        self.buffer.add_record(OutgoingRecord(self.dlq_topic, key, raw, headers, received, dead_letter_reason=reason))


def _as_bytes(raw: str | bytes) -> bytes:
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw


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
        dlq_topic: str,
        max_batch_records: int = 10_000,
        retry_backoff: Backoff | None = None,
        schema_history: SchemaHistory | None = None,
    ) -> None:
        self.buffer = buffer
        self.sink = sink
        self.metrics = metrics
        self.dlq_topic = dlq_topic
        self.max_batch_records = max_batch_records
        self.in_flight: Round | None = None
        self.undeliverable = 0
        self.healthy = True
        self._backoff = retry_backoff or Backoff(0.1, 5.0)
        self._schema_history = schema_history or SchemaHistory.shipped()
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            taken = await self.buffer.take(self.max_batch_records)
            self._idle.clear()
            if taken.spooled:
                self._in_current_schema(taken.spooled)
            # Cancelled while publishing (shutdown), the round stays in `in_flight` for the buffer to keep.
            self.in_flight = taken
            outcomes = await self._publish(taken.records)
            done, failed = self._account(taken.records, outcomes)
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

    def _in_current_schema(self, spooled: list[SpooledRecord]) -> None:
        """Spooled updates an older version wrote are re-encoded in the current schema; one written with a
        schema this version does not know (after a downgrade) becomes a dead letter, never mislabelled."""
        history = self._schema_history
        upgraded = unknown = 0
        for entry in spooled:
            record = entry.record
            if record.dead_letter_reason is not None:
                continue
            fingerprint = next((value for name, value in record.headers if name == HEADER_FINGERPRINT), b"")
            if fingerprint == history.fingerprint:
                continue
            value = history.upgrade(record.value, fingerprint)
            if value is not None:
                record.value = value
                record.headers = [
                    (name, history.fingerprint if name == HEADER_FINGERPRINT else header)
                    for name, header in record.headers
                ]
                upgraded += 1
                continue
            reason = RejectReason.UNKNOWN_SCHEMA.value
            detail = f"spooled with schema fingerprint {fingerprint.decode(errors='replace')}, not a released version"
            record.topic, record.dead_letter_reason = self.dlq_topic, reason
            record.headers = [*record.headers, (HEADER_REASON, reason.encode()), (HEADER_DETAIL, detail.encode())]
            self.metrics.messages_rejected.labels(reason).inc()
            unknown += 1
        if upgraded:
            log_event(logger, logging.INFO, "spooled_records_upgraded", records=upgraded)
        if unknown:
            log_event(logger, logging.ERROR, "spooled_records_unknown_schema", records=unknown)

    async def _publish(self, records: list[OutgoingRecord]) -> list[Exception | None]:
        try:
            return await self.sink.publish(records)
        except SinkUnavailable as exc:
            # The producer is unusable (its sender died): replace it, and send the round again.
            log_event(logger, logging.ERROR, "producer_unusable", error=str(exc))
            self.metrics.producer_restarts.inc()
            await self._restart_sink()
            return [exc] * len(records)

    async def _restart_sink(self) -> None:
        await self.sink.stop()
        await start_sink(self.sink)

    async def wait_drained(self) -> None:
        """Return once the buffer is empty and nothing is in flight."""
        while len(self.buffer) or self.in_flight is not None:
            self._idle.clear()
            await self._idle.wait()

    def _account(self, records: list[OutgoingRecord], outcomes: list[Exception | None]) -> tuple[list[bool], int]:
        """Count outcomes: (True for each record that needs no further send, how many failed)."""
        now = time.time()
        observe = self.metrics.publish_latency.observe
        if not any(outcomes):  # the usual round: everything acknowledged
            for record in records:
                if record.dead_letter_reason is None:
                    observe(now - record.received)
                else:
                    self.metrics.dead_letters.labels(record.dead_letter_reason).inc()
            for topic, count in collections.Counter(record.topic for record in records).items():
                self.metrics.messages_published.labels(topic).inc(count)
            return [True] * len(records), 0
        published: dict[str, int] = {}
        errors: dict[str, int] = {}
        done: list[bool] = []
        not_sent = 0
        for record, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                published[record.topic] = published.get(record.topic, 0) + 1
                if record.dead_letter_reason is None:
                    observe(now - record.received)
                else:
                    self.metrics.dead_letters.labels(record.dead_letter_reason).inc()
                done.append(True)
                continue
            if isinstance(outcome, NotSent):
                done.append(False)
                not_sent += 1
                continue
            errors[type(outcome).__name__] = errors.get(type(outcome).__name__, 0) + 1
            if isinstance(outcome, MessageSizeTooLargeError):
                done.append(self._too_large(record))
            else:
                done.append(False)
        for topic, count in published.items():
            self.metrics.messages_published.labels(topic).inc(count)
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
        headers = [*record.headers, (HEADER_REASON, reason.encode())]
        value = record.value[:TOO_LARGE_KEPT_BYTES]
        self.buffer.add_record(OutgoingRecord(self.dlq_topic, record.key, value, headers, record.received, reason))
        return True
