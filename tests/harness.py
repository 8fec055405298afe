"""Running a real bridge against the simulator and the session broker, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiokafka import ConsumerRecord
from fastavro import schemaless_reader

from bridge.app import Bridge
from bridge.broker import free_port
from bridge.config import Settings
from bridge.encode import load_schema
from bridge.simulator import Simulator
from tests.conftest import BrokerInfo

SCHEMA = load_schema()


@dataclass
class RunningBridge:
    """A bridge running in this event loop, with what tests need to look at it."""

    bridge: Bridge
    settings: Settings
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.metrics.port}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.bridge.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def published(self) -> float:
        """Records Kafka acknowledged on the updates topic so far."""
        return self.metric("ime_bridge_messages_published_total", topic=self.settings.kafka.topic)

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(self.metrics_url + path) as response:
            return response.status, await response.text()


def bridge_settings(simulator: Simulator, broker: BrokerInfo, **sections: dict[str, Any]) -> Settings:
    """Settings pointing at `simulator` and `broker`, on fresh topics; `sections` override per section."""
    suffix = uuid.uuid4().hex[:8]
    document: dict[str, Any] = {
        "ime": {
            "base_url": simulator.base_url,
            "ws_url": simulator.ws_url,
            "username": simulator.config.username,
            "password": simulator.config.password,
            "reconnect_min_seconds": 0.05,
            "reconnect_max_seconds": 1.0,
        },
        "kafka": {
            "bootstrap_servers": [broker.bootstrap_servers],
            "topic": f"updates-{suffix}",
            "dlq_topic": f"dead-{suffix}",
            "partitions": 3,
            "replication_factor": 1,
            "enable_idempotence": broker.supports_idempotence,
            "linger_ms": 2,
        },
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "shutdown_timeout_seconds": 15,
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values} if isinstance(values, dict) else values
    return Settings(**document)


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[RunningBridge]:
    """Run a bridge until the block ends, then stop it in order and re-raise anything it raised."""
    stop = asyncio.Event()
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run(stop))
    running = RunningBridge(bridge, settings, stop, task)
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=settings.shutdown_timeout_seconds + 10)


def decode_value(record: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    """A record's Avro value, decoded with the schema in schemas/ by fastavro (the reference reader)."""
    assert dict(record.headers)["schema"] == SCHEMA.name.encode()
    value = schemaless_reader(io.BytesIO(record.value), SCHEMA.parsed, SCHEMA.parsed)
    assert isinstance(value, dict)
    return value


def frame_json(payload: str | bytes) -> dict[str, Any]:
    """A frame the simulator sent, parsed."""
    parsed = json.loads(payload)
    assert isinstance(parsed, dict)
    return parsed
