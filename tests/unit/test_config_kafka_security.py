"""Kafka security settings: mutual TLS and SASL OAUTHBEARER keys, refused with the key when inconsistent,
and the aiokafka options `client_options` builds from them (shared by the producer, the admin client, tail)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from aiokafka.abc import AbstractTokenProvider

from bridge.config import ConfigError, KafkaSettings, load_settings
from bridge.kafka_oauth import ClientCredentialsTokenProvider
from bridge.records import SinkFatal
from bridge.sink import client_options
from tests.support.tlsproxy import Pki, make_pki

IME = "ime:\n  username: demo\n  password: pw\n  contract_ids: ['1001']\n"
OAUTH = (
    "  security_protocol: SASL_SSL\n  sasl_mechanism: OAUTHBEARER\n"
    "  sasl_oauth_token_url: https://idp.example/oauth2/token\n  sasl_oauth_client_id: ime-bridge\n"
)


def problems(tmp_path: Path, kafka: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(IME + "kafka:\n" + kafka)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


@pytest.mark.parametrize(
    ("kafka", "expected"),
    [
        (
            "  security_protocol: SSL\n  ssl_keyfile: /k.pem\n",
            "kafka: kafka.ssl_keyfile needs kafka.ssl_certfile",
        ),
        (
            "  security_protocol: SSL\n  ssl_key_password: pw\n",
            "kafka: kafka.ssl_key_password needs kafka.ssl_certfile",
        ),
        (
            "  ssl_certfile: /c.pem\n  ssl_keyfile: /k.pem\n",
            "kafka: kafka.ssl_certfile needs kafka.security_protocol SSL or SASL_SSL",
        ),
        (
            "  security_protocol: SASL_SSL\n  sasl_mechanism: OAUTHBEARER\n",
            "kafka: kafka.sasl_mechanism OAUTHBEARER needs kafka.sasl_oauth_token_url and "
            "kafka.sasl_oauth_client_id and kafka.sasl_oauth_client_secret",
        ),
        (
            OAUTH,
            "kafka: kafka.sasl_mechanism OAUTHBEARER needs kafka.sasl_oauth_client_secret",
        ),
        (
            "  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n  sasl_username: u\n  sasl_password: p\n"
            "  sasl_oauth_token_url: https://idp.example/token\n",
            "kafka: kafka.sasl_oauth_token_url: only for kafka.sasl_mechanism OAUTHBEARER",
        ),
        (
            "  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n",
            "kafka: kafka.sasl_mechanism PLAIN needs kafka.sasl_username and kafka.sasl_password",
        ),
        (
            "  sasl_mechanism: PLAIN\n  sasl_username: u\n  sasl_password: p\n",
            "kafka: kafka.sasl_mechanism needs kafka.security_protocol SASL_PLAINTEXT or SASL_SSL",
        ),
        (
            "  security_protocol: SASL_SSL\n",
            "kafka: kafka.security_protocol SASL_SSL needs kafka.sasl_mechanism",
        ),
        (
            OAUTH.replace("https://idp.example/oauth2/token", "ftp://idp.example/token")
            + "  sasl_oauth_client_secret: s\n",
            "kafka.sasl_oauth_token_url: URL scheme should be 'http' or 'https'",
        ),
    ],
    ids=[
        "key-without-cert",
        "key-password-without-cert",
        "cert-without-tls",
        "oauth-without-anything",
        "oauth-without-secret",
        "oauth-keys-with-scram",
        "plain-without-credentials",
        "mechanism-without-sasl-protocol",
        "sasl-protocol-without-mechanism",
        "token-url-not-http",
    ],
)
def test_inconsistent_security_is_refused_naming_the_keys(tmp_path: Path, kafka: str, expected: str) -> None:
    assert problems(tmp_path, kafka) == [expected]


def test_oauth_client_secret_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IME_BRIDGE_KAFKA__SASL_OAUTH_CLIENT_SECRET", "from-a-secret")
    path = tmp_path / "config.yaml"
    path.write_text(IME + "kafka:\n" + OAUTH)
    kafka = load_settings(path).kafka
    assert kafka.sasl_oauth_client_secret is not None
    assert kafka.sasl_oauth_client_secret.get_secret_value() == "from-a-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls(pki: Pki, **extra: Any) -> KafkaSettings:
    return KafkaSettings(security_protocol="SSL", ssl_cafile=pki.ca, **extra)


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    options = client_options(KafkaSettings())
    assert options["ssl_context"] is None
    assert "sasl_mechanism" not in options


def test_the_client_certificate_is_in_the_tls_context(pki: Pki) -> None:
    context = client_options(tls(pki, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key))["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # The CA is loaded for verifying the brokers (the client certificate is not listed by get_ca_certs).
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "test CA"),),)]


def test_a_certificate_and_key_in_one_file_need_no_keyfile(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "client-bundle.pem"
    bundle.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    assert isinstance(client_options(tls(pki, ssl_certfile=bundle))["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ("cert-only", "kafka.ssl_certfile {cert} (no kafka.ssl_keyfile): cannot load the client certificate and key"),
        ("missing-key", "kafka.ssl_certfile {cert}, kafka.ssl_keyfile {missing}: cannot load"),
        ("wrong-key", "kafka.ssl_certfile {cert}, kafka.ssl_keyfile {wrong}: cannot load"),
    ],
)
def test_unloadable_client_files_are_fatal_naming_the_keys(pki: Pki, tmp_path: Path, files: str, expected: str) -> None:
    missing = tmp_path / "absent.key"
    key = {"cert-only": None, "missing-key": missing, "wrong-key": pki.stranger_key}[files]
    with pytest.raises(SinkFatal) as fatal:
        client_options(tls(pki, ssl_certfile=pki.client_cert, ssl_keyfile=key))
    assert str(fatal.value).startswith(
        expected.format(cert=pki.client_cert, missing=missing, wrong=pki.stranger_key)
    ), str(fatal.value)


def test_an_unreadable_ca_bundle_is_fatal_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(SinkFatal, match=r"^kafka\.ssl_cafile .*absent\.pem: cannot load the CA bundle"):
        client_options(KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "absent.pem"))


def test_scram_passes_the_user_and_password() -> None:
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
    )
    options = client_options(settings)
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "u",
        "p",
    )


def test_oauthbearer_passes_a_client_credentials_token_provider(pki: Pki) -> None:
    settings = KafkaSettings(
        security_protocol="SASL_SSL",
        ssl_cafile=pki.ca,
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_url="https://idp.example/oauth2/token",
        sasl_oauth_client_id="ime-bridge",
        sasl_oauth_client_secret="s",
    )
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "OAUTHBEARER"
    assert isinstance(options["sasl_oauth_token_provider"], ClientCredentialsTokenProvider)
    assert isinstance(options["sasl_oauth_token_provider"], AbstractTokenProvider)  # what aiokafka checks
    assert "sasl_plain_password" not in options
    assert isinstance(options["ssl_context"], ssl.SSLContext)
