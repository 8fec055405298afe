"""`pip install .` without the `registry` extra, in a fresh virtual environment: the bridge runs without
confluent-kafka when no registry is configured, and says what to install when one is.

Slow (tens of seconds: pip installs the dependencies from the package index into an empty venv), so it is
marked `slow`, but it stays in the suite: it is the only test that runs the bridge as a user who did not ask
for the extra would. The worktree's sources are copied first, so pip's build leaves no files in the checkout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bridge.devtools.broker import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _environment() -> dict[str, str]:
    """This environment without the test venv's traces (a child must use only the venv it is given)."""
    return {
        name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with `pip install <a copy of this project>`, no extra."""
    base = tmp_path_factory.mktemp("install")
    source, venv = base / "source", base / "venv"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for tree in ("bridge", "schemas"):
        shutil.copytree(ROOT / tree, source / tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=900,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def config(tmp_path: Path, **sections: object) -> Path:
    """A valid config whose IME service and Kafka are closed loopback ports: the bridge starts and waits."""
    document = {
        "ime": {
            "base_url": f"http://127.0.0.1:{free_port()}",
            "ws_url": f"ws://127.0.0.1:{free_port()}",
            "allow_insecure": True,
            "token": "static-token",
            "contract_ids": ["1001"],
        },
        "kafka": {"bootstrap_servers": [f"127.0.0.1:{free_port()}"]},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "shutdown_timeout_seconds": 5,
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_venv_has_no_confluent_kafka(venv: Path) -> None:
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util, sys; import bridge.cli, bridge.tail, bridge.sink, bridge.registry; "
            "print(importlib.util.find_spec('confluent_kafka'), 'confluent_kafka' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=venv,
        env=_environment(),
        check=True,
    )
    assert probe.stdout.split() == ["None", "False"]


def test_run_without_a_registry_starts_serves_and_stops_on_sigterm(venv: Path, tmp_path: Path) -> None:
    path = config(tmp_path)
    port = yaml.safe_load(path.read_text())["metrics"]["port"]
    log = tmp_path / "bridge.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [str(venv / "bin" / "ime-bridge"), "run", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
            env=_environment(),
        )
        try:
            deadline = time.monotonic() + 60
            health = None
            while health is None and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                        health = answer.status
                except OSError:
                    time.sleep(0.2)
            assert health == 200, log.read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                assert b"ime_bridge_ready 0.0" in answer.read()  # up, waiting for Kafka: not ready
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert "event=starting" in text, text
    assert "Traceback" not in text
    assert "confluent" not in text


def test_a_configured_registry_is_refused_at_start_naming_the_extra(venv: Path, tmp_path: Path) -> None:
    path = config(tmp_path, schema_registry={"url": f"http://127.0.0.1:{free_port()}"})
    for command in (["run"], ["check-config"]):
        result = subprocess.run(
            [str(venv / "bin" / "ime-bridge"), *command, "--config", str(path)],
            capture_output=True,
            text=True,
            env=_environment(),
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert "pip install 'ime-bridge[registry]'" in result.stderr
        assert "Traceback" not in result.stderr


def test_tail_without_a_registry_does_not_need_the_extra(venv: Path, tmp_path: Path) -> None:
    """It gets as far as Kafka (a closed port here), which is what it reports."""
    result = subprocess.run(
        [str(venv / "bin" / "ime-bridge"), "tail", "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--no-table"],
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "KafkaConnectionError" in result.stderr
    assert "confluent" not in result.stderr
