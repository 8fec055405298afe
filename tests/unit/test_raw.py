"""Raw records (bridge/raw.py): the key read cheaply, the records and markers read back, the capture-file lines;
every reader of network or disk bytes property-tested to answer a record or NotCaptured, nothing else."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.normalize import ContractDirectory
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.raw import (
    CapturedFrame,
    NotCaptured,
    connection_headers,
    frame_key,
    from_json_line,
    subscription_marker,
    to_json_line,
)
from bridge.records import RecordKind, raw_frame

NAMES = ContractDirectory({"1001": "GC1405", "1002": "SAFOR04"})
BY_ID = ConnectionInfo(Subscription("id-0", Endpoint.ID, ("1001", "1002", "1003")), attempt=2)
BY_NAME = ConnectionInfo(Subscription("name-1", Endpoint.NAME, ("GC1405", "UNKNOWN")), attempt=7)


@pytest.mark.parametrize(
    ("frame", "key"),
    [
        (b'{"channel": "IME Stream", "contractId": "1001", "data": {}}', b"1001"),
        (b'{"ContractId":1002,"data":{}}', b"1002"),
        (b'{"contractId": 1003}', b"1003"),
        (b'{"contractName": "GC1405", "data": {}}', b"1001"),  # by name: the directory's id
        (b'{"contractName": "NOBODY"}', None),  # a name nobody resolved: no key, not a guess
        (b'{"contractId": "10\\u0030"}', None),  # escapes are not cheap
        (b'{"channel": "IME Stream"}', None),
        (b"\x00\x01\xff\x9c", None),
        (b'{"contractId": "\xff\xfe"}', "\ufffd\ufffd".encode()),  # read as UTF-8 with replacement: a valid key
    ],
)
def test_the_key_is_the_contract_id_when_it_can_be_read_cheaply(frame: bytes, key: bytes | None) -> None:
    assert frame_key(frame, NAMES) == key


@given(st.binary(max_size=400))
def test_any_frame_gets_a_valid_key_or_none(frame: bytes) -> None:
    key = frame_key(frame, NAMES)
    assert key is None or key.decode("utf-8")


def test_a_raw_record_is_the_frame_as_received_and_reads_back() -> None:
    frame = b'{"contractId": "1001", "data": {"x": 1}}'
    record = raw_frame(frame, 1_796_000_000_123_456, connection_headers(BY_ID), b"1001")
    assert (record.kind, record.key, record.value) == (RecordKind.RAW, b"1001", frame)
    assert record.headers == [
        ("endpoint", b"id"),
        ("connection", b"id-0/2"),
        ("receive-time-us", b"1796000000123456"),
    ]
    captured = CapturedFrame.of(record.key, record.value, record.headers)
    assert captured == CapturedFrame(b"1001", frame, 1_796_000_000_123_456, Endpoint.ID, "id-0", 2, None)


@pytest.mark.parametrize("connection", [BY_ID, BY_NAME])
def test_a_subscription_marker_says_what_its_connection_subscribed_and_the_names_known(
    connection: ConnectionInfo,
) -> None:
    record = subscription_marker(connection, NAMES, 5)
    assert record.kind is RecordKind.RAW
    assert record.key is None
    captured = CapturedFrame.of(record.key, record.value, record.headers)
    assert captured.marker is not None
    assert captured.marker.connection == connection
    expected = {"1001": "GC1405", "1002": "SAFOR04"} if connection is BY_ID else {"1001": "GC1405"}
    assert captured.marker.names == expected


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("connection", b"id-0/1"), ("receive-time-us", b"1")], "no endpoint header"),
        ([("endpoint", b"id"), ("receive-time-us", b"1")], "no connection header"),
        ([("endpoint", b"id"), ("connection", b"id-0/1")], "no receive-time-us header"),
        ([("endpoint", b"xx"), ("connection", b"id-0/1"), ("receive-time-us", b"1")], "bad raw headers"),
        ([("endpoint", b"id"), ("connection", b"id-0"), ("receive-time-us", b"1")], "bad raw headers"),
        ([("endpoint", b"id"), ("connection", b"id-0/1"), ("receive-time-us", b"-1")], "out of range"),
        (
            [("endpoint", b"id"), ("connection", b"id-0/1"), ("receive-time-us", b"1"), ("raw-event", b"opened")],
            "unknown raw event",
        ),
        (
            [("endpoint", b"id"), ("connection", b"id-0/1"), ("receive-time-us", b"1"), ("raw-event", b"subscribed")],
            "bad subscription marker",
        ),
    ],
)
def test_what_is_not_a_raw_record_is_refused_naming_why(headers: list[tuple[str, bytes]], why: str) -> None:
    with pytest.raises(NotCaptured, match=why):
        CapturedFrame.of(None, b"{}", headers)


HEADER_VALUES = st.one_of(st.binary(max_size=30), st.sampled_from([b"id", b"name", b"id-0/1", b"1", b"subscribed"]))
HEADERS = st.lists(
    st.tuples(st.sampled_from(["endpoint", "connection", "receive-time-us", "raw-event", "other"]), HEADER_VALUES),
    max_size=6,
)


@given(st.one_of(st.none(), st.binary(max_size=20)), st.binary(max_size=200), HEADERS)
def test_any_record_reads_as_a_frame_or_not_captured(key: bytes | None, value: bytes, headers: list) -> None:  # type: ignore[type-arg]
    with contextlib.suppress(NotCaptured):
        CapturedFrame.of(key, value, headers)


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_a_capture_line_gives_back_the_frame_byte_for_byte(frame: bytes, receive_time: int) -> None:
    record = raw_frame(frame, receive_time, connection_headers(BY_NAME), frame_key(frame, NAMES))
    line = to_json_line(record)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1, "one line, whatever the frame holds"
    captured = from_json_line(line)
    assert (captured.value, captured.key, captured.receive_time) == (frame, record.key, receive_time)
    assert (captured.subscription, captured.attempt, captured.endpoint) == ("name-1", 7, Endpoint.NAME)


def test_a_text_frame_is_readable_in_its_line_and_a_binary_one_is_base64() -> None:
    text = json.loads(to_json_line(raw_frame(b'{"contractId": "1001"}', 1, connection_headers(BY_ID), None)))
    assert text["frame"] == '{"contractId": "1001"}'
    binary = json.loads(to_json_line(raw_frame(b"\x00\xff", 1, connection_headers(BY_ID), None)))
    assert binary["frame_base64"] == "AP8="


@given(st.binary(max_size=300))
def test_any_line_reads_as_a_frame_or_not_captured(line: bytes) -> None:
    with contextlib.suppress(NotCaptured):
        from_json_line(line)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["key", "headers", "frame", "frame_base64", "endpoint"]), inner, max_size=4
            )
        ),
        max_leaves=12,
    )
)
def test_any_json_reads_as_a_frame_or_not_captured(document: object) -> None:
    with contextlib.suppress(NotCaptured):
        from_json_line(json.dumps(document).encode())
