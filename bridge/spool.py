"""An on-disk, append-only spool of records waiting for Kafka (`buffer.overflow: spool`).

Layout: `segment-<n>.spool` files of entries `magic(4) length(4) crc32(4) payload`, the payload a
msgpack tuple of the record, and `committed.json`, the position up to which Kafka acknowledged.
Each append is one unbuffered `os.write` (of one entry or of a batch), so a killed process loses
nothing it appended; `sync()` (called every `fsync_interval` by the owner) bounds what a power loss
can take. Reading advances a cursor; only acknowledging moves the durable position, so records read
but not acknowledged before a crash are replayed (at most one publish round of duplicates).

Crash consistency: `committed.json` is replaced by an fsync'd temporary file, a rename and an fsync
of the directory, and always before the segments it makes obsolete are unlinked, so a crash at any
point leaves a position that discards nothing unsent. On open, a torn last entry (the process died
mid-write) is cut off and counted; an empty or unreadable `committed.json` is recovered from the
segments, replaying all of them (`Recovery.possible_duplicates`). Every OSError becomes a
`SpoolError`, which the owner treats as a failing disk.

Records outlive versions: an update read back that an older release wrote is re-encoded in the current
schema (by its `schema-fingerprint` header); one a newer release wrote (after a downgrade) is read back as
an `unknown_schema` dead letter, never mislabelled. A record's kind is stored by name in the payload's first
field (which held its topic before: then a dead letter is told by its reason, anything else is an update).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bridge.encode import SchemaHistory
from bridge.logs import log_event
from bridge.normalize import RejectReason
from bridge.records import HEADER_FINGERPRINT, KIND_UPDATE, OutgoingRecord, RecordKind, dead_letter

logger = logging.getLogger(__name__)

_MAGIC = b"IMEs"
_HEADER = struct.Struct("<4sII")
_KINDS = {kind.value: kind for kind in RecordKind}
_COMMITTED = "committed.json"
_Payload = tuple[str, bytes | None, bytes, list[tuple[str, bytes]], str | None, float]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Payload).decode


def _key_of(payload: bytes) -> bytes | None:
    """The key of a stored entry (None when it cannot be read: such an entry fails when it is read, not here)."""
    try:
        return _decode(payload)[1]
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


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
    """What opening the spool found: records to replay, damaged entries dropped, and how many of the records
    may already be in Kafka because the committed position was unreadable (replayed from the start)."""

    records: int
    bytes: int
    torn_entries: int
    corrupt_segments: int
    possible_duplicates: int = 0


class Spool:
    """The spool in `directory`. Not thread-safe; owned by one event loop."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = 16 * 1024 * 1024,
        schema_history: SchemaHistory | None = None,
        on_unknown_schema: Callable[[int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.records = 0
        self.bytes = 0
        # Unacknowledged records per key: a handover waits for its own contracts' records only.
        self._keys: collections.Counter[bytes | None] = collections.Counter()
        self.torn_entries = 0
        self._committed = SpoolPosition(0, 0)
        self._cursor = SpoolPosition(0, 0)
        self._write_segment = 0
        self._write_offset = 0
        self._write_fd: int | None = None
        self._dirty = False
        self._commit_pending = False  # the committed position moved but could not be written
        # Acknowledged entries not yet contiguous with the committed position, by where they start.
        self._acked_ahead: dict[SpoolPosition, SpooledRecord] = {}
        self._schema_history = schema_history or SchemaHistory.shipped()
        self._on_unknown_schema = on_unknown_schema

    # --- opening and recovery

    def open(self) -> Recovery:
        """Create the directory or recover what is in it: cut a torn tail, count what is left to replay."""
        try:
            return self._open()
        except OSError as exc:
            raise SpoolError(f"cannot open the spool in {self.directory}: {exc}") from exc

    def _open(self) -> Recovery:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / (_COMMITTED + ".tmp")).unlink(missing_ok=True)  # a commit cut short by a crash
        segments = self._segments()
        saved = self._read_committed()
        if saved is not None and saved.offset > self._size(saved.segment):
            log_event(logger, logging.ERROR, "spool_commit_damaged", error=f"{saved} is past its segment's end")
            saved = None
        commit_lost = saved is None and bool(segments)
        if saved is not None:
            self._committed = saved
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
        if commit_lost:
            log_event(logger, logging.ERROR, "spool_commit_unreadable", replayed=self.records)
            self._write_committed()
        return Recovery(self.records, self.bytes, torn, corrupt, self.records if commit_lost else 0)

    def _read_committed(self) -> SpoolPosition | None:
        """The saved position; None when there is none or it is empty or unreadable (recovered by replay)."""
        try:
            saved = json.loads((self.directory / _COMMITTED).read_bytes())
            return SpoolPosition(int(saved["segment"]), int(saved["offset"]))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            log_event(logger, logging.ERROR, "spool_commit_damaged", error=str(exc)[:200])
            return None

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
                self._keys[_key_of(payload)] += 1

    # --- writing

    def append(self, record: OutgoingRecord) -> SpooledRecord:
        """Append `record`; raises SpoolFull past `max_bytes` and SpoolError when the disk refuses."""
        return self.append_many([record])[0]

    def append_many(self, records: list[OutgoingRecord]) -> list[SpooledRecord]:
        """Append `records` with one write: all of them reach the spool or none does (SpoolFull, SpoolError)."""
        entries = [self._entry(record) for record in records]
        size = sum(len(entry) for entry in entries)
        if self.bytes + size > self.max_bytes:
            raise SpoolFull(f"spool holds {self.bytes} bytes of buffer.spool_max_bytes={self.max_bytes}")
        try:
            if self._write_offset >= self.segment_bytes:
                self._open_for_append(self._write_segment + 1)
            assert self._write_fd is not None
            self._write_all(b"".join(entries))
        except OSError as exc:
            raise SpoolError(f"cannot write the spool: {exc}") from exc
        spooled = []
        for record, entry in zip(records, entries, strict=True):
            self._write_offset += len(entry)
            spooled.append(SpooledRecord(record, SpoolPosition(self._write_segment, self._write_offset), len(entry)))
        self.records += len(records)
        self.bytes += size
        self._keys.update(record.key for record in records)
        self._dirty = True
        return spooled

    def _write_all(self, data: bytes) -> None:
        """One write; after a short one (disk full), writing the rest tells why, and the torn part is cut off."""
        assert self._write_fd is not None
        written = os.write(self._write_fd, data)
        if written == len(data):
            return
        try:
            os.write(self._write_fd, data[written:])
            raise OSError(f"short write of {written} of {len(data)} bytes")
        finally:
            os.ftruncate(self._write_fd, self._write_offset)

    @staticmethod
    def _entry(record: OutgoingRecord) -> bytes:
        payload = _encode(
            (record.kind.value, record.key, record.value, record.headers, record.dead_letter_reason, record.received)
        )
        return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload

    def sync(self) -> None:
        """fsync what was appended since the last call, and retry a commit that failed (SpoolError)."""
        try:
            if self._dirty and self._write_fd is not None:
                os.fsync(self._write_fd)
                self._dirty = False
            if self._commit_pending:
                self._write_committed()
        except OSError as exc:
            raise SpoolError(f"cannot sync the spool: {exc}") from exc

    def _open_for_append(self, number: int) -> None:
        """Make segment `number` the one appended to; the previous one is fsync'd and closed once it is open."""
        path = self._segment_path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        previous, self._write_fd = self._write_fd, fd
        self._write_segment = number
        self._write_offset = os.fstat(fd).st_size
        if previous is not None:
            try:
                os.fsync(previous)
            finally:
                os.close(previous)

    # --- reading and committing

    @property
    def unread(self) -> bool:
        """Records exist after the read cursor."""
        return self._cursor < SpoolPosition(self._write_segment, self._write_offset)

    def read(self, max_records: int) -> list[SpooledRecord]:
        """Up to `max_records` records after the cursor, in order; advances the cursor (SpoolError if the disk
        fails)."""
        try:
            spooled = self._read(max_records)
        except OSError as exc:
            raise SpoolError(f"cannot read the spool: {exc}") from exc
        return self._in_current_schema(spooled)

    def _in_current_schema(self, spooled: list[SpooledRecord]) -> list[SpooledRecord]:
        """Updates an older version wrote, re-encoded in the current schema; one written with a schema this
        version does not know becomes a dead letter."""
        history = self._schema_history
        upgraded = unknown = 0
        for index, entry in enumerate(spooled):
            record = entry.record
            if record.kind is not KIND_UPDATE:
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
            detail = f"spooled with schema fingerprint {fingerprint.decode(errors='replace')}, not a released version"
            letter = dead_letter(
                RejectReason.UNKNOWN_SCHEMA.value,
                record.value,
                key=record.key,
                received=record.received,
                headers=record.headers,
                detail=detail,
            )
            spooled[index] = SpooledRecord(letter, entry.end, entry.size)
            unknown += 1
        if upgraded:
            log_event(logger, logging.INFO, "spooled_records_upgraded", records=upgraded)
        if unknown:
            log_event(logger, logging.ERROR, "spooled_records_unknown_schema", records=unknown)
            if self._on_unknown_schema is not None:
                self._on_unknown_schema(unknown)
        return spooled

    def _read(self, max_records: int) -> list[SpooledRecord]:
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
                    stored, key, value, headers, reason, received = _decode(payload)
                    kind = _KINDS.get(stored) or (RecordKind.UPDATE if reason is None else RecordKind.DEAD_LETTER)
                    record = OutgoingRecord(kind, key, value, headers, received, reason)
                    out.append(SpooledRecord(record, end, _HEADER.size + length))
        return out

    def rewind(self) -> None:
        """Read again from the committed position (after a failed publish round)."""
        self._cursor = self._committed

    def acknowledge(self, delivered: list[SpooledRecord]) -> None:
        """Kafka acknowledged these: move the committed position over every contiguous acknowledged entry.

        The position moves in memory in any case; SpoolError says it could not be written yet (`sync` retries).
        """
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
            self._forget_key(spooled.record.key)
            committed = spooled.end
        if committed != self._committed:
            try:
                self._set_committed(committed)
            except OSError as exc:
                self._commit_pending = True
                raise SpoolError(f"cannot commit the spool position: {exc}") from exc

    def pending(self, keys: Collection[bytes]) -> int:
        """Unacknowledged records with one of `keys`."""
        return sum(self._keys.get(key, 0) for key in keys)

    def _forget_key(self, key: bytes | None) -> None:
        remaining = self._keys[key] - 1
        if remaining > 0:
            self._keys[key] = remaining
        else:
            del self._keys[key]

    def _segment_ends_at(self, position: SpoolPosition) -> bool:
        if position.segment >= self._write_segment:
            return False
        path = self._segment_path(position.segment)
        return not path.exists() or path.stat().st_size <= position.offset

    def _set_committed(self, position: SpoolPosition) -> None:
        """Move the durable position, then unlink the segments before it (never the other way round)."""
        if self.records == 0 and position == SpoolPosition(self._write_segment, self._write_offset):
            # Fully drained: start a fresh segment so that the old one can go.
            self._open_for_append(self._write_segment + 1)
            position = SpoolPosition(self._write_segment, 0)
        self._committed = position
        self._cursor = max(self._cursor, position)
        self._write_committed()
        for number in self._segments():
            if number < position.segment:
                self._segment_path(number).unlink(missing_ok=True)

    def _write_committed(self) -> None:
        """Replace committed.json durably: fsync'd temporary file, rename, fsync of the directory (a crash
        leaves the old or the new one, never half)."""
        position = self._committed
        temporary = self.directory / (_COMMITTED + ".tmp")
        with temporary.open("wb") as handle:
            handle.write(json.dumps({"segment": position.segment, "offset": position.offset}).encode())
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.directory / _COMMITTED)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._commit_pending = False

    def close(self, unsent: list[OutgoingRecord] | None = None) -> None:
        """fsync and close; `unsent` (older than everything spooled) is kept first for the next start.

        The records go into a new first segment, followed by the uncommitted rest of the committed
        segment, which is then removed; the committed position moves to the start of the new segment.
        """
        try:
            self._close(unsent or [])
        except OSError as exc:
            raise SpoolError(f"cannot close the spool: {exc}") from exc

    def _close(self, unsent: list[OutgoingRecord]) -> None:
        if self._write_fd is not None:
            fd, self._write_fd = self._write_fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self._commit_pending:
            self._write_committed()
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
        self.records += len(unsent)
        self._keys.update(record.key for record in unsent)
        self._committed = SpoolPosition(number, 0)
        self._write_committed()
        old.unlink(missing_ok=True)

    # --- files

    def _size(self, number: int) -> int:
        path = self._segment_path(number)
        return path.stat().st_size if path.exists() else 0

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"segment-{number:08d}.spool"

    def _segments(self) -> list[int]:
        return sorted(int(path.stem.removeprefix("segment-")) for path in self.directory.glob("segment-*.spool"))
