"""Raw capture and replay through the simulator and a real broker: the raw topic holds every frame byte for byte,
and a replay (from the topic or from a capture file) publishes the same updates and dead letters as the live run;
the simulator plays a capture file as its market."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from bridge.app import Bridge
from bridge.capture import CaptureFileSink, read_capture
from bridge.config import Settings
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.raw import CapturedFrame
from bridge.replay import Replay, frames_from_file, frames_from_topic, replay_kafka_settings
from bridge.sink import KafkaSink
from tests.support.broker import BrokerInfo, consume
from tests.support.harness import bridge_settings, decode_value, running_bridge
from tests.support.waiting import wait_for
from tests.unit.test_hostile_frames import encoded, snapshot

pytestmark = pytest.mark.integration

CONTRACTS = 6
SUBSCRIBED = 4  # of the simulator's contracts; frames of the others are unknown_contract dead letters


def _bad_frames(subscribed: str, unsubscribed: str) -> list[tuple[bytes, bool]]:
    """(payload, binary) of frames that become dead letters: invalid JSON, invalid UTF-8, wrong types, a contract
    nobody subscribed."""
    return [
        (b"{not json", False),
        (b"\x00\x01\xff\x9c", True),
        (encoded(snapshot(subscribed)).replace(b"IME Stream", b"IME \xff\xfe"), True),
        (encoded(snapshot(subscribed, BestLimit="many")), False),
        (encoded(snapshot(unsubscribed)), False),
    ]


async def _live_run(simulator: Simulator, settings: Settings, *, connections: int = 1) -> None:
    """Run a bridge until it received every frame the simulator sent, bad ones included. The simulator starts
    stalled and is released once `connections` (the bridge's and any other client's) are open, so that every
    client sees the same frames from the first."""
    simulator.stall()
    async with running_bridge(settings) as running:
        await wait_for(lambda: len(simulator.connections) >= connections, what="every client connected")
        simulator.stall(False)
        await wait_for(lambda: running.published() > 60, what="records flowing")
        contracts = simulator.contracts
        for payload, binary in _bad_frames(contracts[0].id, contracts[SUBSCRIBED].id):
            simulator.send_raw(payload, binary=binary)
        received = running.metric("ime_bridge_messages_received_total", endpoint="id")
        await wait_for(
            lambda: running.metric("ime_bridge_messages_received_total", endpoint="id") > received + 40,
            what="good frames after the bad ones",
        )
        await simulator.stall_and_settle()
        sent = max(len(simulator.sent_frames(connection_id=c.id)) for c in simulator.connections)
        await wait_for(
            lambda: running.metric("ime_bridge_messages_received_total", endpoint="id") >= sent,
            what="every frame received",
        )


def _sent(simulator: Simulator) -> list[tuple[str | None, bytes]]:
    """(contract id, or None for a fault frame; the bytes) of every frame sent, in order."""
    return [
        (frame.contract_id, frame.payload.encode() if isinstance(frame.payload, str) else frame.payload)
        for frame in simulator.sent_frames()
    ]


def _by_key(records: list[ConsumerRecord[Any, Any]]) -> dict[bytes, list[dict[str, Any]]]:
    """Each contract's update values, decoded, in order."""
    by_key: dict[bytes, list[dict[str, Any]]] = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key[record.key].append(decode_value(record))
    return dict(by_key)


def _updates_by_key(
    records: list[ConsumerRecord[Any, Any]], *, receive_times: bool
) -> dict[bytes, list[dict[str, Any]]]:
    """Each contract's update values in order, without the session id (a replay has its own), and without the
    receive time unless `receive_times`."""
    by_key = _by_key(records)
    for values in by_key.values():
        for value in values:
            assert value.pop("session_id")
            if not receive_times:
                assert value.pop("receive_time")
    return by_key


def _dead_letters(records: list[ConsumerRecord[Any, Any]], *, receive_times: bool) -> Counter[tuple[Any, ...]]:
    """Dead letters as (key, value, headers without `replay`, and without the receive time unless `receive_times`)."""
    left_out = {"replay"} if receive_times else {"replay", "receive-time-us"}
    return Counter(
        (record.key, record.value, tuple((name, value) for name, value in record.headers if name not in left_out))
        for record in records
    )


async def _read_all(broker: BrokerInfo, topic: str, count: int) -> list[ConsumerRecord[Any, Any]]:
    return await consume(broker.bootstrap_servers, topic, until=lambda records: len(records) >= count, quiet_for=1.0)


def _replay_settings(settings: Settings) -> Settings:
    """The bridge's settings with fresh topics for what the replay publishes."""
    suffix = uuid.uuid4().hex[:8]
    kafka = settings.kafka.model_copy(update={"dlq_topic": f"replayed-dead-{suffix}"})
    return settings.model_copy(update={"kafka": kafka})


async def _assert_replay_matches_live(
    broker: BrokerInfo, live: Settings, replayed: Settings, to_topic: str, frames: Any, *, receive_times: bool
) -> None:
    """Replay `frames` to `to_topic` and replayed's dead-letter topic: the same records as the live run's (the same
    receive times too when `receive_times`: when the frames are the live bridge's own capture)."""
    sink = KafkaSink(replay_kafka_settings(replayed.kafka, to_topic))
    summary = await Replay(replayed, sink).run(frames)
    assert summary.not_captured == 0
    live_updates = await _read_all(broker, live.kafka.topic, 1)
    live_dead = await _read_all(broker, live.kafka.dlq_topic, 1)
    replay_updates = await _read_all(broker, to_topic, len(live_updates))
    replay_dead = await _read_all(broker, replayed.kafka.dlq_topic, len(live_dead))
    assert len(live_dead) >= 5, "the bad frames were dead-lettered live"
    same = receive_times
    assert _dead_letters(replay_dead, receive_times=same) == _dead_letters(live_dead, receive_times=same)
    assert _updates_by_key(replay_updates, receive_times=same) == _updates_by_key(live_updates, receive_times=same)
    assert (summary.published, summary.dead_letters) == (len(live_updates), len(live_dead))
    session = summary.session_id.encode()
    assert all(dict(record.headers)["replay"] == session for record in replay_updates + replay_dead)


