"""Running a real bridge against the simulator and the session broker, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiokafka import ConsumerRecord
from fastavro import schemaless_reader
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import Bridge
from bridge.config import ImeSettings, Settings
from bridge.devtools.broker import free_port
from bridge.devtools.simulator import Simulator
from bridge.encode import load_schema
from tests.support.broker import BrokerInfo

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

    def metric_total(self, name: str) -> float:
        """The sum of a metric over all its label sets."""
        return sum(
            sample.value
            for family in self.bridge.metrics.registry.collect()
            for sample in family.samples
            if sample.name == name
        )

    def published(self) -> float:
        """Records Kafka acknowledged on the updates topic so far."""
        return self.metric("ime_bridge_messages_published_total", topic=self.settings.kafka.topic)

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(self.metrics_url + path) as response:
            return response.status, await response.text()


def ime_settings(base_url: str, **overrides: Any) -> ImeSettings:
    """The ime section for a service at `base_url` (the simulator's, or a stand-in), with the simulator's default
    account and one contract; `overrides` replace any key."""
    return ImeSettings.model_validate(
        {
            "base_url": base_url,
            "ws_url": base_url.replace("http", "ws", 1),
            "allow_insecure": True,
            "username": "demo",
            "password": "demo-password",
            "contract_ids": ["1001"],
            **overrides,
        }
    )


def bridge_settings(simulator: Simulator, broker: BrokerInfo, **sections: dict[str, Any]) -> Settings:
    """Settings pointing at `simulator` and `broker`, on fresh topics; `sections` override per section."""
    return Settings(**bridge_config(simulator, broker, **sections))


def bridge_config(simulator: Simulator, broker: BrokerInfo, **sections: dict[str, Any]) -> dict[str, Any]:
    """The configuration document of bridge_settings, for a bridge run as a process from a YAML file."""
    suffix = uuid.uuid4().hex[:8]
    document: dict[str, Any] = {
        "ime": {
            "base_url": simulator.base_url,
            "ws_url": simulator.ws_url,
            "allow_insecure": True,
            "username": simulator.config.username,
            "password": simulator.config.password,
            "reconnect_min_seconds": 0.05,
            "reconnect_max_seconds": 1.0,
        },
        "kafka": {
            "bootstrap_servers": [broker.bootstrap_servers],
            "topic": f"updates-{suffix}",
            "dlq_topic": f"dead-{suffix}",
            "state_topic": f"state-{suffix}",
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
    return document


class BridgeProcess:
    """`ime-bridge run` as a child process, for tests that signal or kill it; stopped by its PID."""

    def __init__(self, config: dict[str, Any], directory: Path) -> None:
        self.config = config
        self.config_path = directory / f"bridge-{uuid.uuid4().hex[:6]}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.config_path.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start the process; `preexec_fn` runs in the child before exec (e.g. to set resource limits)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                preexec_fn=preexec_fn,
            )

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config['metrics']['port']}/metrics"

    async def metric(self, name: str, **labels: str) -> float:
        """A sample from the process's /metrics (0 when absent or not yet serving)."""
        try:
            async with aiohttp.ClientSession() as session, session.get(self.metrics_url) as response:
                text = await response.text()
        except aiohttp.ClientError:
            return 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Terminate (if still running) and reap the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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
