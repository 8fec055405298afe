"""spool: append, read, commit, reopen, damage, limits, on real files in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.encode import load_schema
from bridge.records import HEADER_FINGERPRINT, OutgoingRecord, RecordKind
from bridge.spool import Spool, SpoolFull

# Values in the current schema's name come back as written (older ones are upgraded on reading).
HEADERS = [("h", b"v"), (HEADER_FINGERPRINT, load_schema().fingerprint.encode())]


def record(n: int, size: int = 10) -> OutgoingRecord:
    return OutgoingRecord(RecordKind.UPDATE, str(n).encode(), bytes([n % 256]) * size, HEADERS, 1000.0 + n)


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


def test_unacknowledged_records_are_counted_per_key_and_recounted_from_disk(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in (1, 2, 1, 3, 1):
        spool.append(record(n))
    spool.append_many([record(2), record(4)])
    assert (spool.pending({b"1"}), spool.pending({b"2", b"4"}), spool.pending({b"9"})) == (3, 3, 0)
    read = spool.read(7)
    spool.acknowledge([read[1], read[2]])  # not contiguous with the committed position: still pending
    assert spool.pending({b"1", b"2"}) == 5
    spool.acknowledge([read[0]])
    assert (spool.pending({b"1"}), spool.pending({b"2"})) == (1, 1)
    spool.close([record(5)])
    reopened = opened(tmp_path)
    assert [reopened.pending({key}) for key in (b"1", b"2", b"3", b"4", b"5")] == [1, 1, 1, 1, 1]
    reopened.acknowledge(reopened.read(10))
    assert reopened.pending({b"1", b"2", b"3", b"4", b"5"}) == 0


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


def test_a_batch_is_appended_with_its_positions_and_acknowledged_like_read_records(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    spool.append(record(0))
    batch = spool.append_many([record(1), record(2)])
    assert [item.record.key for item in batch] == [b"1", b"2"]
    first = spool.read(1)
    spool.acknowledge([*first, *batch])
    assert spool.records == 0
    assert spool.read(10) == [], "records acknowledged from their append are not read again"


# --- crash consistency of the bookkeeping: a child process dies at each point, the parent reopens the spool


@pytest.mark.parametrize("content", [b"", b'{"segment": 0, "off', b"\x00\xff garbage", b'{"segment": "x"}', b"[]"])
def test_an_empty_or_unreadable_committed_json_is_recovered_by_replaying_every_segment(
    tmp_path: Path, content: bytes
) -> None:
    spool = opened(tmp_path, segment_bytes=200)
    for n in range(12):
        spool.append(record(n, size=40))
    spool.acknowledge(spool.read(3))
    spool.close()
    (tmp_path / "committed.json").write_bytes(content)

    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    recovery = reopened.open()
    keys = values(reopened.read(20))
    assert keys[-9:] == [str(n).encode() for n in range(3, 12)], "nothing unsent is lost"
    assert recovery.possible_duplicates == len(keys) == recovery.records
    reopened.acknowledge(reopened.read(0))
    reopened.close()
    assert opened(tmp_path, segment_bytes=200).records == len(keys), "the recovered position was written"


# --- property tests: whatever the disk holds, opening recovers an in-order prefix and never raises


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    count=st.integers(min_value=0, max_value=12),
    damage=st.one_of(
        st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=4000)),
        st.tuples(st.just("flip"), st.integers(min_value=0, max_value=4000)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    ),
)
def test_any_damage_to_a_segment_leaves_an_in_order_prefix(
    tmp_path_factory: pytest.TempPathFactory, count: int, damage: tuple[str, object]
) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = opened(directory)
    for n in range(count):
        spool.append(record(n, size=n * 7))
    spool.close()
    (segment,) = directory.glob("segment-*.spool")
    data = bytearray(segment.read_bytes())
    kind, argument = damage
    if kind == "truncate" and isinstance(argument, int):
        del data[argument:]
    elif kind == "flip" and isinstance(argument, int) and data:
        data[argument % len(data)] ^= 0x5A
    elif isinstance(argument, bytes):
        data += argument
    segment.write_bytes(bytes(data))

    reopened = Spool(directory, max_bytes=1 << 20)
    recovery = reopened.open()
    read = reopened.read(100)
    assert [item.record for item in read] == [record(n, size=n * 7) for n in range(len(read))]
    assert recovery.records == len(read)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=80))
def test_any_committed_json_opens(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    directory = tmp_path_factory.mktemp("spool")
    spool = opened(directory)
    for n in range(3):
        spool.append(record(n))
    spool.close()
    (directory / "committed.json").write_bytes(content)
    reopened = Spool(directory, max_bytes=1 << 20)
    reopened.open()
    assert isinstance(reopened.read(10), list)


def test_a_committed_position_past_its_segment_is_distrusted(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(3):
        spool.append(record(n))
    spool.close()
    (tmp_path / "committed.json").write_text('{"segment": 0, "offset": 99999}')
    reopened = opened(tmp_path)
    reopened.append(record(3))
    assert values(reopened.read(10)) == [b"0", b"1", b"2", b"3"]
