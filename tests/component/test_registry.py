"""bridge/registry.py against the registry test double (tests/support/schema_registry_double.py).

The double is itself checked against confluent-kafka's `SchemaRegistryClient`, the reference client: if
the real client did not accept it, these tests would say nothing about a real registry.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError

from bridge.devtools.broker import free_port
from bridge.records import SinkFatal, SinkUnavailable
from bridge.registry import SchemaRejected, value_subject
from tests.support.schema_registry_double import SchemaRegistryDouble
from tests.support.tlsproxy import Pki, make_pki
from tests.unit.test_registry import SCHEMA, registry


def incompatible_update_schema() -> dict[str, Any]:
    """The current schema with `sequence` turned from long into string: it cannot read older data."""
    definition = json.loads(json.dumps(SCHEMA.definition))
    next(field for field in definition["fields"] if field["name"] == "sequence")["type"] = "string"
    return definition


@pytest.fixture
async def double() -> AsyncIterator[SchemaRegistryDouble]:
    async with SchemaRegistryDouble() as running:
        yield running


async def test_registers_under_the_topic_value_subject_and_caches_the_id(double: SchemaRegistryDouble) -> None:
    client = registry(double.url)
    schema_id = await client.register("ime.contract.updates", SCHEMA)
    assert double.subjects == {"ime.contract.updates-value": [schema_id]}
    assert json.loads(double.schemas[schema_id - 1]) == SCHEMA.definition  # docs included, for consumers
    assert await client.register("ime.contract.updates", SCHEMA) == schema_id
    assert double.registrations() == 1  # the second answer came from the cache
    # The same schema under the state topic's subject: a second subject, the same id.
    assert await client.register("ime.contract.state", SCHEMA) == schema_id
    assert set(double.subjects) == {value_subject("ime.contract.updates"), value_subject("ime.contract.state")}
    client.close()


async def test_looks_schemas_up_by_id(double: SchemaRegistryDouble) -> None:
    schema_id = double.register("some-value", SCHEMA.definition)
    client = registry(double.url)
    found = await client.schema(schema_id)
    assert (found.name, found.definition, found.fingerprint) == (SCHEMA.name, SCHEMA.definition, SCHEMA.fingerprint)
    assert await client.schema(schema_id) is found
    assert len([path for _, path in double.requests if path.startswith("/schemas/ids/")]) == 1
    with pytest.raises(SinkUnavailable, match="not found"):
        await client.schema(schema_id + 1)
    client.close()


async def test_an_incompatible_schema_is_fatal_and_names_the_subject_and_the_reason(
    double: SchemaRegistryDouble,
) -> None:
    double.compatibility = "BACKWARD_TRANSITIVE"
    double.register("updates-value", incompatible_update_schema())
    client = registry(double.url, retries=3)
    with pytest.raises(SchemaRejected) as rejected:
        await client.register("updates", SCHEMA)
    assert isinstance(rejected.value, SinkFatal)
    assert rejected.value.subject == "updates-value"
    assert "incompatible" in rejected.value.reason
    assert "string is not long" in rejected.value.reason or "long is not string" in rejected.value.reason
    assert "'updates-value'" in str(rejected.value)
    assert double.registrations() == 1  # refused is final: no retry
    client.close()


async def test_with_auto_register_off_the_id_is_looked_up_and_nothing_registered(double: SchemaRegistryDouble) -> None:
    schema_id = double.register("updates-value", SCHEMA.definition)
    client = registry(double.url, auto_register=False)
    assert await client.register("updates", SCHEMA) == schema_id
    assert double.registrations() == 0
    client.close()


async def test_with_auto_register_off_a_schema_not_registered_stops_the_start(double: SchemaRegistryDouble) -> None:
    client = registry(double.url, auto_register=False, retries=3)
    with pytest.raises(SchemaRejected) as rejected:
        await client.register("updates", SCHEMA)
    assert rejected.value.subject == "updates-value"
    assert "auto_register off" in rejected.value.reason
    assert double.subjects == {}  # nothing registered
    assert len([path for method, path in double.requests if method == "POST"]) == 1  # refused is final: no retry
    client.close()


async def test_a_failing_registry_is_retried_then_answers(double: SchemaRegistryDouble) -> None:
    double.fail_with, double.failures_left = 503, 2
    client = registry(double.url, retries=2)
    assert await client.register("updates", SCHEMA) == 1
    assert double.registrations() == 3
    client.close()


async def test_a_registry_still_failing_after_the_retries_is_unavailable(double: SchemaRegistryDouble) -> None:
    double.fail_with = 503
    client = registry(double.url, retries=2)
    with pytest.raises(SinkUnavailable, match=r"unavailable \(registering updates-value, 3 attempts\)"):
        await client.register("updates", SCHEMA)
    assert double.registrations() == 3
    double.fail_with = None
    assert await client.register("updates", SCHEMA) == 1  # nothing was cached from the failures
    client.close()


async def test_a_registry_that_is_down_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    client = registry(f"http://127.0.0.1:{port}", retries=1)
    with pytest.raises(SinkUnavailable, match=f"schema registry http://127.0.0.1:{port} unavailable"):
        await client.register("updates", SCHEMA)
    client.close()


async def test_each_call_has_a_deadline() -> None:
    """A registry that accepts connections and never answers: each attempt ends at timeout_seconds."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = registry(f"http://127.0.0.1:{port}", timeout_seconds=0.3, retries=1)
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(SinkUnavailable, match=r"no answer within 0.3s"):
            await client.register("updates", SCHEMA)
        assert asyncio.get_running_loop().time() - started < 3
        assert len(connections) >= 1
    finally:
        client.close()
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_basic_auth() -> None:
    async with SchemaRegistryDouble(username="bridge", password="s3cret") as double:
        client = registry(double.url, username="bridge", password="s3cret")
        assert await client.register("updates", SCHEMA) == 1
        client.close()
        wrong = registry(double.url, username="bridge", password="not-it", retries=3)
        with pytest.raises(SinkFatal, match="refused the credentials") as refused:
            await wrong.register("other", SCHEMA)
        assert not isinstance(refused.value, SchemaRejected)
        assert "not-it" not in str(refused.value)
        assert double.registrations() == 2  # refused credentials are not retried
        wrong.close()


