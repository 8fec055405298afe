"""The commands a person runs: demo and tail, as subprocesses."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import yaml

from bridge import cli
from bridge.devtools.broker import free_port
from tests.unit.test_cli import last_line


async def run(*args: str, within: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_tail_says_why_when_kafka_cannot_be_reached() -> None:
    code, out, err = await run("tail", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--max-records", "1")
    assert code == 1
    assert "ime-bridge tail:" in err
    assert "KafkaConnectionError" in err
    assert out == ""


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
