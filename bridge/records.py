"""What goes from intake to Kafka: records, their kinds, the `Sink` interface, its errors and publish outcomes.

The core (intake, buffer, spool, publisher) speaks only these types; the Kafka sink (bridge/sink.py) maps a
record's kind to a topic and translates aiokafka's errors into them at its boundary, so nothing else imports
aiokafka. `MemorySink` is the in-memory twin for unit tests.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[str, bytes]]

# Header names on every record; docs/consumers.md documents them.
HEADER_SCHEMA = "schema"
HEADER_FINGERPRINT = "schema-fingerprint"
HEADER_ENDPOINT = "endpoint"
HEADER_CONNECTION = "connection"
HEADER_REASON = "reason"
HEADER_DETAIL = "detail"
HEADER_RECEIVE_TIME = "receive-time-us"
HEADER_RAW_EVENT = "raw-event"  # on raw records that are not frames: "subscribed" (bridge/raw.py)
HEADER_REPLAY = "replay"  # on records a replay published: the replay's session id


class RecordKind(enum.Enum):
    """What a record is; each kind has its own topic, chosen by the sink."""

    UPDATE = "update"
    STATE = "state"  # an update's copy on the compacted latest-state topic, made by the sink
    DEAD_LETTER = "dead_letter"
    RAW = "raw"  # a frame as received (or a subscription marker), for capture and replay: bridge/raw.py

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own __hash__ is Python
    # code, and the buffer, the publisher and the sink look records' kinds up in dicts for every record.
    __hash__ = object.__hash__


# Two kinds under module names, for per-record code: on Python 3.11 every attribute read of an Enum class goes
# through EnumType.__getattr__'s slow path (~0.1 µs, five times a module global's).
KIND_UPDATE = RecordKind.UPDATE
KIND_RAW = RecordKind.RAW


@dataclass(slots=True)
class OutgoingRecord:
    """One record on its way to Kafka. `received` is when its frame arrived (seconds since the epoch)."""

    kind: RecordKind
    key: bytes | None
    value: bytes
    headers: Headers
    received: float
    dead_letter_reason: str | None = None


@dataclass(slots=True)
class RawFrames:
    """One burst of a connection's frames as received, oldest first, on their way to the raw topic (bridge/raw.py).

    One buffer entry per burst, not per frame: a record, a buffer entry or even a call each cost more than capture
    may add per frame. `labels` are the connection's endpoint and connection headers, the same object for all its
    frames; every frame of a burst was received at `receive_time` (µs since the epoch); `keys[i]` is the key of
    `frames[i]`.
    """

    labels: Headers
    receive_time: int
    frames: list[bytes]
    keys: list[bytes | None]
    size: int  # bytes of the frames

    def records(self) -> list[OutgoingRecord]:
        """The frames as raw records, for sinks that take records one by one."""
        labels, receive_time = self.labels, self.receive_time
        return [raw_frame(frame, receive_time, labels, key) for frame, key in zip(self.frames, self.keys, strict=True)]

    @classmethod
    def of(cls, labels: Headers, receive_time: int, frames: list[bytes], keys: list[bytes | None]) -> RawFrames:
        """A block of these frames of one connection, received at `receive_time`."""
        return cls(labels, receive_time, frames, keys, sum(map(len, frames)))

    def split(self, count: int) -> RawFrames:
        """Remove the first `count` frames from this block and return them as a block of their own."""
        head = RawFrames.of(self.labels, self.receive_time, self.frames[:count], self.keys[:count])
        del self.frames[:count], self.keys[:count]
        self.size -= head.size
        return head


def frame_count(blocks: Iterable[RawFrames]) -> int:
    """How many frames `blocks` hold (a round carries a block per burst: no call per block)."""
    return sum([len(block.frames) for block in blocks])


def with_raw_frames(records: Sequence[OutgoingRecord], raw: Sequence[RawFrames]) -> list[OutgoingRecord]:
    """`records`, then the frames of `raw` as raw records: a round as one list, for what handles records one by one
    (MemorySink, capture files, a failed round's accounting)."""
    return [*records, *(record for block in raw for record in block.records())]


def raw_frame(frame: bytes, receive_time: int, labels: Headers, key: bytes | None) -> OutgoingRecord:
    """The raw record of one frame (bridge/raw.py), received at `receive_time` (µs since the epoch)."""
    return OutgoingRecord(KIND_RAW, key, frame, raw_headers(labels, receive_time), receive_time / 1e6)


def raw_headers(labels: Headers, receive_time: int) -> Headers:
    """A raw record's headers: its connection's `labels` (endpoint, connection), then the receive time (µs since
    the epoch)."""
    return [*labels, (HEADER_RECEIVE_TIME, b"%d" % receive_time)]


def dead_letter(
    reason: str, value: bytes, *, key: bytes | None, received: float, headers: Headers, detail: str | None = None
) -> OutgoingRecord:
    """A dead letter: `reason` (and `detail`, if any) lead its headers, then `headers`."""
    leading: Headers = [(HEADER_REASON, reason.encode())]
    if detail is not None:
        leading.append((HEADER_DETAIL, detail[:1000].encode(errors="replace")))
    return OutgoingRecord(RecordKind.DEAD_LETTER, key, value, [*leading, *headers], received, reason)


class SinkUnavailable(Exception):
    """Kafka could not be reached, or the producer became unusable and must be replaced."""


class SinkFatal(Exception):
    """A failure retrying cannot fix (the schema registry refuses the schema or the credentials): stop, loudly."""


@dataclass(frozen=True, slots=True)
class NotSent:
    """The record was not handed to Kafka in this round (its partition's batch was full): send it next round."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Kafka did not acknowledge the record; `error` names what the sink met, for metrics and logs."""

    error: str


@dataclass(frozen=True, slots=True)
class TooLarge(Failed):
    """Kafka will never take this record: it is larger than a batch or than the topic allows."""

    error: str = "MessageSizeTooLargeError"


@dataclass(frozen=True, slots=True)
class Stale:
    """Not sent, on purpose: a record of a shard another replica served meanwhile (bridge/handover.py)."""


NOT_SENT = NotSent()
# One per record: None means acknowledged.
Outcome = NotSent | Failed | Stale | None


class Sink(Protocol):
    """Where records go. `publish` resolves once every record has an outcome."""

    def topic(self, kind: RecordKind) -> str:
        """The topic records of `kind` go to (for metrics and logs)."""
        ...

    async def start(self) -> None:
        """Connect; raise SinkUnavailable if Kafka cannot be reached, SinkFatal if retrying cannot help."""
        ...

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        """Send `records`, then the frames of `raw`, in order per partition; one outcome per record, then one per
        raw frame."""
        ...

    async def stop(self) -> None:
        """Flush what is in flight and disconnect."""
        ...


@dataclass
class MemorySink:
    """A Sink that keeps what it is given, for unit tests. `fail_with` makes every publish fail."""

    records: list[OutgoingRecord] = field(default_factory=list)
    fail_with: Failed | None = None
    started: bool = False

    def topic(self, kind: RecordKind) -> str:
        """The kind's name."""
        return kind.value

    async def start(self) -> None:
        """Mark started."""
        self.started = True

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        """Keep `records` and the raw frames as records, or fail each with `fail_with`."""
        every = with_raw_frames(records, raw)
        if self.fail_with is not None:
            return [self.fail_with] * len(every)
        self.records.extend(every)
        return [None] * len(every)

    async def stop(self) -> None:
        """Mark stopped."""
        self.started = False
