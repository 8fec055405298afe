"""The whole path: simulator WebSocket → bridge → real Kafka-protocol broker → consumer decoding Avro."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.support.broker import BrokerInfo, consume
from tests.support.harness import bridge_settings, decode_value, frame_json, running_bridge
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def by_key(records: list[ConsumerRecord[Any, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        grouped[record.key.decode()].append(decode_value(record))
    return grouped


def exchange_moment(timestamp: str) -> datetime:
    """An upstream timestamp as the bridge reads it: zone-less ones in UTC (the default naive zone)."""
    parsed = datetime.fromisoformat(timestamp)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def assert_matches_frame(value: dict[str, Any], frame: dict[str, Any]) -> None:
    """A decoded record carries exactly what the simulator's frame said."""
    data = frame["data"]
    assert value["channel"] == frame["channel"]
    assert value["exchange_time"] == exchange_moment(frame["timestamp"])
    levels = {str(level["level"]): level for level in value["best_limit"]}
    assert set(levels) == set(data["BestLimit"])
    for key, wire in data["BestLimit"].items():
        assert levels[key]["buy_quantity"] == wire["buy_quantity"]
        assert levels[key]["buy_price"] == wire["buy_price"]
        assert levels[key]["sell_quantity"] == wire["sell_quantity"]
        assert levels[key]["sell_price"] == wire["sell_price"]
    aggregate = value["aggregate"]
    for field in ("trade_count", "total_volume", "total_value", "last_price", "high_price", "previous_close"):
        assert aggregate[field] == data["Aggregate"][field]
    if data["Aggregate"]["date"]:
        assert aggregate["trade_date"].isoformat() == data["Aggregate"]["date"]
    else:
        assert aggregate["trade_date"] is None
    assert value["allowed_price_range"] == {
        "min_price": data["AllowedPriceRange"]["minAllowedPrice"],
        "max_price": data["AllowedPriceRange"]["maxAllowedPrice"],
    }
    assert value["contract_info"] == {
        "open_interest": data["ContractInfo"]["open_interest"],
        "open_interest_change": data["ContractInfo"]["open_interest_changes"],
    }


@pytest.mark.parametrize("dialect", ["ht", "legacy"])
async def test_records_are_keyed_by_contract_id_from_both_endpoints_and_match_the_frames_sent(
    kafka_broker: BrokerInfo, dialect: str
) -> None:
    config = SimulatorConfig(contracts=8, rate=400, dialect=dialect, record_sent=True)  # type: ignore[arg-type]
    async with Simulator(config) as simulator:
        contracts = simulator.contracts[:8]
        by_id, by_name = contracts[:4], contracts[4:]
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [c.id for c in by_id], "contract_names": [c.name for c in by_name]},
        )
        async with running_bridge(settings):
            records = await consume(
                kafka_broker.bootstrap_servers,
                settings.kafka.topic,
                until=lambda got: all(len(by_key(got).get(c.id, [])) >= 5 for c in contracts),
            )

        grouped = by_key(records)
        assert set(grouped) == {c.id for c in contracts}
        for contract in contracts:
            values = grouped[contract.id]
            endpoint = "ID" if contract in by_id else "NAME"
            assert {value["endpoint"] for value in values} == {endpoint}
            assert {value["contract_id"] for value in values} == {contract.id}
            assert {value["contract_name"] for value in values} == {contract.name}
            # Per-contract order, end to end: sequence numbers 1, 2, 3, ... with no gap.
            assert [value["sequence"] for value in values] == list(range(1, len(values) + 1))
            sent = [frame_json(f.payload) for f in simulator.sent_frames(contract_id=contract.id)]
            identifier = ("contractId" if dialect == "ht" else "ContractId") if endpoint == "ID" else "contractName"
            assert all(identifier in frame for frame in sent)
            assert all(frame["timestamp"].endswith("Z") == (dialect == "ht") for frame in sent)
            for value, frame in zip(values, sent, strict=False):
                assert_matches_frame(value, frame)
        assert len({value["session_id"] for values in grouped.values() for value in values}) == 1


async def test_garbage_frames_go_to_the_dead_letter_topic_and_valid_contracts_keep_flowing(
    kafka_broker: BrokerInfo,
) -> None:
    async with Simulator(SimulatorConfig(contracts=4, rate=100, record_sent=True)) as simulator:
        ids = [c.id for c in simulator.contracts[:4]]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids})
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 0)
            assert simulator.send_garbage("text") >= 1
            assert simulator.send_garbage("missing_fields") >= 1
            assert simulator.send_garbage("wrong_types") >= 1
            dead = await consume(
                kafka_broker.bootstrap_servers, settings.kafka.dlq_topic, until=lambda got: len(got) >= 3
            )
            published_before = running.published()
            await wait_for(
                lambda: running.published() > published_before + 20,
                what="updates still flowing after the garbage",
            )
        reasons = sorted(dict(record.headers)["reason"].decode() for record in dead)
        assert reasons == ["invalid_frame", "invalid_frame", "invalid_json"]
        garbage_sent = [f.payload for f in simulator.sent_frames() if f.contract_id is None]
        assert sorted(record.value for record in dead) == sorted(
            p if isinstance(p, bytes) else p.encode() for p in garbage_sent
        )
        for record in dead:
            headers = dict(record.headers)
            assert headers["detail"]
            assert headers["endpoint"] == b"id"
            assert headers["connection"].startswith(b"id-0/")
        assert running.metric("ime_bridge_messages_rejected_total", reason="invalid_json") == 1
        assert running.metric("ime_bridge_dead_letters_total", reason="invalid_frame") == 2


async def test_readiness_metrics_and_an_unresolvable_name(kafka_broker: BrokerInfo) -> None:
    async with Simulator(SimulatorConfig(contracts=4, rate=50)) as simulator:
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id], "contract_names": ["NO-SUCH-CONTRACT"]},
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.bridge.readiness()[0], what="ready")
            status, body = await running.get("/readyz")
            assert status == 200
            assert json.loads(body)["connections"]["id-0"]["up"] is True
            assert "name-0" not in json.loads(body)["connections"]
            await wait_for(lambda: running.published() > 3)
            status, text = await running.get("/metrics")
            assert status == 200
            for name in (
                "ime_bridge_messages_received_total",
                "ime_bridge_messages_published_total",
                "ime_bridge_exchange_lag_seconds_bucket",
                "ime_bridge_publish_latency_seconds_bucket",
                'ime_bridge_connection_up{connection="id-0",endpoint="id"} 1.0',
                "process_cpu_seconds_total",
            ):
                assert name in text
            assert (await running.get("/healthz"))[0] == 200
        assert running.metric("ime_bridge_undelivered_at_shutdown") == 0
