"""The commands a person runs: demo, tail and check-config --connect, as subprocesses, through a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge import cli
from bridge.config import load_settings
from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.component.test_cli import run
from tests.support.broker import BrokerInfo
from tests.support.harness import bridge_config, bridge_settings, running_bridge
from tests.support.waiting import wait_for
from tests.unit.test_cli import last_line

pytestmark = pytest.mark.integration


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


async def test_tail_key_keeps_only_that_contract(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100, record_sent=True)) as simulator:
        first, second = (contract.id for contract in simulator.contracts[:2])
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [first, second]})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        async with running_bridge(load_settings(path)) as running:
            # The contracts' activity differs (one had 3 of the first 20 records): count the one tailed.
            await wait_for(lambda: len(simulator.sent_frames(contract_id=second)) >= 6 and running.published() >= 20)
        code, out, err = await run(
            "tail", "--config", str(path), "--key", second, "--max-records", "5", "--idle-timeout", "5", "--no-table"
        )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5
    assert {record["key"] for record in records} == {second}
    assert [record["value"]["sequence"] for record in records] == [1, 2, 3, 4, 5]


async def test_tail_since_starts_at_the_first_record_written_then(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    """Two bridge sessions on one topic, a moment apart: --since that moment reads exactly the second one."""
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [simulator.contracts[0].id]})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        async with running_bridge(load_settings(path)) as running:
            await wait_for(lambda: running.published() >= 3)
        await asyncio.sleep(1.0)
        between = datetime.now(UTC)
        await asyncio.sleep(1.0)
        async with running_bridge(load_settings(path)) as running:
            await wait_for(lambda: running.published() >= 3)
        second_session = running.bridge.session_id
        published = int(running.published())
    code, out, err = await run("tail", "--config", str(path), "--idle-timeout", "3", "--no-table")
    assert code == 0, err
    everything = [json.loads(line) for line in out.splitlines()]
    assert len({record["value"]["session_id"] for record in everything}) == 2
    code, out, err = await run(
        "tail", "--config", str(path), "--since", between.isoformat(), "--idle-timeout", "3", "--no-table"
    )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert {record["value"]["session_id"] for record in records} == {second_session}
    assert [record["value"]["sequence"] for record in records] == list(range(1, published + 1))


async def test_tail_dead_letters_shows_reason_detail_and_the_frame(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=20)) as simulator:
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [simulator.contracts[0].id]})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        async with running_bridge(load_settings(path)) as running:
            await wait_for(lambda: running.published() >= 1)
            assert simulator.send_garbage("wrong_types") == 1
            await wait_for(lambda: running.metric_total("ime_bridge_dead_letters_total") >= 1)
        code, out, err = await run(
            "tail", "--config", str(path), "--dead-letters", "--max-records", "1", "--idle-timeout", "5", "--no-table"
        )
        assert code == 0, err
        (record,) = [json.loads(line) for line in out.splitlines()]
        assert record["reason"] == "invalid_frame"
        assert record["detail"]
        assert record["endpoint"] == "id"
        assert record["received"].startswith(str(datetime.now(UTC).year))
        assert record["excerpt"].startswith("{")
        assert record["size"] > 0
        code, out, err = await run(
            "tail", "--config", str(path), "--dead-letters", "--max-records", "1", "--idle-timeout", "5", "--table"
        )
    assert code == 0, err
    (line,) = out.splitlines()
    assert " invalid_frame " in line
    assert f"{record['detail']} | {record['excerpt'][:40]}" in line


async def test_check_config_connect_reaches_everything(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=1)) as simulator:
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [simulator.contracts[0].id]})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        code, out, err = await run("check-config", "--config", str(path), "--connect", within=60)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[1].startswith("token endpoint ")
    assert " OK: token issued" in lines[1]
    assert lines[2].startswith(f"kafka           {kafka_broker.bootstrap_servers}  OK: connected; topics to be created")
    assert len(lines) == 3


async def test_check_config_connect_checks_the_replicas_control_topic(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    topic = f"control-{uuid.uuid4().hex[:8]}"
    async with Simulator(SimulatorConfig(contracts=2, rate=1)) as simulator:
        config = bridge_config(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id]},
            coordination={"group_id": "replicas", "topic": topic, "shards": 4},
        )
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        code, before, err = await run("check-config", "--config", str(path), "--connect", within=60)
        assert code == 0, before + err
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 3, 1)])
        finally:
            await admin.close()
        code, after, err = await run("check-config", "--config", str(path), "--connect", within=60)
    assert f"coordination    {topic}  OK: group replicas: control topic to be created at start, 4 partitions" in before
    assert code != 0, after + err
    assert (
        f"coordination    {topic}  FAILED: coordination.topic '{topic}' has 3 partitions, coordination.shards" in after
    )


async def test_demo_summarises_and_stops_in_order_on_ctrl_c() -> None:
    """Ctrl-C as a terminal sends it, to the whole foreground process group: the demo stops its consumer,
    bridge, simulator and broker in that order, and no Kafka client error reaches the screen."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "demo",
        "--contracts",
        "4",
        "--rate",
        "40",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not any(line.startswith("── ") for line in seen):  # the first summary, after 5 s
                line = (await process.stdout.readline()).decode()
                assert line, "\n".join(seen)
                seen.append(line.rstrip("\n"))
        os.killpg(process.pid, signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = seen + out.decode().splitlines()
    assert process.returncode == 0, err.decode()
    assert "waiting for Kafka: the bridge creates the topics and starts its producer ..." in lines
    summary = next(line for line in lines if line.startswith("── "))
    assert re.search(
        r"records \([\d,.]+/s, [\d,]+ in all\), dead letters 0 \(0 in all\), p99 latency [\d.]+ ms", summary
    )
    stops = [line for line in lines if line.startswith("stopping: ")]
    assert stops == [
        "stopping: consumer ...",
        "stopping: bridge (draining into Kafka) ...",
        "stopping: simulator ...",
        "stopping: broker ...",
    ]
    assert lines[-1] == "stopped: bridge, simulator and broker"
    errors = err.decode()
    for noise in ("Traceback", "KafkaConnectionError", "Unable connect", "ERROR", "error="):
        assert noise not in errors, errors
    broker_pid = int(re.search(r"\(pid (\d+)\)", "\n".join(lines)).group(1))  # type: ignore[union-attr]
    assert not pid_alive(broker_pid)


async def test_capture_then_replay_from_the_file(kafka_broker: BrokerInfo, tmp_path: Path) -> None:
    """`ime-bridge capture` until SIGTERM, then `ime-bridge replay --from-file` into a topic of its own."""
    async with Simulator(SimulatorConfig(contracts=3, rate=100)) as simulator:
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [c.id for c in simulator.contracts]})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        out = tmp_path / "capture" / "session.jsonl.zst"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "capture",
            "--config",
            str(path),
            "--out",
            str(out),
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for(lambda: out.exists() and out.stat().st_size > 20_000, what="frames captured", within=60)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    topic = f"replayed-{os.urandom(4).hex()}"
    code, stdout, err_text = await run(
        "replay", "--config", str(path), "--from-file", str(out), "--to-topic", topic, "--until", "0s"
    )
    assert code == 0, err_text
    summary = json.loads(last_line(stdout))
    assert summary["topic"] == topic
    assert summary["frames"] > 20
    assert summary["published"] == summary["frames"]
    assert summary["session_id"].startswith("replay-")
    assert (summary["not_captured"], summary["outside_window"], summary["dead_letters"]) == (0, 0, 0)
