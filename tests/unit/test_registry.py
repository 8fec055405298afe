"""bridge/registry.py against the registry test double (tests/support/schema_registry_double.py).

The double is itself checked against confluent-kafka's `SchemaRegistryClient`, the reference client: if
the real client did not accept it, these tests would say nothing about a real registry.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bridge.config import SchemaRegistrySettings, load_settings
from bridge.encode import load_schema
from bridge.records import SinkFatal
from bridge.registry import SchemaRegistry, split_framed, wire_prefix
from bridge.retry import Backoff

SCHEMA = load_schema()


def no_wait() -> Backoff:
    """A backoff that retries at once, so that retry tests take no time."""
    return Backoff(0.0, 0.0, random.Random(0))


def registry(url: str, **settings: Any) -> SchemaRegistry:
    return SchemaRegistry(SchemaRegistrySettings.model_validate({"url": url, **settings}), backoff=no_wait)


def test_wire_prefix_is_magic_byte_and_big_endian_id() -> None:
    assert wire_prefix(1) == b"\x00\x00\x00\x00\x01"
    assert wire_prefix(0x01020304) == b"\x00\x01\x02\x03\x04"
    assert split_framed(wire_prefix(258) + b"body") == (258, b"body")
    assert split_framed(b"\x08" + b"1001 and so on") is None  # a plain ContractUpdate: its first byte is not 0
    assert split_framed(b"\x00\x00\x01") is None  # too short for the prefix


@pytest.mark.parametrize(
    ("section", "refusal"),
    [
        ({"url": "https://user:pw@registry:8081"}, "must not carry credentials"),
        ({"url": "https://registry:8081", "username": "bridge"}, "username and schema_registry.password go together"),
        ({"url": "https://registry:8081", "ssl_keyfile": "/k.pem"}, "ssl_keyfile needs schema_registry.ssl_certfile"),
        ({"url": "http://registry:8081", "ssl_cafile": "/ca.pem"}, r"ssl_\* options need an https:// url"),
        ({"url": "ftp://registry"}, "URL scheme should be 'http' or 'https'"),
        ({"url": "https://registry:8081", "retries": -1}, "greater than or equal to 0"),
        ({"url": "https://registry:8081", "timeout_seconds": 0}, "greater than 0"),
    ],
    ids=[
        "credentials-in-url",
        "user-without-password",
        "key-without-cert",
        "tls-over-http",
        "scheme",
        "retries",
        "timeout",
    ],
)
def test_bad_registry_settings_are_refused(section: dict[str, Any], refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        SchemaRegistrySettings.model_validate(section)


def test_the_registry_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD", "from-a-secret")
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps(
            {
                "ime": {"token": "t", "contract_ids": ["1"]},
                "schema_registry": {"url": "https://registry:8081", "username": "bridge"},
            }
        )
    )
    settings = load_settings(path)
    assert settings.schema_registry is not None
    assert settings.schema_registry.password is not None
    assert settings.schema_registry.password.get_secret_value() == "from-a-secret"
    assert "from-a-secret" not in repr(settings)


async def test_an_unreadable_certificate_file_is_fatal(tmp_path: Path) -> None:
    client = registry("https://127.0.0.1:1", ssl_cafile=tmp_path / "missing-ca.pem")
    with pytest.raises(SinkFatal, match="cannot set up the schema registry client"):
        await client.register("updates", SCHEMA)
