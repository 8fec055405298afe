"""The latest-state topic: every update also goes there, compacted, so a new consumer bootstraps the market.

The semantics test does not depend on the broker actually compacting (tansu does not): compaction keeps
the newest record per key, so the newest record per key read from the beginning is the current state.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.integration.test_end_to_end import assert_matches_frame
from tests.support.broker import BrokerInfo, consume
from tests.support.harness import bridge_settings, decode_value, frame_json, running_bridge
from tests.support.waiting import wait_for


@pytest.mark.integration
async def test_a_consumer_reading_the_state_topic_from_the_start_reconstructs_the_last_market(
    kafka_broker: BrokerInfo,
) -> None:
    async with Simulator(SimulatorConfig(contracts=6, rate=300, record_sent=True)) as simulator:
        contracts = simulator.contracts[:6]
        state_topic = f"state-{uuid.uuid4().hex[:8]}"
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": [c.id for c in contracts]}, kafka={"state_topic": state_topic}
        )
        async with running_bridge(settings) as running:
            await wait_for(
                lambda: (
                    running.published() >= 60
                    and all(simulator.sent_frames(contract_id=contract.id) for contract in contracts)
                ),
                what="a few snapshots, at least one of every contract (the market picks contracts by liquidity)",
            )
            await simulator.stall_and_settle()  # the market stops moving: what it sent last is the state to reconstruct
            await wait_for(
                lambda: running.published() == simulator.counters.frames_sent, what="every snapshot sent acknowledged"
            )
        newest_sequence = {c.id.encode(): len(simulator.sent_frames(contract_id=c.id)) for c in contracts}

        def every_newest_read(got: list[ConsumerRecord[Any, Any]]) -> bool:
            read = {(record.key, decode_value(record)["sequence"]) for record in got}
            return all((key, sequence) in read for key, sequence in newest_sequence.items())

        def newest_read_and_wanted(got: list[ConsumerRecord[Any, Any]]) -> str:
            read: dict[bytes, list[int]] = {}
            for record in got:
                read.setdefault(record.key, []).append(decode_value(record)["sequence"])
            return f"{len(got)} records; read per contract {read}; wanted newest {newest_sequence}"

        records = await consume(
            kafka_broker.bootstrap_servers, state_topic, until=every_newest_read, describe=newest_read_and_wanted
        )

        assert len(records) < simulator.counters.frames_sent  # only the newest of each contract per round
        assert running.metric("ime_bridge_state_records_published_total") == len(records)
        current: dict[bytes, dict[str, Any]] = {}  # what compaction keeps: the newest record per key
        sequences: dict[bytes, list[int]] = {}
        for record in records:
            value = decode_value(record)
            current[record.key] = value
            sequences.setdefault(record.key, []).append(value["sequence"])
        assert set(current) == set(newest_sequence)  # exactly one current record per contract
        for contract in contracts:
            frames = simulator.sent_frames(contract_id=contract.id)
            latest = current[contract.id.encode()]
            assert latest["contract_id"] == contract.id
            assert latest["sequence"] == len(frames)  # the newest, not merely a recent one
            assert_matches_frame(latest, frame_json(frames[-1].payload))
            assert sequences[contract.id.encode()] == sorted(sequences[contract.id.encode()])  # in order

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
        await admin.start()
        try:
            (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, state_topic)])
            entries = {entry[0]: entry[1] for entry in described.resources[0][4]}
            assert entries["cleanup.policy"] == "compact"
        finally:
            await admin.close()


@pytest.mark.integration
async def test_with_the_state_topic_disabled_nothing_goes_there(kafka_broker: BrokerInfo) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        state_topic = f"state-{uuid.uuid4().hex[:8]}"
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id]},
            kafka={"state_topic": state_topic, "state_topic_enabled": False},
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() >= 5)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
        await admin.start()
        try:
            topics = await admin.list_topics()
        finally:
            await admin.close()
        assert settings.kafka.topic in topics
        assert state_topic not in topics
