"""What `ime-bridge run` loads: no development tool, no server code it does not need (issue 13)."""

from __future__ import annotations

import subprocess
import sys


def imported_modules(*args: str) -> set[str]:
    """The modules `python -X importtime -m bridge ARGS` imports, by name."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bridge", *args], capture_output=True, text=True, check=True
    )
    lines = [line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")]
    return {fields[-1].strip() for fields in lines[1:] if len(fields) == 3}


def test_run_help_loads_no_devtools_and_no_network_library() -> None:
    modules = imported_modules("run", "--help")
    assert "bridge.cli" in modules, "the measurement sees the CLI"
    unwanted = {
        name
        for name in modules
        if name.startswith(("bridge.devtools", "aiohttp", "aiokafka", "websockets", "confluent_kafka"))
    }
    assert not unwanted, sorted(unwanted)


def test_simulate_help_loads_the_simulator() -> None:
    """The other side of the same switch: the simulate command does load its tool."""
    assert "bridge.devtools.simulator" in imported_modules("simulate", "--help")