async def test_the_raw_topic_holds_every_frame_and_a_replay_from_it_publishes_what_the_live_run_did(
    kafka_broker: BrokerInfo,
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=150, record_sent=True)) as simulator:
        raw_topic = f"raw-{uuid.uuid4().hex[:8]}"
        ids = [contract.id for contract in simulator.contracts[:SUBSCRIBED]]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids}, kafka={"raw_topic": raw_topic})
        await _live_run(simulator, settings)
        sent = _sent(simulator)

    raw = await _read_all(kafka_broker, raw_topic, len(sent) + 1)
    captured = [CapturedFrame.of(record.key, record.value, record.headers) for record in raw]
    frames = [(record, item) for record, item in zip(raw, captured, strict=True) if item.marker is None]
    assert Counter(item.value for _, item in frames) == Counter(payload for _, payload in sent), "byte for byte"
    faults = {payload for contract, payload in sent if contract is None}
    in_order = sorted(frames, key=lambda frame: frame[0].offset)
    for contract in ids:  # per contract, in the order sent
        expected = [payload for sent_as, payload in sent if sent_as == contract]
        in_topic = [item.value for record, item in in_order if record.key == contract.encode()]
        assert [value for value in in_topic if value not in faults] == expected
    markers = [item.marker for item in captured if item.marker is not None]
    assert [marker.connection.subscription.contracts for marker in markers] == [tuple(ids)]

    replayed = _replay_settings(settings)
    to_topic = f"replayed-{uuid.uuid4().hex[:8]}"
    await _assert_replay_matches_live(
        kafka_broker, settings, replayed, to_topic, frames_from_topic(settings.kafka, raw_topic), receive_times=True
    )


async def test_a_capture_file_replayed_publishes_what_the_live_run_did(
    kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=150, record_sent=True)) as simulator:
        ids = [contract.id for contract in simulator.contracts[:SUBSCRIBED]]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids})
        capture_path = tmp_path / "capture.jsonl.zst"
        # The capture and the live bridge hold the same subscription side by side.
        stop = asyncio.Event()
        metrics = settings.metrics.model_copy(update={"port": 0})
        sink = CaptureFileSink(capture_path, max_bytes=20_000)
        capture = Bridge(settings.model_copy(update={"metrics": metrics}), sink=sink, raw_only=True)
        capturing = asyncio.create_task(capture.run(stop))
        await _live_run(simulator, settings, connections=2)
        sent = max(len(simulator.sent_frames(connection_id=c.id)) for c in simulator.connections)
        received = capture.metrics.registry.get_sample_value
        await wait_for(
            lambda: (received("ime_bridge_messages_received_total", {"endpoint": "id"}) or 0) >= sent,
            what="the capture received every frame",
        )
        stop.set()
        await capturing

    assert len(list(tmp_path.iterdir())) > 2, "rotated by size"  # noqa: ASYNC240 (a test's temporary directory)
    items = list(read_capture(capture_path))
    assert all(isinstance(item, CapturedFrame) for item in items)
    replayed = _replay_settings(settings)
    to_topic = f"replayed-{uuid.uuid4().hex[:8]}"
    frames = frames_from_file(capture_path)  # another client's: received at other times
    await _assert_replay_matches_live(kafka_broker, settings, replayed, to_topic, frames, receive_times=False)


async def test_the_simulator_plays_a_capture_file_and_the_bridge_publishes_it(
    kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    capture_path = tmp_path / "session.jsonl"
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=300)) as market:
        ids = [contract.id for contract in market.contracts[:SUBSCRIBED]]
        settings = bridge_settings(market, kafka_broker, ime={"contract_ids": ids})
        stop = asyncio.Event()
        capture = Bridge(settings, sink=CaptureFileSink(capture_path), raw_only=True)
        capturing = asyncio.create_task(capture.run(stop))
        received = capture.metrics.registry.get_sample_value
        await wait_for(
            lambda: (received("ime_bridge_messages_received_total", {"endpoint": "id"}) or 0) >= 150,
            what="150 frames captured",
        )
        stop.set()
        await capturing
    captured = [item for item in read_capture(capture_path) if isinstance(item, CapturedFrame) and not item.marker]

    async with Simulator(SimulatorConfig(replay=capture_path, replay_speed=0)) as player:
        assert [contract.id for contract in player.contracts] == ids, "the capture's contracts are the catalogue"
        settings = bridge_settings(player, kafka_broker, ime={"contract_ids": ids})
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() >= len(captured), what="every captured frame published")
    updates = await _read_all(kafka_broker, settings.kafka.topic, len(captured))
    published = {key: [value["exchange_time"] for value in values] for key, values in _by_key(updates).items()}
    expected: dict[bytes, list[datetime]] = defaultdict(list)
    for item in captured:
        timestamp = json.loads(item.value)["timestamp"]
        expected[item.key or b""].append(datetime.fromisoformat(timestamp.replace("Z", "+00:00")))
    assert published == expected, "each contract's captured snapshots, in order"
