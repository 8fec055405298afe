"""The latest-state topic: every update also goes there, compacted, so a new consumer bootstraps the market.

The semantics test does not depend on the broker actually compacting (tansu does not): compaction keeps
the newest record per key, so the newest record per key read from the beginning is the current state.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.errors import KafkaTimeoutError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from bridge.config import ConfigError, KafkaSettings, Settings, load_settings
from bridge.records import Failed, NotSent, OutgoingRecord, RecordKind
from bridge.registry import wire_prefix
from bridge.sink import KafkaSink

UPDATES, DEAD, STATE = "updates", "dead", "state"


# --- the sink's fan-out, batch by batch ---------------------------------------------------------------


class FakeProducer:
    """What KafkaSink uses of AIOKafkaProducer: sends of the sink's batches that succeed or fail per topic, and
    what each batch carried, read back from its bytes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, BatchBuilder]] = []
        self.failing: dict[str, Exception] = {}

    async def send_batch(self, batch: BatchBuilder, topic: str, partition: int) -> asyncio.Future[None]:
        # Sent closed: aiokafka would hold an open batch for its linger, and a round's batches, falling due
        # microseconds apart, would go out as two produce requests, one after the other.
        assert batch.closed(), "a round's batches are sent closed"
        self.sent.append((topic, partition, batch))
        return self.outcome(topic)

    def outcome(self, topic: str) -> asyncio.Future[None]:
        """A send's future: failed with `failing[topic]`, else acknowledged."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self.failing:
            future.set_exception(self.failing[topic])
        else:
            future.set_result(None)
        return future

    def batches(self, topic: str) -> list[BatchBuilder]:
        return [batch for sent_topic, _, batch in self.sent if sent_topic == topic]

    def records(self, topic: str) -> dict[int, list[tuple[bytes | None, bytes, dict[str, bytes]]]]:
        """Per partition of `topic`, the records its batches carried (key, value, headers), in send order."""
        found: dict[int, list[tuple[bytes | None, bytes, dict[str, bytes]]]] = {}
        for sent_topic, partition, batch in self.sent:
            if sent_topic == topic:
                for record in DefaultRecordBatch(batch._build()):
                    found.setdefault(partition, []).append((record.key, record.value, dict(record.headers)))
        return found

    def values(self, topic: str) -> list[bytes]:
        return [value for records in self.records(topic).values() for _, value, _ in records]


def kafka_sink(producer: FakeProducer, state_copies: list[int] | None = None, **settings: Any) -> KafkaSink:
    """A KafkaSink over `producer`, one partition per topic (so one batch per topic per round); the
    counts of acknowledged state-topic copies go to `state_copies`."""
    sink = KafkaSink(
        KafkaSettings(topic=UPDATES, dlq_topic=DEAD, state_topic=STATE, **settings),
        on_state_published=None if state_copies is None else state_copies.append,
    )
    sink._producer = producer  # type: ignore[assignment]
    sink._partitions = {UPDATES: 1, DEAD: 1, STATE: 1}
    return sink


def update(key: str, value: bytes) -> OutgoingRecord:
    return OutgoingRecord(RecordKind.UPDATE, key.encode(), value, [("schema", b"x")], 0.0)


def dead_letter(value: bytes) -> OutgoingRecord:
    return OutgoingRecord(
        RecordKind.DEAD_LETTER, None, value, [("reason", b"invalid_json")], 0.0, dead_letter_reason="invalid_json"
    )


@pytest.fixture
def producer() -> FakeProducer:
    return FakeProducer()


async def test_the_newest_update_of_each_contract_in_a_round_also_goes_to_the_state_topic(
    producer: FakeProducer,
) -> None:
    state_copies: list[int] = []
    sink = kafka_sink(producer, state_copies)
    records = [update("1", b"a1"), dead_letter(b"{garbage"), update("2", b"b1"), update("1", b"a2")]
    assert await sink.publish(records) == [None] * 4
    assert producer.values(UPDATES) == [b"a1", b"b1", b"a2"]  # every update
    assert producer.values(STATE) == [b"b1", b"a2"]  # the newest of each contract, in round order
    assert producer.values(DEAD) == [b"{garbage"]
    await sink.publish([update("2", b"b2")])
    assert producer.values(STATE) == [b"b1", b"a2", b"b2"]
    assert state_copies == [2, 1]  # what the state topic acknowledged, per round


async def test_with_a_registry_update_values_are_framed_and_dead_letters_are_not(producer: FakeProducer) -> None:
    sink = kafka_sink(producer)
    sink._updates_prefix, sink._state_prefix = wire_prefix(3), wire_prefix(4)
    await sink.publish([update("1", b"body"), dead_letter(b"raw frame")])
    assert producer.values(UPDATES) == [wire_prefix(3) + b"body"]
    assert producer.values(STATE) == [wire_prefix(4) + b"body"]
    assert producer.values(DEAD) == [b"raw frame"]


async def test_an_update_copied_to_the_state_topic_is_delivered_only_when_both_acknowledged_it(
    producer: FakeProducer,
) -> None:
    state_copies: list[int] = []
    sink = kafka_sink(producer, state_copies)
    producer.failing[STATE] = KafkaTimeoutError()
    outcomes = await sink.publish([update("1", b"a1"), update("1", b"a2"), dead_letter(b"x")])
    assert outcomes[0] is None  # superseded within the round: the updates topic is all it needs
    assert outcomes[1] == Failed("KafkaTimeoutError")  # acknowledged by the updates topic only: sent again
    assert outcomes[2] is None
    assert producer.values(UPDATES) == [b"a1", b"a2"]
    assert state_copies == []  # nothing acknowledged there


async def test_what_does_not_fit_the_state_batch_goes_to_neither_topic_this_round() -> None:
    """The state topic with fewer partitions than the updates topic: its one batch fills first."""
    producer = FakeProducer()
    sink = kafka_sink(producer, max_batch_bytes=1024)
    sink._partitions = {UPDATES: 4, DEAD: 1, STATE: 1}
    records = [update(str(n), bytes([n]) * 250) for n in range(8)]  # eight contracts, one update each
    outcomes = await sink.publish(records)
    sent = [record.value for record, outcome in zip(records, outcomes, strict=True) if outcome is None]
    assert records[0].value in sent
    assert len(sent) < len(records)
    assert all(isinstance(outcome, NotSent) for outcome in outcomes if outcome is not None)
    assert sorted(producer.values(UPDATES)) == sorted(producer.values(STATE)) == sorted(sent)


async def test_without_the_state_topic_updates_go_only_to_the_updates_topic(producer: FakeProducer) -> None:
    sink = kafka_sink(producer, state_topic_enabled=False)
    assert await sink.publish([update("1", b"a1")]) == [None]
    assert producer.values(UPDATES) == [b"a1"]
    assert producer.values(STATE) == []


# --- configuration ------------------------------------------------------------------------------------


def load(tmp_path: Path, kafka: dict[str, Any]) -> Settings:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"ime": {"token": "t", "contract_ids": ["1"]}, "kafka": kafka}))
    return load_settings(path)


@pytest.mark.parametrize("clash", ["topic", "dlq_topic"])
def test_the_state_topic_must_be_its_own(tmp_path: Path, clash: str) -> None:
    kafka = {"topic": "u", "dlq_topic": "d"}
    with pytest.raises(ConfigError, match=r"kafka\.state_topic must differ from kafka\.topic and kafka\.dlq_topic"):
        load(tmp_path, {**kafka, "state_topic": kafka[clash]})
    disabled = load(tmp_path, {**kafka, "state_topic": kafka[clash], "state_topic_enabled": False})
    assert not disabled.kafka.state_topic_enabled  # unused, so it may be anything


def test_the_state_topic_is_on_by_default() -> None:
    kafka = KafkaSettings()
    assert (kafka.state_topic, kafka.state_topic_enabled) == ("ime.contract.state", True)
