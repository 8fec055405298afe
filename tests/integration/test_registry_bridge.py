"""A bridge with a schema registry, through the session broker and the registry test double.

What a downstream team runs is the reference here: confluent-kafka's own `SchemaRegistryClient` and
`AvroDeserializer` decode the records, exactly as a Python consumer configured per docs/consumers.md.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import schemaless_reader

from bridge.app import Bridge
from bridge.config import KafkaSettings, SchemaRegistrySettings
from bridge.devtools.broker import free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.registry import SchemaRejected, split_framed, value_subject
from bridge.tail import Decoded, tail
from tests.component.test_registry import incompatible_update_schema
from tests.integration.test_end_to_end import assert_matches_frame
from tests.support.broker import BrokerInfo, consume
from tests.support.harness import SCHEMA, BridgeProcess, bridge_config, bridge_settings, frame_json, running_bridge
from tests.support.schema_registry_double import SchemaRegistryDouble
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def fresh_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def deserialize_all(registry_url: str, topic: str, records: list[ConsumerRecord[Any, Any]]) -> list[dict[str, Any]]:
    """Values decoded by confluent-kafka's AvroDeserializer, the reference reader of the wire format."""
    client = SchemaRegistryClient({"url": registry_url})
    try:
        deserializer = AvroDeserializer(client)
        context = SerializationContext(topic, MessageField.VALUE)
        return [deserializer(record.value, context) for record in records]
    finally:
        client.close()


async def test_records_are_framed_and_decoded_by_confluent_avro_deserializer(kafka_broker: BrokerInfo) -> None:
    config = SimulatorConfig(contracts=4, rate=200, record_sent=True)
    async with Simulator(config) as simulator, SchemaRegistryDouble() as registry:
        contracts = simulator.contracts[:4]
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [c.id for c in contracts]},
            kafka={"state_topic": fresh_topic("state")},
            schema_registry={"url": registry.url},
        )
        topic, state_topic = settings.kafka.topic, settings.kafka.state_topic
        async with running_bridge(settings) as running:
            records = await consume(
                kafka_broker.bootstrap_servers,
                topic,
                until=lambda got: all(sum(r.key == c.id.encode() for r in got) >= 5 for c in contracts),
            )
            assert simulator.send_garbage("text") >= 1
            dead = await consume(
                kafka_broker.bootstrap_servers, settings.kafka.dlq_topic, until=lambda got: len(got) > 0
            )
            state = await consume(kafka_broker.bootstrap_servers, state_topic, until=lambda got: len(got) >= 4)
            await wait_for(lambda: running.bridge.readiness()[0], what="ready")

        # Both value subjects were registered once, at start, under the topic-name strategy.
        assert set(registry.subjects) == {value_subject(topic), value_subject(state_topic)}
        (schema_id,) = registry.subjects[value_subject(topic)]
        assert registry.subjects[value_subject(state_topic)] == [schema_id]
        assert json.loads(registry.schemas[schema_id - 1]) == SCHEMA.definition
        assert registry.registrations() == 2

        values = await asyncio.to_thread(deserialize_all, registry.url, topic, records)
        by_contract: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record, value in zip(records, values, strict=True):
            framed = split_framed(record.value)
            assert framed is not None
            assert framed[0] == schema_id
            body_value = schemaless_reader(io.BytesIO(framed[1]), SCHEMA.parsed, SCHEMA.parsed)
            assert value == body_value  # the body is exactly the plain Avro record
            headers = dict(record.headers)
            assert headers["schema"] == SCHEMA.name.encode()  # the headers stay, also when framed
            assert headers["schema-fingerprint"] == SCHEMA.fingerprint.encode()
            assert record.key == value["contract_id"].encode()
            by_contract[value["contract_id"]].append(value)
        for contract in contracts:
            got = by_contract[contract.id]
            assert [value["sequence"] for value in got] == list(range(1, len(got) + 1))
            sent = [frame_json(f.payload) for f in simulator.sent_frames(contract_id=contract.id)]
            for value, frame in zip(got, sent, strict=False):
                assert_matches_frame(value, frame)

        state_values = await asyncio.to_thread(deserialize_all, registry.url, state_topic, state)
        assert all(split_framed(record.value) is not None for record in state)
        assert all(value["contract_id"] in by_contract for value in state_values)

        # Dead letters are the raw frames, never framed.
        garbage = [f.payload for f in simulator.sent_frames() if f.contract_id is None]
        assert [record.value for record in dead] == [p if isinstance(p, bytes) else p.encode() for p in garbage]

        # `ime-bridge tail` decodes the framed records, with the registry and, by the headers, without it.
        reference = {(record.partition, record.offset): value for record, value in zip(records, values, strict=True)}
        for registry_settings in (SchemaRegistrySettings.model_validate({"url": registry.url}), None):
            seen: list[Decoded] = []
            read = await tail(
                KafkaSettings(bootstrap_servers=[kafka_broker.bootstrap_servers]),
                topic,
                max_records=len(records),
                out=None,
                on_record=seen.append,
                schema_registry=registry_settings,
            )
            assert read == len(seen) == len(records)
            assert {decoded["schema_id"] for decoded in seen} == {schema_id}
            # tail reads the partitions in its own interleaving: compare record by record where both read it.
            compared = [
                (d["value"], reference[d["partition"], d["offset"]])
                for d in seen
                if (d["partition"], d["offset"]) in reference
            ]
            assert len(compared) >= len(records) // 2
            assert all(mine == theirs for mine, theirs in compared)


