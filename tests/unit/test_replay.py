"""The replay (bridge/replay.py) in memory: connections rebuilt from their markers, the window, the pace, and what is
not a raw record counted and skipped."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from bridge.config import Settings
from bridge.normalize import ContractDirectory
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.raw import CapturedFrame, NotCaptured, connection_headers, subscription_marker
from bridge.records import MemorySink, OutgoingRecord, RecordKind, raw_frame
from bridge.replay import Replay, replay_kafka_settings
from tests.unit.test_pipeline import decode, frame

SETTINGS = Settings.model_validate(
    {
        "ime": {"token": "t", "contract_ids": ["1001", "1002"]},
        "kafka": {"raw_topic": "raw", "state_topic_enabled": True},
    }
)
# A connection whose subscription changed since the config (1002 was quarantined, say): the marker says so.
CONNECTION = ConnectionInfo(Subscription("id-0", Endpoint.ID, ("1001",)), attempt=4)
START = 1_796_000_000_000_000


def captured(record: OutgoingRecord) -> CapturedFrame:
    return CapturedFrame.of(record.key, record.value, record.headers)


def session(gap_us: int = 1000) -> list[CapturedFrame | NotCaptured]:
    headers = connection_headers(CONNECTION)
    return [
        captured(subscription_marker(CONNECTION, ContractDirectory({"1001": "GC1405"}), START)),
        captured(raw_frame(frame({"contractId": "1001"}).encode(), START + gap_us, headers, b"1001")),
        captured(raw_frame(frame({"contractId": "1002"}).encode(), START + 2 * gap_us, headers, None)),
        NotCaptured("no endpoint header"),
        captured(raw_frame(frame({"contractId": "1001"}, 101).encode(), START + 3 * gap_us, headers, b"1001")),
    ]


async def frames(items: Iterable[CapturedFrame | NotCaptured]) -> AsyncIterator[CapturedFrame | NotCaptured]:
    for item in items:
        yield item


async def test_a_replay_rebuilds_each_connection_from_its_marker() -> None:
    sink = MemorySink()
    replay = Replay(SETTINGS, sink)
    summary = await replay.run(frames(session()))
    assert (summary.frames, summary.not_captured, summary.published, summary.dead_letters) == (3, 1, 2, 1)
    updates = [record for record in sink.records if record.kind is RecordKind.UPDATE]
    values = [decode(record) for record in updates]
    assert [(value["contract_id"], value["sequence"], value["first_after_subscribe"]) for value in values] == [
        ("1001", 1, True),
        ("1001", 2, False),
    ]
    assert {value["session_id"] for value in values} == {summary.session_id}
    assert values[0]["contract_name"] == "GC1405", "the marker's names"
    assert values[0]["receive_time"].timestamp() == (START + 1000) / 1e6, "the captured receive time"
    [letter] = [record for record in sink.records if record.kind is RecordKind.DEAD_LETTER]
    assert dict(letter.headers)["reason"] == b"unknown_contract", "1002 was not subscribed on that connection"
    assert all(dict(record.headers)["replay"] == summary.session_id.encode() for record in sink.records)
    assert all(dict(record.headers)["connection"] == b"id-0/4" for record in sink.records)


async def test_a_replay_window_keeps_the_markers() -> None:
    sink = MemorySink()
    summary = await Replay(SETTINGS, sink).run(frames(session()), since_us=START + 3000, until_us=START + 4000)
    assert (summary.frames, summary.outside_window, summary.published) == (1, 2, 1)
    [update] = sink.records
    assert decode(update)["contract_name"] == "GC1405"


async def test_at_the_captured_pace_a_replay_takes_at_least_the_captured_time() -> None:
    started = time.monotonic()
    summary = await Replay(SETTINGS, MemorySink()).run(frames(session(gap_us=150_000)), pace=True)
    assert summary.frames == 3
    assert time.monotonic() - started >= 0.3, "the second and third frame came 150 ms apart each"


def test_a_replay_publishes_to_its_own_topic_and_never_to_the_state_or_raw_topic() -> None:
    kafka = replay_kafka_settings(SETTINGS.kafka, "replayed")
    assert (kafka.topic, kafka.dlq_topic, kafka.state_topic_enabled, kafka.raw_topic) == (
        "replayed",
        SETTINGS.kafka.dlq_topic,
        False,
        "",
    )
    assert replay_kafka_settings(SETTINGS.kafka, None).topic == SETTINGS.kafka.topic


async def test_a_replay_never_conflates_even_with_a_small_buffer() -> None:
    settings = SETTINGS.model_copy(update={"buffer": SETTINGS.buffer.model_copy(update={"capacity_records": 1})})
    sink = MemorySink()
    summary = await Replay(settings, sink).run(frames(session()))
    updates = [decode(record) for record in sink.records if record.kind is RecordKind.UPDATE]
    assert summary.published == len(updates) == 2
    assert [update["skipped"] for update in updates] == [0, 0]


async def test_the_overlap_of_a_handover_is_replayed_once_in_order() -> None:
    """Both replicas were subscribed while a shard changed hands, so the capture holds those frames twice, the
    taker's after the giver's later ones: each snapshot is published once, in the market's order."""
    giver = ConnectionInfo(Subscription("id-s1-0", Endpoint.ID, ("1001",), "s1"), attempt=1)
    taker = ConnectionInfo(Subscription("id-s1-0", Endpoint.ID, ("1001",), "s1"), attempt=9)
    directory = ContractDirectory({"1001": "GC1405"})

    def snapshots(connection: ConnectionInfo, prices: range, at: int) -> list[CapturedFrame | NotCaptured]:
        headers = connection_headers(connection)
        marker = captured(subscription_marker(connection, directory, at))
        return [marker] + [
            captured(raw_frame(frame({"contractId": "1001"}, price).encode(), at + price, headers, b"1001"))
            for price in prices
        ]

    sink = MemorySink()
    summary = await Replay(SETTINGS, sink).run(
        frames([*snapshots(giver, range(1, 5), START), *snapshots(taker, range(2, 6), START + 10)])
    )
    values = [decode(record) for record in sink.records if record.kind is RecordKind.UPDATE]
    assert [(v["contract_info"]["open_interest"], v["sequence"]) for v in values] == [(n, n) for n in range(1, 6)]
    assert summary.published == 5
