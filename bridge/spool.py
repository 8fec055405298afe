"""An on-disk, append-only spool of records waiting for Kafka (`buffer.overflow: spool`).

Layout: `segment-<n>.spool` files of entries `magic(4) length(4) crc32(4) payload`, the payload a
msgpack tuple of the record, and `committed.json`, the position up to which Kafka acknowledged.
Each entry is written with one unbuffered `os.write`, so a killed process loses nothing it appended;
`sync()` (called every `fsync_interval` by the owner) bounds what a power loss can take. Reading
advances a cursor; only `commit` moves the durable position, so records read but not acknowledged
before a crash are replayed (at most one publish round of duplicates). On open, a torn last entry
(the process died mid-write) is cut off and counted; the rest is replayed in order.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bridge.logs import log_event
from bridge.sink import OutgoingRecord

logger = logging.getLogger(__name__)

_MAGIC = b"IMEs"
_HEADER = struct.Struct("<4sII")
_COMMITTED = "committed.json"
_Payload = tuple[str, bytes | None, bytes, list[tuple[str, bytes]], str | None, float]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Payload).decode


class SpoolFull(Exception):
    """The spool holds `max_bytes` already."""


class SpoolError(Exception):
    """The spool could not be written (disk full, I/O error)."""


@dataclass(frozen=True, order=True, slots=True)
class SpoolPosition:
    """A place in the spool: a segment number and a byte offset in it."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """A record read back from the spool, with where it ends (what committing it means)."""

    record: OutgoingRecord
    end: SpoolPosition
    size: int

    @property
    def start(self) -> SpoolPosition:
        """Where the entry begins."""
        return SpoolPosition(self.end.segment, self.end.offset - self.size)


@dataclass(frozen=True)
class Recovery:
    """What opening the spool found: records to replay, and damaged entries dropped."""

    records: int
    bytes: int
    torn_entries: int
    corrupt_segments: int


class Spool:
    """The spool in `directory`. Not thread-safe; owned by one event loop."""

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.records = 0
        self.bytes = 0
        self.torn_entries = 0
        self._committed = SpoolPosition(0, 0)
        self._cursor = SpoolPosition(0, 0)
        self._write_segment = 0
        self._write_offset = 0
        self._write_fd: int | None = None
        self._dirty = False
        # Acknowledged entries not yet contiguous with the committed position, by where they start.
        self._acked_ahead: dict[SpoolPosition, SpooledRecord] = {}

    # --- opening and recovery

    def open(self) -> Recovery:
        """Create the directory or recover what is in it: cut a torn tail, count what is left to replay."""
        self.directory.mkdir(parents=True, exist_ok=True)
        segments = self._segments()
        committed_path = self.directory / _COMMITTED
        if committed_path.exists():
            saved = json.loads(committed_path.read_text())
            self._committed = SpoolPosition(int(saved["segment"]), int(saved["offset"]))
        elif segments:
            self._committed = SpoolPosition(segments[0], 0)
        torn = corrupt = 0
        for number in segments:
            if number < self._committed.segment:
                self._segment_path(number).unlink()
                continue
            start = self._committed.offset if number == self._committed.segment else 0
            valid_end, records, damaged = self._scan(number, start)
            self.records += records
            self.bytes += valid_end - start
            if damaged:
                is_last = number == segments[-1]
                torn += is_last
                corrupt += not is_last
                with self._segment_path(number).open("r+b") as segment:
                    segment.truncate(valid_end)
                log_event(
                    logger,
                    logging.ERROR if not is_last else logging.WARNING,
                    "spool_damaged_entry_dropped",
                    segment=number,
                    offset=valid_end,
                    torn_tail=is_last,
                )
        self.torn_entries = torn
        self._cursor = self._committed
        last = segments[-1] if segments else self._committed.segment
        self._write_segment = max(last, self._committed.segment)
        self._open_for_append(self._write_segment)
        return Recovery(self.records, self.bytes, torn, corrupt)

    def _scan(self, number: int, start: int) -> tuple[int, int, bool]:
        """(end of the last valid entry, valid entries, whether something after them was damaged)."""
        records = 0
        with self._segment_path(number).open("rb") as segment:
            segment.seek(start)
            position = start
            while True:
                header = segment.read(_HEADER.size)
                if not header:
                    return position, records, False
                if len(header) < _HEADER.size:
                    return position, records, True
                magic, length, checksum = _HEADER.unpack(header)
                payload = segment.read(length)
                if magic != _MAGIC or len(payload) < length or zlib.crc32(payload) != checksum:
                    return position, records, True
                position += _HEADER.size + length
                records += 1

    # --- writing

    def append(self, record: OutgoingRecord) -> None:
        """Append `record`; raises SpoolFull past `max_bytes` and SpoolError when the disk refuses."""
        entry = self._entry(record)
        if self.bytes + len(entry) > self.max_bytes:
            raise SpoolFull(f"spool holds {self.bytes} bytes of buffer.spool_max_bytes={self.max_bytes}")
        if self._write_offset >= self.segment_bytes:
            self._open_for_append(self._write_segment + 1)
        assert self._write_fd is not None
        try:
            written = os.write(self._write_fd, entry)
        except OSError as exc:
            raise SpoolError(f"cannot write the spool: {exc.strerror}") from exc
        if written != len(entry):  # a short write leaves a torn entry: cut it off, report the disk as full
            os.ftruncate(self._write_fd, self._write_offset)
            raise SpoolError("short write to the spool (disk full?)")
        self._write_offset += len(entry)
        self.records += 1
        self.bytes += len(entry)
        self._dirty = True

    @staticmethod
    def _entry(record: OutgoingRecord) -> bytes:
        payload = _encode(
            (record.topic, record.key, record.value, record.headers, record.dead_letter_reason, record.received)
        )
        return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload

    def sync(self) -> None:
        """fsync what was appended since the last call."""
        if self._dirty and self._write_fd is not None:
            os.fsync(self._write_fd)
            self._dirty = False

    def _open_for_append(self, number: int) -> None:
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
        self._write_segment = number
        path = self._segment_path(number)
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._write_offset = os.fstat(self._write_fd).st_size

    # --- reading and committing

    @property
    def unread(self) -> bool:
        """Records exist after the read cursor."""
        return self._cursor < SpoolPosition(self._write_segment, self._write_offset)

    def read(self, max_records: int) -> list[SpooledRecord]:
        """Up to `max_records` records after the cursor, in order; advances the cursor."""
        out: list[SpooledRecord] = []
        while len(out) < max_records and self.unread:
            segment, offset = self._cursor.segment, self._cursor.offset
            path = self._segment_path(segment)
            if not path.exists() or offset >= path.stat().st_size:
                self._cursor = SpoolPosition(segment + 1, 0)
                continue
            with path.open("rb") as handle:
                handle.seek(offset)
                while len(out) < max_records:
                    header = handle.read(_HEADER.size)
                    if len(header) < _HEADER.size:
                        break
                    _, length, _ = _HEADER.unpack(header)
                    payload = handle.read(length)
                    start = SpoolPosition(segment, offset)
                    offset += _HEADER.size + length
                    end = SpoolPosition(segment, offset)
                    self._cursor = end
                    if start in self._acked_ahead:  # delivered in a round that failed after it
                        continue
                    topic, key, value, headers, reason, received = _decode(payload)
                    record = OutgoingRecord(topic, key, value, headers, received, reason)
                    out.append(SpooledRecord(record, end, _HEADER.size + length))
        return out

    def rewind(self) -> None:
        """Read again from the committed position (after a failed publish round)."""
        self._cursor = self._committed

    def acknowledge(self, delivered: list[SpooledRecord]) -> None:
        """Kafka acknowledged these: move the committed position over every contiguous acknowledged entry."""
        for spooled in delivered:
            self._acked_ahead[spooled.start] = spooled
        committed = self._committed
        while True:
            if committed not in self._acked_ahead and self._segment_ends_at(committed):
                committed = SpoolPosition(committed.segment + 1, 0)
            if committed not in self._acked_ahead:
                break
            spooled = self._acked_ahead.pop(committed)
            self.records -= 1
            self.bytes -= spooled.size
            committed = spooled.end
        if committed != self._committed:
            self._set_committed(committed)

    def _segment_ends_at(self, position: SpoolPosition) -> bool:
        if position.segment >= self._write_segment:
            return False
        path = self._segment_path(position.segment)
        return not path.exists() or path.stat().st_size <= position.offset

    def _set_committed(self, position: SpoolPosition) -> None:
        for number in self._segments():
            if number < position.segment:
                self._segment_path(number).unlink()
        if self.records == 0 and position == SpoolPosition(self._write_segment, self._write_offset):
            # Fully drained: start a fresh segment so that the old one can go.
            self._open_for_append(self._write_segment + 1)
            self._segment_path(position.segment).unlink(missing_ok=True)
            position = SpoolPosition(self._write_segment, 0)
            self._cursor = position
        self._committed = position
        self._write_committed()

    def _write_committed(self) -> None:
        """Replace committed.json atomically (a crash leaves the old or the new one, never half)."""
        position = self._committed
        temporary = self.directory / (_COMMITTED + ".tmp")
        temporary.write_text(json.dumps({"segment": position.segment, "offset": position.offset}))
        temporary.replace(self.directory / _COMMITTED)

    def close(self, unsent: list[OutgoingRecord] | None = None) -> None:
        """fsync and close; `unsent` (older than everything spooled) is kept first for the next start.

        The records go into a new first segment, followed by the uncommitted rest of the committed
        segment, which is then removed; the committed position moves to the start of the new segment.
        """
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None
        if not unsent:
            return
        committed = self._committed
        number = committed.segment - 1
        path = self._segment_path(number)
        old = self._segment_path(committed.segment)
        with path.open("wb") as segment:
            for record in unsent:
                segment.write(self._entry(record))
            if old.exists():
                with old.open("rb") as rest:
                    rest.seek(committed.offset)
                    segment.write(rest.read())
            segment.flush()
            os.fsync(segment.fileno())
        old.unlink(missing_ok=True)
        self.records += len(unsent)
        self._committed = SpoolPosition(number, 0)
        self._write_committed()

    # --- files

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"segment-{number:08d}.spool"

    def _segments(self) -> list[int]:
        return sorted(int(path.stem.removeprefix("segment-")) for path in self.directory.glob("segment-*.spool"))
