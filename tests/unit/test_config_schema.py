"""The config's JSON Schema, generated from bridge/config.py: the chart's values.schema.json holds it, current.

Pure: the schema-building functions, the repository's files and the `jsonschema` package (draft-07, the draft
the chart declares; installed by the dev extra as a dependency of kubernetes-validate). tests/test_helm.py
checks the same schema through Helm's own validator.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, FormatChecker

from bridge.config import Settings
from bridge.config_schema import CHART_SUPPLIED, chart_config_schema, config_schema, dump, write_chart_schema

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ime-bridge"
VALUES_SCHEMA = CHART / "values.schema.json"
REGENERATE = "make chart-schema (ime-bridge config schema --write helm/ime-bridge/values.schema.json)"


def validator(schema: dict[str, Any]) -> Draft7Validator:
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema, format_checker=FormatChecker())


def errors(schema: dict[str, Any], instance: Any) -> list[str]:
    """Each validation error as `path: message`, empty when `instance` is valid."""
    found = validator(schema).iter_errors(instance)
    return [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}" for error in found]


def chart_values(name: str = "values.yaml") -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / name).read_text("utf-8"))
    return values


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, recursively, as Helm coalesces a values file with values.yaml."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def all_enabled_config() -> dict[str, Any]:
    """The `config` of values.yaml with the ci values that switch every part on."""
    return merged(chart_values()["config"], chart_values("ci/all-enabled-values.yaml")["config"])


def walk(node: Any) -> Any:
    """Every dict and list inside `node`, itself included."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def test_values_schema_config_is_the_generated_one() -> None:
    stored = json.loads(VALUES_SCHEMA.read_text("utf-8"))["properties"]["config"]
    assert stored == chart_config_schema(), f"helm/ime-bridge/values.schema.json's config is stale: run {REGENERATE}"


def test_values_schema_file_is_laid_out_as_the_generator_writes_it() -> None:
    """Regenerating changes nothing else: the file is already in the generator's layout."""
    text = VALUES_SCHEMA.read_text("utf-8")
    assert dump(json.loads(text)) == text, f"values.schema.json is not in the generated layout: run {REGENERATE}"


def test_write_replaces_only_the_config_part(tmp_path: Path) -> None:
    document = json.loads(VALUES_SCHEMA.read_text("utf-8"))
    stale = copy.deepcopy(document)
    stale["properties"]["config"]["properties"]["ime"]["properties"].pop("base_url")
    path = tmp_path / "values.schema.json"
    path.write_text(dump(stale), "utf-8")
    assert write_chart_schema(path) is True
    assert path.read_text("utf-8") == VALUES_SCHEMA.read_text("utf-8")
    assert write_chart_schema(path) is False


@pytest.mark.parametrize("build", [config_schema, chart_config_schema])
def test_schemas_are_self_contained_draft_07(build: Any) -> None:
    """No $ref/$defs (a ref inside `config` would resolve against values.schema.json's root), no titles."""
    schema = build()
    Draft7Validator.check_schema(schema)
    assert "$defs" not in schema
    for node in walk(schema["properties"]):
        if isinstance(node, dict) and "type" in node:  # a schema node, not a `properties` map
            assert not {"$ref", "$defs", "definitions", "title"} & set(node), node
            assert node.get("format", "date") in {"date", "uri"}, node
    assert config_schema()["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("build", [config_schema, chart_config_schema])
def test_every_section_forbids_unknown_keys(build: Any) -> None:
    schema = build()
    assert schema["additionalProperties"] is False
    for name, section in schema["properties"].items():
        if "properties" in section:
            assert section["additionalProperties"] is False, name
    assert set(schema["properties"]) == set(Settings.model_fields)


def test_chart_default_values_validate() -> None:
    schema = chart_config_schema()
    assert errors(schema, chart_values()["config"]) == []
    assert errors(schema, all_enabled_config()) == []


def test_config_example_validates() -> None:
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text("utf-8"))
    assert errors(config_schema(), example) == []


@pytest.mark.parametrize("build", [config_schema, chart_config_schema])
@pytest.mark.parametrize("where", [(), ("ime",), ("kafka",), ("buffer",), ("metrics",), ("log",)])
def test_an_unknown_key_is_refused(build: Any, where: tuple[str, ...]) -> None:
    config = copy.deepcopy(chart_values()["config"])
    target = config
    for key in where:
        target = target[key]
    target["no_such_key"] = 1
    assert any("no_such_key" in error for error in errors(build(), config))


@pytest.mark.parametrize(
    ("section", "key"), [(section, key) for section, keys in CHART_SUPPLIED.items() for key in keys]
)
def test_keys_the_chart_supplies_are_refused_in_values_and_allowed_in_the_file(section: str, key: str) -> None:
    config = copy.deepcopy(chart_values()["config"])
    config.setdefault(section, {"url": "https://registry:8081"})[key] = "/data" if key == "spool_dir" else "x"
    assert errors(chart_config_schema(), config)
    assert errors(config_schema(), config) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("log", "level"), "TRACE"),
        (("ime", "contract_ids"), [1001]),
        (("ime", "contract_ids"), ["1001", "1001"]),
        (("ime", "base_url"), "ftp://core.hedgetech.ir"),
        (("ime", "ws_url"), "https://core.hedgetech.ir"),
        (("kafka", "bootstrap_servers"), ["kafka"]),
        (("kafka", "bootstrap_servers"), []),
        (("kafka", "linger_ms"), -1),
        (("kafka", "sasl_mechanism"), "GSSAPI"),
        (("buffer", "overflow"), "drop"),
        (("schema_registry",), {"url": "https://user:pw@registry:8081"}),
        (("schema_registry",), {"username": "bridge"}),
        (("shutdown_timeout_seconds",), 0),
    ],
    ids=lambda part: json.dumps(part),
)
def test_schema_refuses_what_the_model_refuses(path: tuple[str, ...], value: Any) -> None:
    config = all_enabled_config()
    assert errors(chart_config_schema(), config) == []
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert errors(chart_config_schema(), config), f"{'.'.join(path)}={value!r} accepted"


def test_chart_requires_the_keys_its_templates_read() -> None:
    """The templates read every section, the shutdown budget and the metrics port: null there is refused."""
    schema = chart_config_schema()
    assert schema["required"] == ["ime", "kafka", "buffer", "metrics", "log", "shutdown_timeout_seconds"]
    config = chart_values()["config"]
    assert errors(schema, {**config, "metrics": {"host": "0.0.0.0"}})
    assert errors(schema, {**config, "metrics": {"host": "0.0.0.0", "port": 0}})
    assert errors(schema, {**config, "schema_registry": None}) == []
    assert errors(config_schema(), {"ime": {}}) == []  # the file needs only `ime`; the model checks the rest
