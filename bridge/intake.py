"""Intake: each frame the WebSocket readers receive becomes a record in the delivery buffer, or a dead letter.

`Intake.on_burst` runs synchronously in the reader for each burst of frames received together and never waits.
For each frame: normalize, check the contract was subscribed on that connection, mark the first snapshot of each
contract after a (re)subscription, drop exact repeats when configured, give the update its per-contract sequence
number, and add it to the buffer (or a dead letter for a rejected frame); with raw capture, the burst as received
too. bridge/publisher.py takes it from there.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from bridge.buffer import DeliveryBuffer
from bridge.encode import Schema
from bridge.logs import RateLimitedLog, log_event, log_exception
from bridge.metrics import Metrics
from bridge.normalize import ContractUpdate, Normalizer, Rejected, RejectReason
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.raw import connection_headers, frame_key, subscription_marker
from bridge.records import (
    HEADER_FINGERPRINT,
    HEADER_RECEIVE_TIME,
    HEADER_SCHEMA,
    Headers,
    dead_letter,
)
from bridge.zonecheck import NaiveZoneCheck

logger = logging.getLogger(__name__)

# A held update of a shard being taken over: (update, headers, when received, receive time in µs).
_Held = tuple[ContractUpdate, Headers, float, int]


class Intake:
    """The synchronous per-frame work of the readers."""

    def __init__(
        self,
        *,
        normalizer: Normalizer,
        buffer: DeliveryBuffer,
        metrics: Metrics,
        schema: Schema,
        max_frame_bytes: int,
        suppress_duplicates: bool,
        dead_letter_raw_bytes: int,
        naive_zone_check: NaiveZoneCheck | None = None,
        capture_raw: bool = False,
        normalize: bool = True,
        extra_headers: Headers | None = None,
        recent_snapshots: int = 0,
    ) -> None:
        """`capture_raw`: each frame also becomes a raw record, before any parsing (bridge/raw.py); `normalize`
        False: only that (`ime-bridge capture`). `extra_headers` go on every update and dead letter (a replay's).
        `recent_snapshots` (a replay's): a snapshot equal, exchange time included, to one of the contract's last
        that many queued is dropped as a repeat: a capture spanning a handover holds the overlap's frames from
        both replicas, interleaved in no reliable order."""
        self.normalizer = normalizer
        self.buffer = buffer
        self.metrics = metrics
        self.max_frame_bytes = max_frame_bytes
        self.dead_letter_raw_bytes = dead_letter_raw_bytes
        self._extra_headers: Headers = list(extra_headers or [])
        self._schema_headers: Headers = [
            (HEADER_SCHEMA, schema.name.encode()),
            (HEADER_FINGERPRINT, schema.fingerprint.encode()),
            *self._extra_headers,
        ]
        self.capture_raw = capture_raw
        self.normalize = normalize
        self.suppress_duplicates = suppress_duplicates
        self._recent_size = recent_snapshots
        self._recent: dict[str, deque[tuple[int, tuple[object, ...]]]] | None = {} if recent_snapshots else None
        self._headers: dict[str, tuple[str, Headers]] = {}
        # Per subscription: the attempt seen last, and the contracts seen on it since it opened.
        self._subscribed: dict[str, tuple[int, set[str]]] = {}
        self._last_state: dict[str, tuple[object, ...]] = {}
        # Contracts of shards being taken over: their updates, held until the previous owner's release.
        self._holding: dict[str, list[_Held]] = {}
        # Per contract, the last update queued: its sequence is the next one's minus one, and a release marker
        # carries its time and fingerprint.
        self._last_published: dict[str, ContractUpdate] = {}
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
        # Per reason: its counter's inc; per connection: its endpoint and connection headers (built once, not per
        # frame), which raw records and dead letters carry.
        self._count_rejected: dict[str, Callable[[], None]] = {}
        self._labelled: ConnectionInfo | None = None
        self._labels: Headers = []
        self._labels_by_subscription: dict[str, tuple[str, Headers]] = {}
        self._raw_keys: dict[str, bytes] = {}  # a raw record's key per contract id (subscribed ones only)

    def on_burst(self, burst: list[bytes], receive_time: int, connection: ConnectionInfo) -> None:
        """Turn each frame of a burst (frames received together, at `receive_time`, µs since the epoch) into a record
        in the buffer (or a dead letter). Never blocks; a frame whose handling fails unexpectedly becomes an
        `internal_error` dead letter, and the burst goes on. With raw capture, the burst then goes to the raw topic
        as received, all of it (the buffer keeps the list `burst`)."""
        capture_raw = self.capture_raw
        keys: list[bytes | None] = []
        if self.normalize:
            raw_keys = self._raw_keys
            for raw in burst:
                try:
                    contract_id = self._on_frame(raw, receive_time, connection)
                except Exception as exc:
                    self._handling_failed(exc, raw, receive_time, connection)
                    contract_id = None
                if capture_raw:
                    # Keyed like the update: by the id of a contract subscribed on this connection (a bounded set of
                    # keys, whatever the server sends); a frame that is not such an update has no key.
                    key = None if contract_id is None else raw_keys.get(contract_id) or self._raw_key(contract_id)
                    keys.append(key)
            if not capture_raw:
                return
        else:
            contracts = self.normalizer.contracts
            keys = [frame_key(frame, contracts) for frame in burst]
        labels = self._labels if connection is self._labelled else self._labels_of(connection)
        self.buffer.add_raw(burst, keys, receive_time, labels)

    def on_frame(self, raw: str | bytes, receive_time: int, connection: ConnectionInfo) -> None:
        """`on_burst` of one frame (text taken as its UTF-8 bytes)."""
        frame = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        self.on_burst([frame], receive_time, connection)

    def _handling_failed(self, exc: Exception, raw: bytes, receive_time: int, connection: ConnectionInfo) -> None:
        """A frame's handling raised: dead-letter the frame as `internal_error`, with the error."""
        detail = f"{type(exc).__name__} while handling the frame: {str(exc)[:200]}"
        log_exception(logger, "frame_handling_failed", connection=connection.label, error=type(exc).__name__)
        rejected = Rejected(RejectReason.INTERNAL_ERROR, detail, raw)
        self._dead_letter(rejected, receive_time, connection, receive_time / 1e6)

    def _on_frame(self, raw: bytes, receive_time: int, connection: ConnectionInfo) -> str | None:
        """One frame's work in `on_burst`; the contract id of an update of a contract subscribed here, else None."""
        received = receive_time / 1e6
        result: ContractUpdate | Rejected
        if len(raw) > self.max_frame_bytes:
            detail = f"frame of {len(raw)} bytes exceeds ime.max_frame_bytes={self.max_frame_bytes}"
            result = Rejected(RejectReason.OVERSIZED, detail, raw)
        else:
            result = self.normalizer(raw, connection.subscription.endpoint, receive_time)
        if isinstance(result, Rejected):
            self._dead_letter(result, receive_time, connection, received)
            return None
        contract_id = result.contract_id
        if connection is not self._current:  # frames come in bursts per connection: look up once per switch
            self._switch_to(connection)
        if not self._subscribed_here(result):
            # An id the server invents must not become a key, nor per-contract state that grows without bound.
            detail = f"contract {contract_id[:60]!r} is not subscribed on connection {connection.label}"
            rejected = Rejected(RejectReason.UNKNOWN_CONTRACT, detail, raw)
            self._dead_letter(rejected, receive_time, connection, received)
            return None
        seen = self._current_seen
        if contract_id not in seen:
            seen.add(contract_id)
            result.first_after_subscribe = True
        if self._holding and contract_id in self._holding:
            self._holding[contract_id].append((result, self._current_headers, received, receive_time))
            return contract_id
        self._accept(result, self._current_headers, received, receive_time)
        return contract_id

    def _accept(self, update: ContractUpdate, headers: Headers, received: float, receive_time: int) -> None:
        """Sequence a subscribed contract's update and queue it (unless it repeats the previous one)."""
        if (self.suppress_duplicates or self._recent is not None) and self._is_repeat(update):
            return
        contract_id = update.contract_id
        previous = self._last_published.get(contract_id)
        update.sequence = 1 if previous is None else previous.sequence + 1
        lag = (receive_time - update.exchange_time) / 1e6
        self._observe_lag(lag)
        # A snapshot resent on (re)subscription may carry the time of its last change: not a sample.
        if self.normalizer.timestamp_was_naive and not update.first_after_subscribe:
            warning = self._zone_check.observe(lag, received)
            if warning is not None:
                log_event(logger, logging.WARNING, "naive_timestamps_lag", **warning.fields())
        self._last_published[contract_id] = update
        self.buffer.add_update(update, headers, received)

    def hold(self, contract_ids: Iterable[str]) -> None:
        """Keep these contracts' updates back (a shard taken over) until `release`: the previous owner may still
        be delivering them."""
        for contract_id in contract_ids:
            self._holding.setdefault(contract_id, [])

    def release(self, contract_ids: Iterable[str], published: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        """Queue what was held of these contracts, dropping what the previous owner already published
        (`published`: its last snapshot's exchange time and fingerprint per contract, from its release marker);
        (queued, dropped)."""
        queued = dropped = 0
        for contract_id in contract_ids:
            held = self._holding.pop(contract_id, [])
            last = published.get(contract_id)
            repeated = _published_before(held, last) if last is not None else [False] * len(held)
            carry_first = False
            for (update, headers, received, receive_time), repeat in zip(held, repeated, strict=True):
                if repeat:
                    dropped += 1
                    carry_first = carry_first or update.first_after_subscribe
                    continue
                if carry_first:
                    update.first_after_subscribe, carry_first = True, False
                self._accept(update, headers, received, receive_time)
                queued += 1
        return queued, dropped

    def last_published(self, contract_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Per contract, the exchange time and fingerprint of the last update queued (for a release marker)."""
        found = {}
        for contract_id in contract_ids:
            update = self._last_published.get(contract_id)
            if update is not None:
                found[contract_id] = (update.exchange_time, snapshot_fingerprint(update))
        return found

    def _raw_key(self, contract_id: str) -> bytes:
        """The key of a subscribed contract's raw records, encoded once."""
        key = self._raw_keys[contract_id] = contract_id.encode()
        return key

    def _labels_of(self, connection: ConnectionInfo) -> Headers:
        """`connection`'s endpoint and connection headers: one object per connection (its raw blocks share it),
        looked up once per connection switch."""
        if connection is not self._labelled:
            name = connection.subscription.name
            label, labels = self._labels_by_subscription.get(name) or ("", [])
            if label != connection.label:
                labels = connection_headers(connection)
                self._labels_by_subscription[name] = (connection.label, labels)
            self._labelled, self._labels = connection, labels
        return self._labels

    def on_connection_open(self, connection: ConnectionInfo) -> None:
        """A connection opened: with raw capture, its subscription marker goes before its frames."""
        if self.capture_raw:
            receive_time = time.time_ns() // 1000
            self.buffer.add_record(subscription_marker(connection, self.normalizer.contracts, receive_time))

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
        """The same market data as the contract's previous snapshot (`suppress_duplicates`: a resend, e.g. after a
        reconnect), or the same snapshot as one of its recent ones (`recent_snapshots`); counted, and a dropped
        first-after-subscribe passes its flag on to the contract's next update."""
        contract_id = update.contract_id
        state = market_state(update)
        repeat = False
        if self.suppress_duplicates:
            repeat = self._last_state.get(contract_id) == state
            self._last_state[contract_id] = state
        if not repeat and self._recent is not None:
            identity = (update.exchange_time, state)
            recent = self._recent.get(contract_id)
            if recent is None:
                recent = self._recent[contract_id] = deque(maxlen=self._recent_size)
            repeat = identity in recent
            if not repeat:
                recent.append(identity)
        if repeat:
            self.metrics.duplicates_suppressed.inc()
            if update.first_after_subscribe:
                self._carry_first.add(contract_id)
            return True
        if contract_id in self._carry_first:
            self._carry_first.discard(contract_id)
            update.first_after_subscribe = True
        return False

    def _connection_headers(self, connection: ConnectionInfo) -> Headers:
        headers = [*self._schema_headers, *connection_headers(connection)]
        self._headers[connection.subscription.name] = (connection.label, headers)
        return headers

    def _dead_letter(self, rejected: Rejected, receive_time: int, connection: ConnectionInfo, received: float) -> None:
        reason = rejected.reason.value
        count = self._count_rejected.get(reason)
        if count is None:
            count = self._count_rejected[reason] = self.metrics.messages_rejected.labels(reason).inc
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
        labels = self._labels_of(connection)
        headers = [*labels, *self._extra_headers, (HEADER_RECEIVE_TIME, str(receive_time).encode())]
        key = rejected.contract_id.encode() if rejected.contract_id else None
        raw = rejected.raw[: self.dead_letter_raw_bytes]
        record = dead_letter(reason, raw, key=key, received=received, headers=headers, detail=rejected.detail)
        self.buffer.add_record(record)


def market_state(update: ContractUpdate) -> tuple[object, ...]:
    """A snapshot's market data: what a repeat of it has equal (its times, sequence and flags aside)."""
    return (update.best_limit, update.aggregate, update.allowed_price_range, update.contract_info)


def _published_before(held: list[_Held], last: tuple[int, int]) -> list[bool]:
    """Which held updates the giver published, its last being `last` (exchange time, fingerprint).

    The taker subscribed before the giver stopped, so the giver's last snapshot is normally among the held ones:
    it and everything received before it were published. Exchange times repeat (two changes in one tick), so
    time alone cannot say which of two same-time snapshots came first. Without a copy of the giver's last (a
    server whose subscription snapshot differs), what is older than it was published and the rest is kept.
    """
    time, fingerprint = last
    for index in range(len(held) - 1, -1, -1):
        update = held[index][0]
        if update.exchange_time == time and snapshot_fingerprint(update) == fingerprint:
            return [True] * (index + 1) + [False] * (len(held) - index - 1)
    return [entry[0].exchange_time < time for entry in held]


def snapshot_fingerprint(update: ContractUpdate) -> int:
    """A checksum of a snapshot's market data, the same in every process (for handovers' duplicate checks)."""
    return zlib.crc32(repr(market_state(update)).encode())
