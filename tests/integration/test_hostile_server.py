"""A hostile server, through the simulator on one live connection and a real broker: every bad frame becomes a
dead letter with its reason, every good one is published, and the connection stays open."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.support.broker import BrokerInfo, consume
from tests.support.checker import check_delivery
from tests.support.harness import bridge_settings, running_bridge
from tests.support.waiting import wait_for
from tests.unit.test_hostile_frames import HOSTILE, encoded, snapshot

pytestmark = pytest.mark.integration

CONTRACTS = 6


async def test_a_corpus_of_hostile_frames_is_dead_lettered_and_the_connection_goes_on(
    kafka_broker: BrokerInfo,
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=100, record_sent=True)) as simulator:
        subscribed = simulator.contracts[0].id
        text = [(raw.replace(b'"1001"', json.dumps(subscribed).encode()), reason.value) for _, raw, reason in HOSTILE]
        text.append((encoded(snapshot("x" * 600_000)), "unknown_contract"))
        text += [(encoded(snapshot(f"U{n}")), "unknown_contract") for n in range(300)]
        binary = [
            (encoded(snapshot(subscribed)).replace(b"IME Stream", b"IME \xff\xfe"), "invalid_utf8"),
            (b"\x00\x01\xff\x9c", "invalid_json"),
            (b"", "invalid_json"),
        ]
        corpus = text + binary
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": [c.id for c in simulator.contracts[:CONTRACTS]]}
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 50, what="records flowing")
            for raw, _ in text:
                simulator.send_raw(raw)
            for raw, _ in binary:
                simulator.send_raw(raw, binary=True)
            received_before = running.metric("ime_bridge_messages_received_total", endpoint="id")
            await wait_for(
                lambda: running.metric("ime_bridge_messages_received_total", endpoint="id") > received_before + 100,
                what="good frames after the corpus",
            )
            await simulator.stall_and_settle()
            sent = simulator.sent_frames()
            await wait_for(
                lambda: running.metric("ime_bridge_messages_received_total", endpoint="id") >= len(sent),
                what="every frame received",
            )
            assert running.metric_total("ime_bridge_reconnects_total") == 0, "the same connection stayed open"
            assert running.metric("ime_bridge_connections") == 1
            assert running.metric_total("ime_bridge_task_failures_total") == 0
            assert running.metric("ime_bridge_buffer_records") < 1000, "memory bounded"
        good = [frame for frame in sent if frame.contract_id is not None]
        expected = Counter(reason for _, reason in corpus)

        updates = await consume(
            kafka_broker.bootstrap_servers, settings.kafka.topic, until=lambda got: len(got) >= len(good)
        )
        report = check_delivery(good, updates)
        assert report.total_lost == 0, report.summary()
        assert report.unknown == 0, report.summary()
        assert sum(report.out_of_order.values()) == 0, report.summary()

        letters = await consume(
            kafka_broker.bootstrap_servers,
            settings.kafka.dlq_topic,
            until=lambda got: len(got) >= len(corpus),
        )
    got = Counter(dict(letter.headers)["reason"].decode() for letter in letters)
    assert got == expected
    for reason, count in expected.items():
        assert running.metric("ime_bridge_dead_letters_total", reason=reason) == count
