"""The commands a person runs: demo and tail, as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from bridge.broker import free_port
from bridge.config import load_settings
from bridge.simulator import Simulator, SimulatorConfig
from tests.conftest import BrokerInfo, wait_for
from tests.harness import bridge_config, bridge_settings, running_bridge

pytestmark = pytest.mark.integration


async def run(*args: str, within: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_demo_shows_records_from_both_endpoints_and_leaves_no_broker_behind() -> None:
    code, out, err = await run("demo", "--duration", "6", "--contracts", "4", "--rate", "40")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("key=")]
    assert len(lines) >= 10, out
    assert any(" via ID " in line for line in lines)
    assert any(" via NAME " in line for line in lines)
    assert all(re.match(r"key=\d+ ", line) for line in lines), "every key is a contract id"
    assert "metrics    http://127.0.0.1:" in out
    broker_pid = int(re.search(r"\(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    assert not pid_alive(broker_pid)
    assert "stopped: bridge, simulator and broker" in out


async def test_tail_prints_decoded_records_as_json_lines(kafka_broker: BrokerInfo) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": [simulator.contracts[0].id]})
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() >= 5)
        code, out, err = await run(
            "tail",
            "--bootstrap-servers",
            kafka_broker.bootstrap_servers,
            "--topic",
            settings.kafka.topic,
            "--max-records",
            "5",
            "--no-table",
        )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5
    assert {record["key"] for record in records} == {simulator.contracts[0].id}
    assert [record["value"]["sequence"] for record in records] == [1, 2, 3, 4, 5]
    assert records[0]["headers"]["schema"] == "ir.ime.bridge.ContractUpdate"


async def test_tail_with_the_bridge_config_uses_its_connection_and_topic(
    kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [simulator.contracts[0].id]})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        async with running_bridge(load_settings(path)) as running:
            await wait_for(lambda: running.published() >= 3)
        code, out, err = await run("tail", "--config", str(path), "--max-records", "3", "--no-table")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["value"]["sequence"] for record in records] == [1, 2, 3]
    assert {record["key"] for record in records} == {simulator.contracts[0].id}


async def test_tail_says_why_when_kafka_cannot_be_reached() -> None:
    code, out, err = await run("tail", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--max-records", "1")
    assert code == 1
    assert "ime-bridge tail:" in err
    assert "KafkaConnectionError" in err
    assert out == ""
