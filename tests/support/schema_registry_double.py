"""A test double of Confluent Schema Registry: the subset of its REST API that the clients use.

No Schema Registry server can be installed on these machines, so the tests run this one: an aiohttp
server on 127.0.0.1 that confluent-kafka's own `SchemaRegistryClient` (and so its `AvroDeserializer`)
talks to unchanged. It keeps subjects, versions and globally unique ids, and enforces a compatibility
level the way the registry does (default BACKWARD, settable globally or per subject through /config),
judging compatibility with the project's evolution check (tests/support/schema_evolution.py). Errors have the
registry's shape, `{"error_code": ..., "message": ...}`, with its codes (40401, 40402, 40403, 409,
42201, 42203). Optional: basic auth, TLS (an `ssl.SSLContext`), and a failure mode answering every
request (or the next few) with one status, for fault tests. Not implemented: schema references, contexts, modes,
deletes, and any schema type but AVRO.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from fastavro import parse_schema

from tests.support.schema_evolution import read_problems

LEVELS = frozenset(
    {"NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE"}
)
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RegistryError(Exception):
    """An error answer of the registry."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _normalized(schema: str) -> str:
    """The schema's identity: its JSON with sorted keys and no whitespace."""
    return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))


class SchemaRegistryDouble:
    """Confluent Schema Registry's REST API subset, in this event loop; `async with` starts and stops it."""

    def __init__(
        self,
        *,
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self._credentials = None if username is None else f"{username}:{password}"
        self.compatibility = "BACKWARD"
        self.subject_compatibility: dict[str, str] = {}
        self.schemas: list[str] = []  # id n is schemas[n - 1], as registered
        self.subjects: dict[str, list[int]] = {}  # subject → schema id of each version, oldest first
        self.fail_with: int | None = None  # answer requests with this status ...
        self.failures_left: int | None = None  # ... this many times (None: until fail_with is cleared)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> SchemaRegistryDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on 127.0.0.1:`port` (0: a free port, then in `port`)."""
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(
            [
                web.get("/subjects", self._subjects),
                web.get("/subjects/{subject}/versions", self._versions),
                web.get("/subjects/{subject}/versions/{version}", self._version),
                web.post("/subjects/{subject}/versions", self._register),
                web.post("/subjects/{subject}", self._lookup),
                web.get("/schemas/ids/{id}", self._schema_by_id),
                web.get("/config", self._get_config),
                web.put("/config", self._put_config),
                web.get("/config/{subject}", self._get_config),
                web.put("/config/{subject}", self._put_config),
                web.post("/compatibility/subjects/{subject}/versions", self._compatibility),
                web.post("/compatibility/subjects/{subject}/versions/{version}", self._compatibility),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the asyncio server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, subject: str, schema: dict[str, Any] | str) -> int:
        """Register `schema` under `subject` directly (no compatibility check): set up a test's registry."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return self._add_version(subject, text)

    def registrations(self) -> int:
        """How many registration requests arrived."""
        return sum(1 for method, path in self.requests if method == "POST" and path.endswith("/versions"))

    # --- the API

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        try:
            if self.fail_with is not None and self.failures_left != 0:
                if self.failures_left is not None:
                    self.failures_left -= 1
                raise RegistryError(self.fail_with, self.fail_with, "failing on purpose (test double fault mode)")
            if self._credentials is not None and not self._authorized(request):
                raise RegistryError(401, 401, "Unauthorized")
            return await handler(request)
        except RegistryError as error:
            return _json({"error_code": error.code, "message": error.message}, status=error.status)
        except web.HTTPNotFound:
            return _json({"error_code": 404, "message": "HTTP 404 Not Found"}, status=404)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            return base64.b64decode(token).decode() == self._credentials
        except ValueError:
            return False

    async def _subjects(self, request: web.Request) -> web.Response:
        return _json(sorted(self.subjects))

    async def _versions(self, request: web.Request) -> web.Response:
        return _json(list(range(1, len(self._subject_ids(request)) + 1)))

    async def _version(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        ids = self._subject_ids(request)
        raw = request.match_info["version"]
        version = len(ids) if raw in ("latest", "-1") else int(raw) if raw.isdigit() else 0
        if not 1 <= version <= len(ids):
            raise RegistryError(404, 40402, f"Version {raw} not found.")
        return _json(self._description(subject, version, ids[version - 1]))

    async def _register(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        text = await self._candidate(request)
        existing = self._find(subject, text)
        if existing is not None:
            return _json({"id": existing[1]})
        problems = self._problems(subject, text)
        if problems:
            details = "; ".join(problems)
            message = f'Schema being registered is incompatible with an earlier schema for subject "{subject}", '
            raise RegistryError(409, 409, f"{message}details: [{details}]")
        return _json({"id": self._add_version(subject, text)})

    async def _lookup(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        self._subject_ids(request)
        found = self._find(subject, await self._candidate(request))
        if found is None:
            raise RegistryError(404, 40403, "Schema not found")
        return _json(self._description(subject, *found))

    async def _schema_by_id(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        schema_id = int(raw) if raw.isdigit() else 0
        if not 1 <= schema_id <= len(self.schemas):
            raise RegistryError(404, 40403, f"Schema {raw} not found")
        return _json({"schema": self.schemas[schema_id - 1]})

    async def _get_config(self, request: web.Request) -> web.Response:
        subject = request.match_info.get("subject")
        level = self.subject_compatibility.get(subject, self.compatibility) if subject else self.compatibility
        return _json({"compatibilityLevel": level})

    async def _put_config(self, request: web.Request) -> web.Response:
        level = str((await request.json()).get("compatibility", "")).upper()
        if level not in LEVELS:
            raise RegistryError(422, 42203, f"Invalid compatibility level {level!r}")
        subject = request.match_info.get("subject")
        if subject:
            self.subject_compatibility[subject] = level
        else:
            self.compatibility = level
        return _json({"compatibility": level})

    async def _compatibility(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        text = await self._candidate(request)
        problems = self._problems(subject, text)
        body: dict[str, Any] = {"is_compatible": not problems}
        if request.query.get("verbose", "").lower() == "true":
            body["messages"] = problems
        return _json(body)

    # --- the store

    async def _candidate(self, request: web.Request) -> str:
        """The schema in a request body, checked to be a valid Avro schema."""
        body = await request.json()
        if body.get("schemaType", "AVRO") != "AVRO" or body.get("references"):
            raise RegistryError(422, 42201, "Only AVRO schemas without references are supported by this double")
        text = body.get("schema")
        try:
            parse_schema(json.loads(text))
        except Exception as exc:
            raise RegistryError(422, 42201, f"Invalid schema: {exc}") from exc
        assert isinstance(text, str)
        return text

    def _subject_ids(self, request: web.Request) -> list[int]:
        subject = request.match_info["subject"]
        if subject not in self.subjects:
            raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
        return self.subjects[subject]

    def _find(self, subject: str, text: str) -> tuple[int, int] | None:
        """(version, id) of `text` under `subject`, if registered there."""
        identity = _normalized(text)
        for version, schema_id in enumerate(self.subjects.get(subject, []), start=1):
            if _normalized(self.schemas[schema_id - 1]) == identity:
                return version, schema_id
        return None

    def _add_version(self, subject: str, text: str) -> int:
        identity = _normalized(text)
        schema_id = next((n for n, known in enumerate(self.schemas, start=1) if _normalized(known) == identity), 0)
        if not schema_id:
            self.schemas.append(text)
            schema_id = len(self.schemas)
        self.subjects.setdefault(subject, []).append(schema_id)
        return schema_id

    def _problems(self, subject: str, text: str) -> list[str]:
        """Why `text` may not be the next version of `subject` under its compatibility level."""
        level = self.subject_compatibility.get(subject, self.compatibility)
        ids = self.subjects.get(subject, [])
        if level == "NONE" or not ids:
            return []
        candidate = json.loads(text)
        problems = []
        for version, schema_id in enumerate(ids, start=1):
            if not level.endswith("_TRANSITIVE") and version != len(ids):
                continue
            existing = json.loads(self.schemas[schema_id - 1])
            if level.startswith(("BACKWARD", "FULL")):
                problems += [f"reading version {version}: {p}" for p in read_problems(existing, candidate)]
            if level.startswith(("FORWARD", "FULL")):
                problems += [f"read by version {version}: {p}" for p in read_problems(candidate, existing)]
        return problems

    def _description(self, subject: str, version: int, schema_id: int) -> dict[str, Any]:
        return {"subject": subject, "version": version, "id": schema_id, "schema": self.schemas[schema_id - 1]}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type=CONTENT_TYPE)
