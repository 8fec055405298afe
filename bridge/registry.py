"""The Confluent Schema Registry: value schemas registered at start, ids cached, the wire-format prefix.

With `schema_registry:` configured, every update value goes out in Confluent's wire format: magic byte 0,
the schema id as a 4-byte big-endian integer, then the Avro body. Schemas are registered under the
topic-name strategy (`<topic>-value`) once per process and topic, or only looked up there with
`auto_register` off (registries where producers may not register); the records never wait for the registry.

This wraps confluent-kafka's `SchemaRegistryClient` (the optional `registry` extra, imported only when a
SchemaRegistry is used, so that the framing helpers serve `tail` without it), which is synchronous: each call
runs in a worker thread under a deadline and is retried with backoff. Its errors are translated here, at the
boundary: a registry that cannot be reached (refused, timed out, a 5xx after the retries, any other error answer,
an unreadable one) is `SinkUnavailable`, so the bridge retries its start and stays unready; one that
refuses the schema (incompatible, invalid) is `SchemaRejected`, and refused credentials, unreadable TLS
files or a certificate that fails verification are `SinkFatal`: retrying cannot fix those, the process
must stop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from bridge.config import SchemaRegistrySettings
from bridge.encode import Schema
from bridge.records import SinkFatal, SinkUnavailable
from bridge.retry import Backoff

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

T = TypeVar("T")

MAGIC_BYTE = 0
_PREFIX = struct.Struct(">bI")
# Statuses after which the same call may succeed (as confluent-kafka's own client judges them).
_RETRIABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_REFUSED_SCHEMA_STATUSES = frozenset({409, 422})  # incompatible; invalid schema
_REFUSED_CREDENTIALS_STATUSES = frozenset({401, 403})


MISSING_CLIENT = (
    "schema_registry is configured but its client, confluent-kafka, is not installed: "
    "pip install 'ime-bridge[registry]'"
)


def client_installed() -> bool:
    """Whether the Schema Registry client (the `registry` extra) is installed, without importing it."""
    return importlib.util.find_spec("confluent_kafka") is not None


class RegistryClientMissing(SinkFatal):
    """A registry is configured but the `registry` extra is not installed: no retry can fix that."""

    def __init__(self) -> None:
        super().__init__(MISSING_CLIENT)


class SchemaRejected(SinkFatal):
    """The registry refused to register a schema under a subject (incompatible, or invalid)."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"the schema registry refused the schema for subject {subject!r}: {reason}")
        self.subject = subject
        self.reason = reason


def value_subject(topic: str) -> str:
    """The subject of `topic`'s values under the topic-name strategy (the Confluent serializers' default)."""
    return f"{topic}-value"


def wire_prefix(schema_id: int) -> bytes:
    """The 5 bytes that precede an Avro body in Confluent's wire format."""
    return _PREFIX.pack(MAGIC_BYTE, schema_id)


def split_framed(value: bytes) -> tuple[int, bytes] | None:
    """(schema id, Avro body) of a value in Confluent's wire format, or None when it is not framed."""
    if len(value) < _PREFIX.size or value[0] != MAGIC_BYTE:
        return None
    _, schema_id = _PREFIX.unpack_from(value)
    return schema_id, value[_PREFIX.size :]


def client_config(settings: SchemaRegistrySettings) -> dict[str, Any]:
    """confluent-kafka's SchemaRegistryClient configuration; its own retries are off (see SchemaRegistry)."""
    config: dict[str, Any] = {
        "url": str(settings.url).rstrip("/"),
        "timeout": settings.timeout_seconds,
        "max.retries": 0,
    }
    if settings.username is not None and settings.password is not None:
        config["basic.auth.user.info"] = f"{settings.username}:{settings.password.get_secret_value()}"
    if settings.ssl_cafile is not None:
        config["ssl.ca.location"] = str(settings.ssl_cafile)
    if settings.ssl_certfile is not None:
        config["ssl.certificate.location"] = str(settings.ssl_certfile)
    if settings.ssl_keyfile is not None:
        config["ssl.key.location"] = str(settings.ssl_keyfile)
    return config


