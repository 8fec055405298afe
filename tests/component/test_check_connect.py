"""`ime-bridge check-config --connect` (and `config check --connect`) as a subprocess: the simulator's token
endpoint in this process, Kafka on a closed port, the schema registry double or a closed port. Each service
gets its own report line, OK or the error, and any failure makes the exit code 1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.devtools.broker import free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.component.test_cli import run
from tests.support.broker import BrokerInfo
from tests.support.harness import bridge_config
from tests.support.schema_registry_double import SchemaRegistryDouble


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(contracts=2, rate=1)) as running:
        yield running


def write_config(tmp_path: Path, simulator: Simulator, bootstrap_servers: str, **sections: Any) -> Path:
    broker = BrokerInfo(bootstrap_servers=bootstrap_servers, kind="closed port", supports_idempotence=False)
    document = bridge_config(simulator, broker, **sections)
    document["ime"]["contract_ids"] = [simulator.contracts[0].id]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def service(out: str, name: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(f"{name} ")]
    return line


@pytest.mark.parametrize("command", [["check-config"], ["config", "check"]])
async def test_token_endpoint_ok_and_kafka_refused(tmp_path: Path, simulator: Simulator, command: list[str]) -> None:
    closed = f"127.0.0.1:{free_port()}"
    path = write_config(tmp_path, simulator, closed)
    code, out, err = await run(*command, "--config", str(path), "--connect", "--timeout", "20", within=60)
    assert code == 1, out + err
    token = service(out, "token endpoint")
    assert f"{simulator.base_url}/auth/user/token/issue  OK: token issued, valid until " in token
    kafka = service(out, "kafka")
    assert f"{closed}  FAILED: " in kafka
    assert "schema registry" not in out  # not configured: not tried
    assert simulator.config.password not in out + err


async def test_every_failure_is_reported_with_its_reason(tmp_path: Path, simulator: Simulator) -> None:
    closed_kafka, closed_registry = free_port(), free_port()
    path = write_config(
        tmp_path,
        simulator,
        f"127.0.0.1:{closed_kafka}",
        ime={"password": "wrong-password"},
        schema_registry={"url": f"http://127.0.0.1:{closed_registry}", "timeout_seconds": 3},
    )
    code, out, err = await run("check-config", "--config", str(path), "--connect", "--timeout", "20", within=60)
    assert code == 1, out + err
    assert "FAILED: token endpoint refused the credentials (HTTP 401)" in service(out, "token endpoint")
    assert "wrong-password" not in out + err
    assert "FAILED: " in service(out, "kafka")
    registry = service(out, "schema registry")
    assert f"http://127.0.0.1:{closed_registry}  FAILED: schema registry http://127.0.0.1:{closed_registry}" in registry
    assert "unavailable (listing the subjects, 1 attempts)" in registry


async def test_a_registry_that_answers_is_ok(tmp_path: Path, simulator: Simulator) -> None:
    async with SchemaRegistryDouble(username="bridge", password="sr-secret") as registry:
        path = write_config(
            tmp_path,
            simulator,
            f"127.0.0.1:{free_port()}",
            ime={"token": "static-token", "username": None, "password": None},
            schema_registry={"url": registry.url, "username": "bridge", "password": "sr-secret"},
        )
        code, out, err = await run("check-config", "--config", str(path), "--connect", within=60)
        assert ("GET", "/subjects") in registry.requests
    assert code == 1, out + err  # Kafka is still a closed port
    assert service(out, "schema registry").endswith(f"{registry.url}  OK: 0 subjects")
    assert service(out, "token endpoint").endswith("OK: not tried: ime.token is a static token")


async def test_wrong_registry_credentials_fail(tmp_path: Path, simulator: Simulator) -> None:
    async with SchemaRegistryDouble(username="bridge", password="sr-secret") as registry:
        path = write_config(
            tmp_path,
            simulator,
            f"127.0.0.1:{free_port()}",
            schema_registry={"url": registry.url, "username": "bridge", "password": "not-it"},
        )
        code, out, _ = await run("check-config", "--config", str(path), "--connect", within=60)
    assert code == 1
    assert "FAILED: the schema registry" in service(out, "schema registry")
    assert "refused the credentials" in service(out, "schema registry")
