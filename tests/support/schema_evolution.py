"""The schema evolution check: each version of a schema reads data written with every older one.

The policy is BACKWARD_TRANSITIVE (schemas/README.md). It is checked the way a consumer meets it: data
is written with the older schema and read with the newer one through fastavro's schema resolution. The
data exercises every part of the writer schema (each union branch, each enum symbol, empty and non-empty
arrays and maps), because a resolver only checks the parts of a schema that the data goes through.

Run it on a candidate before committing a change (exit 1 and one line per problem when incompatible):

    python -m tests.support.schema_evolution schemas/contract_update.avsc
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
HISTORY = SCHEMAS / "history"
_VERSION = re.compile(r"^(?P<stem>.+)\.v(?P<version>\d+)\.avsc$")

Definition = dict[str, Any]
_NAMED = ("record", "enum", "fixed")
_LONGEST = 240
_DEEPEST = 8  # past this depth, recursive schemas take their first branch and empty collections
_MOST_SAMPLES = 512


def released_versions(stem: str) -> list[tuple[int, Path]]:
    """(version, file) of every released version of schemas/<stem>.avsc, oldest first."""
    found = []
    for path in HISTORY.glob(f"{stem}.v*.avsc"):
        match = _VERSION.match(path.name)
        if match and match["stem"] == stem:
            found.append((int(match["version"]), path))
    return sorted(found)


def load(path: Path) -> Definition:
    """A schema file's JSON."""
    definition = json.loads(path.read_text("utf-8"))
    assert isinstance(definition, dict), f"{path}: not a named schema"
    return definition


class _Samples:
    """Values of a schema in which every union, enum, array and map takes its alternatives in turn.

    Each such choice point keeps its own turn, so a choice nested inside a branch cycles through its
    alternatives over the values that take that branch: a few values go through every part of the schema.
    """

    def __init__(self, schema: Any) -> None:
        self.named: dict[str, Any] = {}
        self.turns: dict[int, int] = {}  # choice point (its schema node's id) → times taken
        self.alternatives: dict[int, int] = {}  # choice point → how many alternatives it has
        self.serial = 0
        self._collect(schema, "")

    def _collect(self, schema: Any, namespace: str) -> None:
        """Learn every named type first: a reference can come before the branch that defines it is taken."""
        if isinstance(schema, list):
            for branch in schema:
                self._collect(branch, namespace)
        elif isinstance(schema, dict):
            kind = schema["type"]
            if kind in _NAMED:
                name = _full_name(schema, namespace)
                self.named[name] = schema
                namespace = name.rpartition(".")[0]
            for part in (kind, schema.get("items"), schema.get("values")):
                if isinstance(part, (dict, list)):
                    self._collect(part, namespace)
            for field in schema.get("fields", []) if kind == "record" else []:
                self._collect(field["type"], namespace)

    def covered(self) -> bool:
        """Every choice point seen so far has taken each of its alternatives."""
        return all(self.turns[point] >= count for point, count in self.alternatives.items())

    def _choose(self, node: Any, count: int) -> int:
        turn = self.turns.get(id(node), 0)
        self.turns[id(node)], self.alternatives[id(node)] = turn + 1, count
        return turn % count

    def value(self, schema: Any, namespace: str = "", depth: int = 0) -> Any:
        """The next value of `schema`."""
        if isinstance(schema, list):
            branch = schema[0] if depth > _DEEPEST else schema[self._choose(schema, len(schema))]
            return self.value(branch, namespace, depth)
        if isinstance(schema, str):
            return self._primitive(schema, namespace, depth)
        kind = schema["type"]
        if isinstance(kind, (dict, list)):
            return self.value(kind, namespace, depth)
        if kind == "record":
            inner = _full_name(schema, namespace).rpartition(".")[0]
            return {field["name"]: self.value(field["type"], inner, depth + 1) for field in schema["fields"]}
        if kind == "enum":
            return schema["symbols"][self._choose(schema, len(schema["symbols"]))]
        if kind == "fixed":
            return bytes([self.serial % 256]) * schema["size"]
        if kind in ("array", "map"):
            count = 0 if depth > _DEEPEST else self._choose(schema, 3)
            items = [self.value(schema.get("items", schema.get("values")), namespace, depth + 1) for _ in range(count)]
            return items if kind == "array" else {f"k{n}": item for n, item in enumerate(items)}
        return self._primitive(kind, namespace, depth)

    def _primitive(self, kind: str, namespace: str, depth: int) -> Any:
        self.serial += 1
        serial = self.serial
        values: dict[str, Any] = {
            "null": None,
            "boolean": serial % 2 == 1,
            "int": serial * 7 - 3,
            "long": serial * 1_000_003 - 11,
            "float": serial + 0.5,
            "double": serial * 1.25 - 0.5,
            "string": f"s{serial}",
            "bytes": bytes([serial % 256, 1]),
        }
        if kind in values:
            return values[kind]
        name = kind if "." in kind or not namespace else f"{namespace}.{kind}"
        return self.value(self.named.get(name, self.named.get(kind)), namespace, depth)