def _certificate_failure(error: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class SchemaRegistry:
    """Registry calls off the event loop, each under `timeout_seconds`, retried `retries` times with backoff."""

    def __init__(
        self, settings: SchemaRegistrySettings, *, backoff: Callable[[], Backoff] = lambda: Backoff(0.2, 5.0)
    ) -> None:
        if not client_installed():
            raise RegistryClientMissing()
        self.settings = settings
        self.url = str(settings.url).rstrip("/")
        self._backoff = backoff
        self._client: SchemaRegistryClient | None = None
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, Schema] = {}

    async def register(self, topic: str, schema: Schema) -> int:
        """The id of `schema` under `topic`'s value subject, registering it on first use (then cached)."""
        subject = value_subject(topic)
        text = json.dumps(schema.definition, separators=(",", ":"), ensure_ascii=False)
        cached = self._ids.get((subject, text))
        if cached is not None:
            return cached
        from confluent_kafka.schema_registry import Schema as RegistrySchema

        candidate = RegistrySchema(text, "AVRO")
        if self.settings.auto_register:
            schema_id = await self._call(
                f"registering {subject}", lambda client: client.register_schema(subject, candidate), subject=subject
            )
        else:
            found = await self._call(
                f"looking up the schema under {subject}",
                lambda client: client.lookup_schema(subject, candidate),
                subject=subject,
                refused=_REFUSED_SCHEMA_STATUSES | {404},
            )
            if found.schema_id is None:
                raise SinkUnavailable(f"schema registry {self.url} answered a lookup under {subject} without an id")
            schema_id = found.schema_id
        self._ids[(subject, text)] = schema_id
        return schema_id

    async def schema(self, schema_id: int) -> Schema:
        """The schema registered with `schema_id` (cached): what a framed value was written with."""
        cached = self._schemas.get(schema_id)
        if cached is None:
            found = await self._call(f"looking up schema id {schema_id}", lambda client: client.get_schema(schema_id))
            definition = json.loads(found.schema_str or "null")
            if not isinstance(definition, dict) or "name" not in definition:
                raise SinkUnavailable(f"schema id {schema_id} in {self.url} is not an Avro named schema")
            name, namespace = definition["name"], definition.get("namespace")
            full_name = f"{namespace}.{name}" if namespace and "." not in name else name
            cached = self._schemas[schema_id] = Schema(name=full_name, definition=definition)
        return cached

    async def subjects(self) -> list[str]:
        """The registry's subjects: a read-only call that shows it answers and accepts the credentials."""
        return await self._call("listing the subjects", lambda client: list(client.get_subjects()))

    def close(self) -> None:
        """Close the HTTP session (ids stay cached; a later call opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _call(
        self,
        what: str,
        call: Callable[[SchemaRegistryClient], T],
        *,
        subject: str | None = None,
        refused: frozenset[int] = _REFUSED_SCHEMA_STATUSES,
    ) -> T:
        if self._client is None:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            try:
                self._client = SchemaRegistryClient(client_config(self.settings))
            except (OSError, ValueError) as exc:  # an unreadable CA, certificate or key file
                raise SinkFatal(f"cannot set up the schema registry client for {self.url}: {exc}") from exc
        client = self._client
        backoff = self._backoff()
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.settings.timeout_seconds):
                    return await asyncio.to_thread(call, client)
            except Exception as exc:
                error = self._translate(exc, what, subject, refused)
            if attempt < attempts:
                await asyncio.sleep(backoff.next_delay())
        raise SinkUnavailable(
            f"schema registry {self.url} unavailable ({what}, {attempts} attempts): {error}"
        ) from error

    def _translate(self, error: Exception, what: str, subject: str | None, refused: frozenset[int]) -> Exception:
        """Raise what retrying cannot fix; return what it may (the registry down, slow or failing)."""
        from confluent_kafka.schema_registry import SchemaRegistryError

        if isinstance(error, SchemaRegistryError):
            status = error.http_status_code
            if subject is not None and status == 404 and status in refused:
                reason = f"{error.error_message}; with schema_registry.auto_register off it must be registered first"
                raise SchemaRejected(subject, reason) from error
            if subject is not None and status in refused:
                raise SchemaRejected(subject, error.error_message) from error
            if status in _REFUSED_CREDENTIALS_STATUSES:
                raise SinkFatal(f"the schema registry {self.url} refused the credentials ({what}): {error}") from error
            if status not in _RETRIABLE_STATUSES:
                raise SinkUnavailable(f"schema registry {self.url}, {what}: {error}") from error
            return error
        if isinstance(error, TimeoutError):
            return TimeoutError(f"no answer within {self.settings.timeout_seconds}s")
        # The HTTP layer's errors: refused, reset, TLS, an unreadable answer.
        failure = _certificate_failure(error)
        if failure is not None:
            raise SinkFatal(f"TLS verification of the schema registry {self.url} failed: {failure}") from error
        return error
