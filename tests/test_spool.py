"""spool: append, read, commit, reopen, damage, limits, on real files in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.sink import OutgoingRecord
from bridge.spool import Spool, SpoolFull


def record(n: int, size: int = 10) -> OutgoingRecord:
    return OutgoingRecord("t", str(n).encode(), bytes([n % 256]) * size, [("h", b"v")], 1000.0 + n)


def values(spooled: list) -> list[bytes | None]:  # type: ignore[type-arg]
    return [item.record.key for item in spooled]


def opened(directory: Path, **kwargs: int) -> Spool:
    spool = Spool(directory, max_bytes=kwargs.pop("max_bytes", 1 << 20), **kwargs)
    spool.open()
    return spool


def test_records_come_back_in_order_with_every_field(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(5):
        spool.append(record(n))
    read = spool.read(10)
    assert values(read) == [b"0", b"1", b"2", b"3", b"4"]
    assert read[2].record == record(2)
    assert spool.records == 5
    assert not spool.unread


def test_only_acknowledged_records_leave_and_a_restart_replays_the_rest(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(6):
        spool.append(record(n))
    read = spool.read(6)
    spool.acknowledge(read[:2])
    assert spool.records == 4
    spool.close()

    reopened = opened(tmp_path)
    assert reopened.records == 4
    assert values(reopened.read(10)) == [b"2", b"3", b"4", b"5"]


def test_acknowledgements_out_of_order_commit_only_the_contiguous_prefix(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(4):
        spool.append(record(n))
    read = spool.read(4)
    spool.acknowledge([read[1], read[3]])
    assert spool.records == 4
    spool.rewind()
    assert values(spool.read(4)) == [b"0", b"2"], "acknowledged entries are not read again"
    spool.acknowledge([read[0], read[2]])
    assert spool.records == 0


def test_a_torn_last_entry_is_cut_off_and_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(3):
        spool.append(record(n))
    spool.close()
    (segment,) = tmp_path.glob("segment-*.spool")
    size = segment.stat().st_size
    os.truncate(segment, size - 5)  # the process died in the middle of the last write

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    recovery = reopened.open()
    assert (recovery.records, recovery.torn_entries) == (2, 1)
    assert values(reopened.read(10)) == [b"0", b"1"]
    reopened.append(record(9))
    assert values(reopened.read(10)) == [b"9"]


def test_a_corrupt_entry_in_an_older_segment_drops_the_rest_of_that_segment_only(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=200)
    for n in range(12):
        spool.append(record(n, size=40))
    spool.close()
    first = sorted(tmp_path.glob("segment-*.spool"))[0]
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF
    first.write_bytes(bytes(data))

    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    recovery = reopened.open()
    assert recovery.corrupt_segments == 1
    keys = values(reopened.read(20))
    assert keys[0] == b"0"
    assert keys[-1] == b"11"
    assert len(keys) == 11


def test_the_size_limit_is_enforced_and_frees_up_when_acknowledged(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=300)
    while spool.bytes + (spool.bytes // max(spool.records, 1) or 1) <= 300:
        spool.append(record(spool.records, size=40))
    with pytest.raises(SpoolFull, match="spool_max_bytes=300"):
        spool.append(record(98, size=40))
    assert 0 < spool.bytes <= 300
    spool.acknowledge(spool.read(1))
    spool.append(record(99, size=40))


def test_drained_segments_are_deleted(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=200)
    for n in range(20):
        spool.append(record(n, size=40))
    assert len(list(tmp_path.glob("segment-*.spool"))) > 3
    spool.acknowledge(spool.read(20))
    assert spool.records == 0
    assert spool.bytes == 0
    assert len(list(tmp_path.glob("segment-*.spool"))) == 1


def test_close_keeps_unsent_older_records_first(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(10, 14):
        spool.append(record(n))
    spool.acknowledge(spool.read(1))  # 10 is done; 11..13 wait
    spool.close(unsent=[record(1), record(2)])

    reopened = opened(tmp_path)
    assert reopened.records == 5
    assert values(reopened.read(10)) == [b"1", b"2", b"11", b"12", b"13"]