async def test_a_registry_down_at_start_delays_readiness_and_is_retried(kafka_broker: BrokerInfo) -> None:
    """The registry's port hangs up on every request until the double starts there: not ready meanwhile."""
    port = free_port()
    attempts = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    down = await asyncio.start_server(hang_up, "127.0.0.1", port)
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id]},
            kafka={"state_topic_enabled": False},
            schema_registry={"url": f"http://127.0.0.1:{port}", "retries": 0, "timeout_seconds": 2},
        )
        async with running_bridge(settings) as running:
            try:
                await wait_for(lambda: attempts >= 2, what="the start retried after the registry hung up")
                assert not running.bridge.readiness()[0]
                assert (await running.get("/readyz"))[0] == 503
                assert running.published() == 0
            finally:
                down.close()
                await down.wait_closed()
            async with SchemaRegistryDouble(port=port) as registry:
                await wait_for(lambda: running.bridge.readiness()[0], what="ready once the registry answers")
                records = await consume(
                    kafka_broker.bootstrap_servers, settings.kafka.topic, until=lambda got: len(got) > 0
                )
        (schema_id,) = registry.subjects[value_subject(settings.kafka.topic)]
        assert [split_framed(record.value) is not None for record in records] == [True] * len(records)
        assert {framed[0] for record in records if (framed := split_framed(record.value))} == {schema_id}


async def test_a_registry_that_rejects_the_schema_stops_the_start(kafka_broker: BrokerInfo) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator, SchemaRegistryDouble() as registry:
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id]},
            schema_registry={"url": registry.url, "retries": 3},
        )
        subject = value_subject(settings.kafka.topic)
        registry.compatibility = "BACKWARD_TRANSITIVE"
        registry.register(subject, incompatible_update_schema())
        bridge = Bridge(settings)
        with pytest.raises(SchemaRejected) as rejected:
            await asyncio.wait_for(bridge.run(asyncio.Event()), timeout=30)
        assert rejected.value.subject == subject
        assert "incompatible" in rejected.value.reason
        assert registry.registrations() == 1
        assert not bridge.readiness()[0]
        # The schema is registered before anything touches Kafka: the topics were not even created.
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
        await admin.start()
        try:
            assert settings.kafka.topic not in await admin.list_topics()
        finally:
            await admin.close()


async def test_the_process_exits_non_zero_naming_the_subject_and_the_reason(
    kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=10)) as simulator, SchemaRegistryDouble() as registry:
        config = bridge_config(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id]},
            schema_registry={"url": registry.url},
        )
        subject = value_subject(config["kafka"]["topic"])
        registry.compatibility = "BACKWARD_TRANSITIVE"
        registry.register(subject, incompatible_update_schema())
        process = BridgeProcess(config, tmp_path)
        process.start()
        try:
            assert process.process is not None
            code = await asyncio.to_thread(process.process.wait, 60)
        finally:
            process.stop()
        assert code != 0
        log = process.log()
        assert f"refused the schema for subject {subject!r}" in log
        assert "incompatible" in log
