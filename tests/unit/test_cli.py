"""The commands a person runs: demo and tail, as subprocesses."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bridge import cli
from bridge.app import PublisherFailed
from bridge.source import SourceFatal


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").splitlines()[-1]


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
