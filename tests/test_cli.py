"""The commands a person runs: demo and tail, as subprocesses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bridge import cli
from bridge.app import PublisherFailed
from bridge.config import load_settings
from bridge.devtools.broker import free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.source import SourceFatal
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


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").splitlines()[-1]


async def test_run_ends_a_fatal_start_with_one_line_and_exit_1(tmp_path: Path) -> None:
    """A schema registry client that cannot be set up (its CA file is missing) is fatal before any network."""
    config = {
        "ime": {"token": "t", "contract_ids": ["1001"]},
        "kafka": {"bootstrap_servers": [f"127.0.0.1:{free_port()}"]},
        "schema_registry": {"url": "https://127.0.0.1:1", "ssl_cafile": str(tmp_path / "missing-ca.pem")},
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = await run("run", "--config", str(path), within=60)
    assert code == cli.EXIT_FATAL == 1, err
    assert "event=sink_fatal" in err
    assert last_line(err).startswith("ime-bridge: fatal: cannot publish: cannot set up the schema registry client")
    assert "Traceback" not in err


async def test_run_with_an_unusable_spool_exits_1(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    """buffer.spool_dir under a regular file: the spool cannot be opened, the start fails after Kafka's."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    async with Simulator(SimulatorConfig(contracts=2, rate=10)) as simulator:
        config = bridge_config(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id]},
            buffer={"overflow": "spool", "spool_dir": str(blocker / "spool")},
        )
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        code, _, err = await run("run", "--config", str(path), within=90)
    assert code == cli.EXIT_FATAL == 1, err
    assert "event=spool_unusable" in err
    assert last_line(err).startswith("ime-bridge: fatal: spool unusable: cannot open the spool in ")


@pytest.fixture
def run_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[BaseException], int]:
    """`ime-bridge run` in this process with a valid config, `_run` replaced by one raising `error`."""
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)  # keep pytest's log capture
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"ime": {"token": "t", "contract_ids": ["1001"]}}))

    def run_raising(error: BaseException) -> int:
        async def failing(*args: object) -> None:
            raise error

        monkeypatch.setattr(cli, "_run", failing)
        return cli.main(["run", "--config", str(path)])

    return run_raising


def chained(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            SourceFatal("TLS verification failed for wss://ime.example/"),
            1,
            "ime-bridge: fatal: IME source: TLS verification failed for wss://ime.example/",
        ),
        (
            chained(PublisherFailed("the publisher stopped unexpectedly"), ValueError("x")),
            1,
            "ime-bridge: fatal: the publisher stopped unexpectedly (ValueError('x'))",
        ),
        (
            RuntimeError("a bug\non two lines"),
            70,
            "ime-bridge: fatal: unexpected error: RuntimeError('a bug\\non two lines')",
        ),
    ],
    ids=["source-fatal", "publisher-failed", "unexpected"],
)
def test_run_ends_each_fatal_case_with_one_line_and_its_exit_code(
    run_in_process: Callable[[BaseException], int],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    code: int,
    line: str,
) -> None:
    assert run_in_process(error) == code
    assert last_line(capsys.readouterr().err) == line
    unexpected = [record for record in caplog.records if record.getMessage() == "unexpected_error"]
    if code == cli.EXIT_SOFTWARE:
        (record,) = unexpected
        assert record.levelno == logging.CRITICAL
        assert record.exc_info is not None
        assert record.exc_info[1] is error
    else:
        assert unexpected == []


def test_run_refuses_a_bad_config_with_exit_2_and_one_final_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("ime:\n  token: t\n  contract_ids: ['1']\n  base_url: http://ime.local\n")
    assert cli.main(["run", "--config", str(path)]) == cli.EXIT_CONFIG == 2
    err = capsys.readouterr().err
    assert "ime: ime.base_url (http://) would send the password and the token in clear text" in err
    assert last_line(err).startswith("ime-bridge: fatal: invalid configuration: ime: ime.base_url (http://)")


def test_config_schema_prints_the_settings_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert "password" in schema["properties"]["ime"]["properties"]
    assert cli.main(["config", "schema", "--chart"]) == 0
    chart = json.loads(capsys.readouterr().out)
    assert "password" not in chart["properties"]["ime"]["properties"]
    assert "$schema" not in chart


def test_config_schema_write_updates_a_values_schema_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "values.schema.json"
    target.write_text('{\n  "type": "object",\n  "properties": {\n    "config": {}\n  }\n}\n', "utf-8")
    assert cli.main(["config", "schema", "--write", str(target)]) == 0
    assert "properties.config regenerated" in capsys.readouterr().out
    document = json.loads(target.read_text("utf-8"))
    assert document["type"] == "object"
    assert document["properties"]["config"]["properties"]["kafka"]["additionalProperties"] is False
    assert cli.main(["config", "schema", "--write", str(target)]) == 0
    assert "already current" in capsys.readouterr().out
    assert cli.main(["config", "schema", "--write", str(tmp_path / "missing.json")]) == 1
    assert "cannot update its properties.config" in capsys.readouterr().err


def test_config_check_is_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("ime:\n  token: t\n  contract_ids: ['1']\n", "utf-8")
    assert cli.main(["config", "check", "--config", str(path)]) == 0
    assert cli.main(["check-config", "--config", str(path)]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    assert first.startswith("configuration OK: 1 contract ids")