def _full_name(schema: Definition, namespace: str) -> str:
    name: str = schema["name"]
    if "." in name:
        return name
    space = schema.get("namespace", namespace)
    return f"{space}.{name}" if space else name


def samples(writer: Definition) -> list[Any]:
    """Values of `writer` that together go through every part of it (every choice, nested ones included)."""
    generator = _Samples(writer)
    values = [generator.value(writer)]
    while not generator.covered() and len(values) < _MOST_SAMPLES:
        values.append(generator.value(writer))
    return values


def read_problems(writer: Definition, reader: Definition) -> list[str]:
    """Why `reader` cannot read data written with `writer` (empty when it can), one line per distinct reason."""
    parsed_writer, parsed_reader = parse_schema(writer), parse_schema(reader)
    problems: dict[str, None] = {}
    for value in samples(writer):
        buffer = io.BytesIO()
        schemaless_writer(buffer, parsed_writer, value)
        buffer.seek(0)
        try:
            schemaless_reader(buffer, parsed_writer, parsed_reader)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"  # fastavro's messages can quote whole schemas
            problems[message if len(message) <= _LONGEST else message[: _LONGEST - 1] + "…"] = None
            continue
        if buffer.tell() != len(buffer.getvalue()):
            problems["the reader stopped before the end of the data"] = None
    return list(problems)


def check(versions: Sequence[tuple[str, Definition]]) -> list[str]:
    """BACKWARD_TRANSITIVE over `versions` (oldest first): each one reads every older one's data."""
    problems = []
    for newer in range(len(versions)):
        for older in range(newer):
            (old_label, writer), (new_label, reader) = versions[older], versions[newer]
            problems += [f"{new_label} cannot read {old_label}: {problem}" for problem in read_problems(writer, reader)]
    return problems


def check_candidate(candidate: Path, stem: str | None = None) -> list[str]:
    """Problems of `candidate` as the next version of schemas/<stem>.avsc, after every released version."""
    if stem is None:
        match = _VERSION.match(candidate.name)
        stem = match["stem"] if match else candidate.name.removesuffix(".avsc")
    released = [(f"{stem} v{version}", load(path)) for version, path in released_versions(stem)]
    if not released:
        return [f"no released version of {stem} in {HISTORY}"]
    return check([*released, (f"candidate {candidate}", load(candidate))])


def main(argv: Sequence[str] | None = None) -> int:
    """Check candidate schema files against the released versions of the schema of the same name."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="*", type=Path, help="schema files (default: schemas/*.avsc)")
    parser.add_argument("--schema", help="the released schema's file stem, when the candidate is named otherwise")
    args = parser.parse_args(argv)
    problems = []
    for candidate in args.candidates or sorted(SCHEMAS.glob("*.avsc")):
        problems += check_candidate(candidate, args.schema)
    for problem in problems:
        print(problem)
    print("compatible: BACKWARD_TRANSITIVE" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
