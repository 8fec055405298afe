"""config: strict settings, errors that name the key, environment overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.test_config import MINIMAL, write


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True, check=False)


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write(tmp_path, MINIMAL)))
    assert result.returncode == 0, result.stderr
    assert "configuration OK: 1 contract ids" in result.stdout
    assert "secret" not in result.stdout + result.stderr


def test_check_config_refuses_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(write(tmp_path, MINIMAL + "  bogus: 1\n")))
    assert result.returncode == 2
    assert "ime.bogus: unknown key" in result.stderr
