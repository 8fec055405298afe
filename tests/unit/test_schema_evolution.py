"""Schema evolution as a tested contract: BACKWARD_TRANSITIVE over every released version (schemas/README.md).

The check itself lives in tests/support/schema_evolution.py, runnable on a candidate schema; here it runs on the
shipped history, and is shown to fail on deliberately incompatible candidates.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer

from bridge.cli import main as cli_main
from bridge.encode import Schema, SchemaHistory, load_released_schemas, load_schema
from tests.support.schema_evolution import (
    HISTORY,
    SCHEMAS,
    check,
    check_candidate,
    load,
    main,
    read_problems,
    released_versions,
    samples,
)

CURRENT = SCHEMAS / "contract_update.avsc"
Change = Callable[[dict[str, Any]], None]


def field(definition: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f for f in definition["fields"] if f["name"] == name)
    return found


def candidate(tmp_path: Path, change: Change) -> Path:
    """The current schema with `change` applied, written as a candidate file."""
    definition = copy.deepcopy(load(CURRENT))
    change(definition)
    path = tmp_path / "contract_update.avsc"
    path.write_text(json.dumps(definition), "utf-8")
    return path


def test_every_version_reads_data_written_with_every_older_one() -> None:
    versions = [(f"v{version}", load(path)) for version, path in released_versions("contract_update")]
    assert len(versions) >= 2, "the history holds at least v1 and v2"
    assert check([*versions, ("current", load(CURRENT))]) == []


def test_the_shipped_schema_is_the_newest_released_version() -> None:
    """Changing the schema means adding the next version to schemas/history (the header names its fingerprint)."""
    newest = released_versions("contract_update")[-1][1]
    shipped = load_schema()
    assert Schema(shipped.name, load(newest)).fingerprint == shipped.fingerprint, (
        f"schemas/contract_update.avsc differs from {newest.name}: add it to {HISTORY} as the next version"
    )


def test_history_files_are_numbered_from_one_without_gaps() -> None:
    versions = [version for version, _ in released_versions("contract_update")]
    assert versions == list(range(1, len(versions) + 1))


def _add_required_field(d: dict[str, Any]) -> None:
    d["fields"].append({"name": "venue", "type": "string"})


def _change_a_type(d: dict[str, Any]) -> None:
    field(d, "sequence")["type"] = "string"


def _narrow_a_number(d: dict[str, Any]) -> None:
    field(d, "sequence")["type"] = "int"


def _drop_an_enum_symbol(d: dict[str, Any]) -> None:
    field(d, "endpoint")["type"]["symbols"] = ["ID"]


def _make_a_nullable_field_required(d: dict[str, Any]) -> None:
    aggregate = field(d, "aggregate")
    aggregate["type"], _ = aggregate["type"][1], aggregate.pop("default")


def _rename_a_nested_record(d: dict[str, Any]) -> None:
    field(d, "best_limit")["type"]["items"]["name"] = "Level"


def _drop_a_default_then_read_v1(d: dict[str, Any]) -> None:
    del field(d, "skipped")["default"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_add_required_field, "No default value for field venue"),
        (_change_a_type, "long is not string"),
        (_narrow_a_number, "long is not int"),
        (_drop_an_enum_symbol, "NAME not found in reader symbol list"),
        (_make_a_nullable_field_required, "schema mismatch"),
        (_rename_a_nested_record, "Schema mismatch"),
        (_drop_a_default_then_read_v1, "No default value for field skipped"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_an_incompatible_candidate_fails_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Change, reason: str
) -> None:
    path = candidate(tmp_path, change)
    problems = check_candidate(path)
    assert problems
    assert any(reason in problem for problem in problems), problems
    assert all(problem.startswith(f"candidate {path} cannot read contract_update v") for problem in problems)
    assert main([str(path)]) == 1
    assert "problem(s)" in capsys.readouterr().out


def _add_an_optional_field(d: dict[str, Any]) -> None:
    d["fields"].append({"name": "venue", "type": ["null", "string"], "default": None})


def _remove_a_field(d: dict[str, Any]) -> None:
    d["fields"].remove(field(d, "channel"))


def _widen_a_number(d: dict[str, Any]) -> None:
    field(d, "sequence")["type"] = "double"


def _add_an_enum_symbol(d: dict[str, Any]) -> None:
    field(d, "endpoint")["type"]["symbols"].append("ISIN")


@pytest.mark.parametrize(
    "change",
    [_add_an_optional_field, _remove_a_field, _widen_a_number, _add_an_enum_symbol],
    ids=lambda change: change.__name__.strip("_"),
)
def test_a_backward_compatible_candidate_passes(tmp_path: Path, change: Change) -> None:
    assert check_candidate(candidate(tmp_path, change)) == []


def test_the_check_passes_on_the_shipped_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "compatible: BACKWARD_TRANSITIVE" in capsys.readouterr().out


def test_the_samples_go_through_every_branch_of_the_schema() -> None:
    """Resolution is checked only where data goes, so the samples must take every union branch and symbol."""
    values = samples(load(CURRENT))
    assert {value["endpoint"] for value in values} == {"ID", "NAME"}
    for nullable in ("contract_name", "aggregate", "allowed_price_range", "contract_info"):
        assert {value[nullable] is None for value in values} == {True, False}, nullable
    assert {len(value["best_limit"]) > 0 for value in values} == {True, False}
    aggregates = [value["aggregate"] for value in values if value["aggregate"] is not None]
    assert {aggregate["trade_date"] is None for aggregate in aggregates} == {True, False}
    assert {value["first_after_subscribe"] for value in values} == {True, False}


def test_a_union_branch_the_reader_lacks_is_found_only_through_data_that_takes_it() -> None:
    writer = {"type": "record", "name": "R", "fields": [{"name": "x", "type": ["null", "long", "string"]}]}
    reader = {"type": "record", "name": "R", "fields": [{"name": "x", "type": ["null", "long"]}]}
    assert any("string" in problem for problem in read_problems(writer, reader))


def test_schemas_export_writes_the_files_a_consumer_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["schemas", "export", str(tmp_path / "out")]) == 0
    exported = tmp_path / "out" / "contract_update.avsc"
    assert exported.read_text("utf-8") == CURRENT.read_text("utf-8")
    shipped = load_schema()
    assert f"{exported}  {shipped.name}  schema-fingerprint {shipped.fingerprint}" in capsys.readouterr().out
    assert json.loads(exported.read_text("utf-8"))["name"] == "ContractUpdate"


def test_schemas_export_reports_a_directory_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli_main(["schemas", "export", str(blocker)]) == 1


# --- spooled values an older version wrote, re-encoded in the current schema ---------------------------


def test_the_package_ships_every_released_version() -> None:
    shipped = {schema.fingerprint for schema in load_released_schemas()}
    in_repository = {
        Schema(load_schema().name, load(path)).fingerprint for _, path in released_versions("contract_update")
    }
    assert shipped == in_repository


@pytest.mark.parametrize("version", [version for version, _ in released_versions("contract_update")[:-1]])
def test_a_value_an_older_version_wrote_is_re_encoded_in_the_current_schema(version: int) -> None:
    current = load_schema()
    writer = Schema(current.name, load(HISTORY / f"contract_update.v{version}.avsc"))
    history = SchemaHistory.shipped()
    for value in samples(writer.definition):
        written = io.BytesIO()
        schemaless_writer(written, writer.parsed, value)
        upgraded = history.upgrade(written.getvalue(), writer.fingerprint.encode())
        assert upgraded is not None
        resolved = schemaless_reader(io.BytesIO(written.getvalue()), writer.parsed, current.parsed)
        assert schemaless_reader(io.BytesIO(upgraded), current.parsed, current.parsed) == resolved


def test_a_current_value_is_left_alone_and_an_unknown_writer_is_refused() -> None:
    history = SchemaHistory.shipped()
    value = b"\x08abcd"
    assert history.upgrade(value, load_schema().fingerprint.encode()) is value
    assert history.upgrade(value, b"0123456789abcdef") is None
