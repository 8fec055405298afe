"""The JSON Schema of the bridge's config file, generated from `Settings` (bridge/config.py), and the Helm chart's.

`config_schema()` describes the config file `ime-bridge run --config` reads; `chart_config_schema()` the chart's
`config` value, which helm/ime-bridge/values.schema.json holds under `properties.config` (`make chart-schema`,
i.e. `ime-bridge config schema --write helm/ime-bridge/values.schema.json`, rewrites it;
tests/unit/test_config_schema.py fails when it is stale).

Both are JSON Schema draft-07, the draft the chart's values.schema.json declares (Helm 4 validates with
santhosh-tekuri/jsonschema, which honours `$schema`). Pydantic's `$defs`/`$ref` are inlined: a `$ref` inside
the `config` property would point at the root of values.schema.json, and the model is not recursive.
Pydantic's generated titles are dropped, and so are the formats draft-07 does not define (`path`, `password`).
Every section keeps `additionalProperties: false`, as the model forbids unknown keys (`extra="forbid"`).
Cross-field rules (credentials, reconnect_min <= reconnect_max...) are the model validators' and stay out of the
schema: `ime-bridge check-config` applies them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DRAFT_07 = "http://json-schema.org/draft-07/schema#"
# Formats draft-07 defines; pydantic also emits `path` (Path) and `password` (SecretStr).
DRAFT_07_FORMATS = frozenset(
    {
        "date-time",
        "date",
        "time",
        "email",
        "idn-email",
        "hostname",
        "idn-hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "iri",
        "iri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
        "regex",
    }
)
# Keywords of a schema that only constrain values of their own type, so that `anyOf: [X, {type: null}]` is
# `X` with `type: [X's type, "null"]` (an `enum` gains `null`).
_TYPED_KEYWORDS = frozenset(
    {
        "type",
        "description",
        "default",
        "format",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "items",
        "minItems",
        "maxItems",
        "uniqueItems",
        "properties",
        "required",
        "additionalProperties",
        "enum",
    }
)

# The chart supplies these itself, never from `config`: the secrets come from the credentials Secret as
# IME_BRIDGE_* variables (templates/_helpers.tpl, ime-bridge.secretEnv), and `buffer.spool_dir` is
# persistence.mountPath in spool mode. The schema refuses them so that no password lands in the ConfigMap.
CHART_SUPPLIED: dict[str, tuple[str, ...]] = {
    "ime": ("password", "token"),
    "kafka": ("sasl_password", "sasl_oauth_client_secret", "ssl_key_password"),
    "schema_registry": ("password",),
    "buffer": ("spool_dir",),
}
# Keys the chart's templates read (ime-bridge.configFile, the container port, the grace period): values.yaml
# sets them, and setting one to null is refused rather than rendered into a broken manifest.
CHART_REQUIRED: tuple[str, ...] = ("ime", "kafka", "buffer", "metrics", "log", "shutdown_timeout_seconds")
CHART_REQUIRED_IN: dict[str, tuple[str, ...]] = {"metrics": ("port",)}
CHART_DESCRIPTION = (
    "The bridge's config file (rendered into a ConfigMap), less what the chart supplies: the secrets "
    "(ime.password, ime.token, kafka.sasl_password, kafka.sasl_oauth_client_secret, kafka.ssl_key_password, "
    "schema_registry.password) come from `credentials`, buffer.spool_dir is persistence.mountPath, and with "
    "kafkaTls.secretName the kafka.ssl_* files are its mount. Generated from bridge/config.py by `make chart-schema`."
)


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft-07, self-contained) of the bridge's config file."""
    from bridge.config import Settings

    generated = Settings.model_json_schema()
    definitions: dict[str, Any] = generated.pop("$defs", {})
    schema = _tidy(_inline(generated, definitions))
    schema.pop("title", None)
    return {"$schema": DRAFT_07, "title": "ime-bridge configuration", **schema}


def chart_config_schema() -> dict[str, Any]:
    """The chart's `config` value: the config file's schema less the keys the chart supplies, without defaults.

    The defaults are left out because the chart's are values.yaml's (a key left empty there takes the bridge's).
    """
    schema: dict[str, Any] = _without_defaults(config_schema())
    del schema["$schema"], schema["title"]
    sections: dict[str, Any] = schema["properties"]
    for section, keys in CHART_SUPPLIED.items():
        target = _object_schema(sections[section])
        for key in keys:
            del target["properties"][key]
        if "required" in target:
            target["required"] = [key for key in target["required"] if key not in keys]
    for section, keys in CHART_REQUIRED_IN.items():
        target = _object_schema(sections[section])
        required = target.get("required", [])
        target["required"] = [*required, *(key for key in keys if key not in required)]
    # The metrics port is the container's and the Service's target port too: Kubernetes refuses 0 there.
    sections["metrics"]["properties"]["port"]["minimum"] = 1
    schema["required"] = list(CHART_REQUIRED)
    schema["description"] = CHART_DESCRIPTION
    return schema


def write_chart_schema(values_schema: Path) -> bool:
    """Replace `properties.config` of the chart's values.schema.json; True if the file changed.

    The rest of the file is kept as it is: it is read and written back with the same layout (2-space JSON).
    """
    text = values_schema.read_text("utf-8")
    document = json.loads(text)
    document["properties"]["config"] = chart_config_schema()
    updated = dump(document)
    if updated == text:
        return False
    values_schema.write_text(updated, "utf-8")
    return True


def dump(schema: dict[str, Any]) -> str:
    """The JSON text layout of values.schema.json."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    """`node` with every `{"$ref": "#/$defs/X"}` replaced by X (its sibling keywords kept, winning)."""
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        target = _inline(copy.deepcopy(definitions[name]), definitions)
        siblings = {key: _inline(value, definitions) for key, value in node.items() if key != "$ref"}
        return {**target, **siblings}
    return {key: _inline(value, definitions) for key, value in node.items()}


def _tidy(schema: dict[str, Any]) -> dict[str, Any]:
    """One schema node, recursively: no titles, only draft-07 formats, `anyOf [X, null]` as `type: [.., null]`."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" or (key == "format" and value not in DRAFT_07_FORMATS):
            continue
        if key == "properties":
            out[key] = {name: _tidy(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _tidy(value)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_tidy(sub) for sub in value]
        else:
            out[key] = value
    return dict(sorted(_nullable(out).items()))  # keywords in order, properties in the model's


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`{anyOf: [X, {type: null}], ...}` as `{...X, type: [X.type, "null"], ...}` when that means the same."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return schema
    (other,) = [option for option in options if option != {"type": "null"}]
    if not isinstance(other.get("type"), str) or not set(other) <= _TYPED_KEYWORDS:
        return schema
    merged = {key: value for key, value in schema.items() if key != "anyOf"}
    if (set(merged) & set(other)) - {"description", "default"}:  # annotations: the field's own win
        return schema
    nullable = {**other, **merged, "type": [other["type"], "null"]}
    if "enum" in nullable:
        nullable["enum"] = [*nullable["enum"], None]
    return nullable


def _without_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_defaults(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: (
            {name: _without_defaults(sub) for name, sub in value.items()}
            if key == "properties"
            else _without_defaults(value)
        )
        for key, value in node.items()
        if key != "default"
    }


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The object branch of a section's schema (schema_registry may be null)."""
    if "properties" in schema:
        return schema
    (found,) = [option for option in schema.get("anyOf", []) if "properties" in option]
    result: dict[str, Any] = found
    return result