# --- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def mutual_tls(pki: Pki) -> ssl.SSLContext:
    """A server context that presents the server certificate and requires a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_mutual_tls_with_the_configured_ca_and_client_certificate(pki: Pki) -> None:
    async with SchemaRegistryDouble(ssl_context=mutual_tls(pki)) as double:
        assert double.url.startswith("https://")
        client = registry(double.url, ssl_cafile=pki.ca, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key)
        assert await client.register("updates", SCHEMA) == 1
        client.close()
        without_certificate = registry(double.url, ssl_cafile=pki.ca, retries=0)
        with pytest.raises(SinkUnavailable):  # the server refuses the handshake: nothing to verify on our side
            await without_certificate.register("updates", SCHEMA)
        without_certificate.close()


async def test_a_certificate_that_fails_verification_is_fatal(pki: Pki) -> None:
    """Without the private CA the registry's certificate cannot be verified: retrying cannot fix that."""
    async with SchemaRegistryDouble(ssl_context=mutual_tls(pki)) as double:
        client = registry(double.url, retries=3)
        with pytest.raises(SinkFatal, match="TLS verification of the schema registry"):
            await client.register("updates", SCHEMA)
        client.close()


# --- the double, as confluent-kafka's own client sees it ---------------------------------------------


async def test_the_double_speaks_the_api_the_reference_client_uses(double: SchemaRegistryDouble) -> None:
    def exercise() -> None:
        client = SchemaRegistryClient({"url": double.url})
        text = json.dumps(SCHEMA.definition)
        schema_id = client.register_schema("t-value", RegistrySchema(text, "AVRO"))
        assert client.get_schema(schema_id).schema_str == text
        assert client.get_subjects() == ["t-value"]
        assert client.get_versions("t-value") == [1]
        latest = client.get_latest_version("t-value")
        assert (latest.schema_id, latest.version, latest.subject) == (schema_id, 1, "t-value")
        assert client.lookup_schema("t-value", RegistrySchema(text, "AVRO")).version == 1
        assert client.get_compatibility() == "BACKWARD"
        # The registry answers {"compatibility": level}; the client passes the body through.
        assert client.set_compatibility("t-value", "BACKWARD_TRANSITIVE") == {"compatibility": "BACKWARD_TRANSITIVE"}
        assert client.get_compatibility("t-value") == "BACKWARD_TRANSITIVE"
        incompatible = RegistrySchema(json.dumps(incompatible_update_schema()), "AVRO")
        assert client.test_compatibility("t-value", incompatible) is False
        assert client.test_compatibility("t-value", RegistrySchema(text, "AVRO")) is True
        with pytest.raises(SchemaRegistryError) as conflict:
            client.register_schema("t-value", incompatible)
        assert (conflict.value.http_status_code, conflict.value.error_code) == (409, 409)
        with pytest.raises(SchemaRegistryError) as missing:
            client.get_schema(99)
        assert (missing.value.http_status_code, missing.value.error_code) == (404, 40403)
        with pytest.raises(SchemaRegistryError) as invalid:
            client.register_schema("u-value", RegistrySchema('{"type": "record"}', "AVRO"))
        assert (invalid.value.http_status_code, invalid.value.error_code) == (422, 42201)
        client.close()

    await asyncio.to_thread(exercise)
