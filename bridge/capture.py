"""Capture files: the raw records of `ime-bridge capture`, as JSON lines (bridge/raw.py), rotated by size.

A name ending in `.zst` is zstd-compressed: each publish round is written as one zstd frame, so a file cut
short by a crash loses at most its last round and `zstd -d` reads it. A file holds at most `max_bytes` of
JSON lines (before compression), which also bounds what reading one takes in memory; the next one is
named with a number before the suffixes (`cap.jsonl.zst`, `cap.1.jsonl.zst`, `cap.2.jsonl.zst`, …), and a
capture never overwrites: it continues after the highest number present. `read_capture` reads the series
back in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import cramjam

from bridge.logs import log_event
from bridge.raw import CapturedFrame, NotCaptured, from_json_line, to_json_line
from bridge.records import KIND_RAW, Failed, Outcome, OutgoingRecord, RawFrames, RecordKind, with_raw_frames

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20


def series_path(path: Path, number: int) -> Path:
    """The `number`th file of the series that starts at `path` (0 is `path` itself)."""
    if number == 0:
        return path
    stem, dot, suffixes = path.name.partition(".")
    return path.with_name(f"{stem}.{number}{dot}{suffixes}")


def _compressed(path: Path) -> bool:
    return path.name.endswith(".zst")


class CaptureFileSink:
    """The Sink of `ime-bridge capture`: raw records go to the capture files; a dead letter (a frame too large
    to be read) cannot be captured and is logged; Kafka is not involved."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._number = 0
        self._file: BinaryIO | None = None
        self._written = 0

    def topic(self, kind: RecordKind) -> str:
        """Where records of `kind` go (for metrics and logs)."""
        return str(self.path) if kind is RecordKind.RAW else "log"

    async def start(self) -> None:
        """Open the next file of the series (never one that exists)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while series_path(self.path, self._number).exists():
            self._number += 1
        self._open()

    def _open(self) -> None:
        path = series_path(self.path, self._number)
        self._file = path.open("xb")
        self._written = 0
        log_event(logger, logging.INFO, "capture_file_opened", path=str(path))

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        """Append the round's raw records and frames (one zstd frame for a `.zst` file); rotate once past
        `max_bytes`."""
        assert self._file is not None, "publish before start"
        records = with_raw_frames(records, raw)
        lines = []
        for record in records:
            if record.kind is KIND_RAW:
                lines.append(to_json_line(record))
            else:
                reason = record.dead_letter_reason or record.kind.value
                log_event(logger, logging.ERROR, "not_captured", reason=reason, bytes=len(record.value))
        data = b"".join(lines)
        try:
            if data:
                self._file.write(bytes(cramjam.zstd.compress(data)) if _compressed(self.path) else data)
                self._file.flush()
                self._written += len(data)
            if self._written >= self.max_bytes:
                self._file.close()
                self._number += 1
                self._open()
        except OSError as exc:
            return [Failed(type(exc).__name__)] * len(records)
        return [None] * len(records)

    async def stop(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_capture(path: Path) -> Iterator[CapturedFrame | NotCaptured]:
    """Every record of the series starting at `path`, in order; a line that is not one comes as NotCaptured.

    Raises OSError when `path` cannot be read, NotCaptured when a `.zst` file is not zstd.
    """
    number = 0
    while (current := series_path(path, number)).exists() or number == 0:
        data, torn = current.read_bytes(), 0
        if _compressed(current):
            frames, torn = zstd_frames(data)
            try:
                data = b"".join(bytes(cramjam.zstd.decompress(frame)) for frame in frames)
            except cramjam.DecompressionError as exc:
                raise NotCaptured(f"{current}: not zstd: {exc}") from None
        for line in data.splitlines():
            if not line:
                continue
            try:
                yield from_json_line(line)
            except NotCaptured as exc:
                yield exc
        if torn:
            yield NotCaptured(f"{current}: the last {torn} bytes are a zstd frame cut short")
        number += 1


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_frames(data: bytes) -> tuple[list[bytes], int]:
    """Split concatenated zstd frames (RFC 8878, section 3.1.1): (the whole frames, the bytes of a frame cut short
    at the end, 0 if none). Raises NotCaptured when the data is not zstd frames."""
    frames: list[bytes] = []
    start = 0
    while start < len(data):
        end = _frame_end(data, start)
        if end is None:
            return frames, len(data) - start
        frames.append(data[start:end])
        start = end
    return frames, 0


def _frame_end(data: bytes, start: int) -> int | None:
    """Where the zstd frame at `start` ends; None if the data ends first."""
    if len(data) < start + 5:
        return None
    if data[start : start + 4] != _ZSTD_MAGIC:
        raise NotCaptured(f"not a zstd frame at byte {start}")
    descriptor = data[start + 4]
    single_segment = descriptor >> 5 & 1
    content_size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    dictionary_bytes = (0, 1, 2, 4)[descriptor & 3]
    position = start + 5 + (0 if single_segment else 1) + dictionary_bytes + content_size_bytes
    while True:
        if len(data) < position + 3:
            return None
        header = int.from_bytes(data[position : position + 3], "little")
        block_type, size = header >> 1 & 3, header >> 3
        if block_type == 3:
            raise NotCaptured(f"reserved zstd block type at byte {position}")
        position += 3 + (1 if block_type == 1 else size)
        if header & 1:  # the frame's last block
            break
    position += 4 if descriptor >> 2 & 1 else 0  # content checksum
    return position if position <= len(data) else None
