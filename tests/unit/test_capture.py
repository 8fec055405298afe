"""Capture files (bridge/capture.py): rotated by size, never overwritten, zstd read back frame by frame, a file cut
short read up to its last whole round; the simulator's market read from one (simulator/replay.py)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import cramjam
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.capture import CaptureFileSink, read_capture, series_path, zstd_frames
from bridge.devtools.simulator.replay import CapturedMarket
from bridge.normalize import ContractDirectory
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.raw import CapturedFrame, NotCaptured, connection_headers, subscription_marker
from bridge.records import OutgoingRecord, RecordKind, dead_letter, raw_frame

CONNECTION = ConnectionInfo(Subscription("id-0", Endpoint.ID, ("1001", "1002")), attempt=1)
HEADERS = connection_headers(CONNECTION)


def frames(count: int, start: int = 0) -> list[OutgoingRecord]:
    return [
        raw_frame(b'{"contractId": "1001", "n": %d}' % n, 1_000_000 + n, HEADERS, b"1001")
        for n in range(start, start + count)
    ]


def values(path: Path) -> list[bytes]:
    items = list(read_capture(path))
    assert all(isinstance(item, CapturedFrame) for item in items)
    return [item.value for item in items if isinstance(item, CapturedFrame)]


def files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_series_names_put_the_number_before_the_suffixes() -> None:
    assert series_path(Path("/d/cap.jsonl.zst"), 0) == Path("/d/cap.jsonl.zst")
    assert series_path(Path("/d/cap.jsonl.zst"), 2) == Path("/d/cap.2.jsonl.zst")
    assert series_path(Path("/d/capture"), 1) == Path("/d/capture.1")


@pytest.mark.parametrize("name", ["capture.jsonl", "capture.jsonl.zst"])
async def test_rounds_are_appended_rotated_by_size_and_read_back_in_order(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sink = CaptureFileSink(path, max_bytes=300)
    await sink.start()
    for round_number in range(5):
        assert await sink.publish(frames(4, 4 * round_number)) == [None] * 4
    await sink.stop()
    assert len(files(tmp_path)) >= 4, "rotated"
    assert values(path) == [record.value for record in frames(20)]
    if name.endswith(".zst"):
        assert cramjam.zstd.decompress(path.read_bytes()), "standard zstd"


async def test_a_new_capture_continues_the_series_instead_of_overwriting(tmp_path: Path) -> None:
    path = tmp_path / "cap.jsonl"
    for start in (0, 3):
        sink = CaptureFileSink(path)
        await sink.start()
        await sink.publish(frames(3, start))
        await sink.stop()
    assert files(tmp_path) == ["cap.1.jsonl", "cap.jsonl"]
    assert values(path) == [record.value for record in frames(6)]


async def test_a_dead_letter_cannot_be_captured_and_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = CaptureFileSink(tmp_path / "cap.jsonl")
    await sink.start()
    letter = dead_letter("oversized", b"", key=None, received=0.0, headers=[])
    with caplog.at_level(logging.ERROR):
        assert await sink.publish([letter, *frames(1)]) == [None, None]
    await sink.stop()
    assert "not_captured" in caplog.text
    assert len(values(tmp_path / "cap.jsonl")) == 1


async def test_a_compressed_file_cut_short_is_read_up_to_its_last_whole_round(tmp_path: Path) -> None:
    path = tmp_path / "cap.jsonl.zst"
    sink = CaptureFileSink(path)
    await sink.start()
    await sink.publish(frames(3))
    await sink.publish(frames(3, 3))
    await sink.stop()
    path.write_bytes(path.read_bytes()[:-5])  # a crash in the middle of the second round's write
    items = list(read_capture(path))
    assert [item.value for item in items if isinstance(item, CapturedFrame)] == [r.value for r in frames(3)]
    assert isinstance(items[-1], NotCaptured)
    assert "cut short" in str(items[-1])


def test_a_missing_capture_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_capture(tmp_path / "none.jsonl"))


@given(st.lists(st.binary(max_size=2000), min_size=1, max_size=5), st.data())
def test_zstd_frames_split_a_concatenation_and_tell_a_torn_end(chunks: list[bytes], data: st.DataObject) -> None:
    compressed = [bytes(cramjam.zstd.compress(chunk)) for chunk in chunks]
    whole = b"".join(compressed)
    assert zstd_frames(whole) == (compressed, 0)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole)))
    found, torn = zstd_frames(whole[:cut])
    assert b"".join(found) + whole[cut - torn : cut] == whole[:cut]
    assert found == compressed[: len(found)]


@given(st.binary(max_size=200))
def test_zstd_frames_of_any_bytes_answer_or_refuse(data: bytes) -> None:
    with contextlib.suppress(NotCaptured):
        zstd_frames(data)


async def test_the_simulator_market_of_a_capture_is_its_contracts_and_frames(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    by_name = ConnectionInfo(Subscription("name-0", Endpoint.NAME, ("GC1405",)), attempt=1)
    names = ContractDirectory({"1001": "SAFOR04", "2002": "GC1405"})
    sink = CaptureFileSink(path)
    await sink.start()
    await sink.publish(
        [
            subscription_marker(CONNECTION, names, 1_000_000),
            subscription_marker(by_name, names, 1_000_000),
            raw_frame(b'{"contractId": "1002"}', 1_000_000, HEADERS, b"1002"),
            raw_frame(b"\xff garbage", 1_500_000, HEADERS, None),
            raw_frame(b'{"contractId": "9999"}', 2_000_000, HEADERS, b"9999"),  # nobody subscribed it
        ]
    )
    await sink.stop()
    market = CapturedMarket.load(path)
    assert [(contract.id, contract.name) for contract in market.contracts][:2] == [
        ("1001", "SAFOR04"),
        ("1002", market.contracts[1].name),
    ]
    assert [contract.id for contract in market.contracts] == ["1001", "1002", "2002"]
    assert market.contracts[2].name == "GC1405"
    assert [(frame.at, frame.contract_id, frame.text) for frame in market.frames] == [
        (0.0, "1002", True),
        (0.5, None, False),  # to every connection of its endpoint
        (1.0, None, True),
    ]


async def test_a_capture_without_frames_cannot_be_a_market(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="no captured frame"):
        CapturedMarket.load(path)


def test_a_spooled_raw_record_keeps_its_kind(tmp_path: Path) -> None:
    from bridge.spool import Spool

    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.open()
    spool.append(frames(1)[0])
    [read] = spool.read(10)
    assert read.record.kind is RecordKind.RAW
    assert read.record.value == frames(1)[0].value
