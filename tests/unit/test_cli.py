"""The commands a person runs: demo and tail, as subprocesses."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
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


# --- the registry extra; tail's and check-config's options --------------------------------------------


@pytest.fixture
def registry_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"ime": {"token": "t", "contract_ids": ["1001"]}, "schema_registry": {"url": "http://sr:8081"}})
    )
    return path


def test_run_refuses_a_registry_without_the_registry_extra(
    registry_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Named at start, with the command that fixes it, before anything connects."""
    monkeypatch.setattr(cli, "client_installed", lambda: False)
    monkeypatch.setattr(cli, "_run", None)  # never reached
    assert cli.main(["run", "--config", str(registry_config)]) == cli.EXIT_CONFIG
    line = last_line(capsys.readouterr().err)
    assert line.startswith("ime-bridge: fatal: invalid configuration: schema_registry is configured but")
    assert "pip install 'ime-bridge[registry]'" in line


def test_check_config_and_tail_refuse_a_registry_without_the_extra(
    registry_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "client_installed", lambda: False)
    assert cli.main(["check-config", "--config", str(registry_config)]) == cli.EXIT_CONFIG
    assert "pip install 'ime-bridge[registry]'" in capsys.readouterr().err
    assert cli.main(["tail", "--schema-registry", "http://sr:8081", "--max-records", "1"]) == cli.EXIT_CONFIG
    assert "ime-bridge tail: schema_registry is configured but" in capsys.readouterr().err


def test_the_registry_client_is_made_only_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other path to the registry (the sink, tail) fails the same way, as a SinkFatal: no retry helps."""
    from bridge import registry
    from bridge.config import SchemaRegistrySettings
    from bridge.records import SinkFatal

    monkeypatch.setattr(registry, "client_installed", lambda: False)
    with pytest.raises(SinkFatal, match=r"pip install 'ime-bridge\[registry\]'"):
        registry.SchemaRegistry(SchemaRegistrySettings.model_validate({"url": "http://sr:8081"}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-06T09:30:00+03:30", datetime(2026, 12, 6, 6, 0, tzinfo=UTC)),
        ("2026-12-06T06:00:00", datetime(2026, 12, 6, 6, 0, tzinfo=UTC)),  # no offset: UTC
        ("2026-12-06 06:00:00Z", datetime(2026, 12, 6, 6, 0, tzinfo=UTC)),
    ],
)
def test_tail_since_takes_an_iso_time(text: str, expected: datetime) -> None:
    args = cli.build_parser().parse_args(["tail", "--since", text])
    assert args.since == expected


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1.5h", 5400)])
def test_tail_since_takes_a_duration_back_from_now(text: str, seconds: float) -> None:
    before = datetime.now(UTC)
    args = cli.build_parser().parse_args(["tail", "--since", text])
    assert before - timedelta(seconds=seconds + 1) <= args.since <= datetime.now(UTC) - timedelta(seconds=seconds)


def test_tail_since_refuses_what_is_not_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["tail", "--since", "yesterday"])
    assert exit_info.value.code == 2
    assert "neither an ISO 8601 time" in capsys.readouterr().err


def test_tail_options() -> None:
    args = cli.build_parser().parse_args(["tail", "--key", "1001", "--key", "1002", "--dead-letters", "--table"])
    assert (args.key, args.dead_letters, args.table, args.since) == (["1001", "1002"], True, True, None)


@pytest.mark.parametrize("command", [["check-config"], ["config", "check"]])
def test_check_config_connect_options(command: list[str]) -> None:
    args = cli.build_parser().parse_args([*command, "--connect", "--timeout", "3"])
    assert (args.connect, args.timeout) == (True, 3.0)
    assert cli.build_parser().parse_args(command).connect is False


def test_replay_takes_one_origin_and_a_window() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["replay", "--from-topic", "raw", "--since", "2026-12-06T09:00:00", "--pace"])
    assert (args.from_topic, args.from_file, args.pace, args.to_topic) == ("raw", None, True, None)
    assert args.since == datetime(2026, 12, 6, 9, tzinfo=UTC)
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "--from-topic", "raw", "--from-file", "x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["replay"])


def test_capture_needs_where_to_write() -> None:
    args = cli.build_parser().parse_args(["capture", "--out", "cap.jsonl.zst", "--max-bytes", "1000"])
    assert (args.out, args.max_bytes) == (Path("cap.jsonl.zst"), 1000)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["capture"])
