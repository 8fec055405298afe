"""SASL OAUTHBEARER against a real broker handshake, as far as tansu goes.

tansu 0.6 with `--authentication` accepts the OAUTHBEARER mechanism in its SaslHandshake but cannot be told
which issuer's tokens to trust (its CLI has no such option), so it refuses every token with
SaslAuthenticationFailed. No test here pretends otherwise: they show that the bridge's producer fetches its
token from the token endpoint during the handshake and presents it to the broker, which refuses it; and that
a token endpoint refusing the client is named in the start's error. A successful OAUTHBEARER publish needs a
broker that validates tokens (Apache Kafka with an OAuth validator), which this environment does not have.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web

from bridge.config import KafkaSettings
from bridge.devtools.broker import free_port, tansu_binary
from bridge.records import SinkUnavailable
from bridge.sink import KafkaSink
from tests.support.http_server import serving_post

pytestmark = pytest.mark.integration


@pytest.fixture
def authenticating_broker() -> Iterator[str]:
    """tansu requiring SASL authentication, on a free loopback port: its bootstrap server."""
    port = free_port()
    process = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{port}",
            "--storage-engine",
            "memory://tansu/",
            "--authentication",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"tansu exited with {process.returncode}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert time.monotonic() < deadline, "tansu did not listen within 30 s"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
async def token_endpoint() -> AsyncIterator[dict[str, Any]]:
    """An OAuth token endpoint issuing tokens, or refusing when state["refuse"]; state["forms"] records requests."""
    state: dict[str, Any] = {"forms": [], "refuse": False}

    async def issue(request: web.Request) -> web.Response:
        state["forms"].append(dict(await request.post()))
        if state["refuse"]:
            return web.json_response({"error": "invalid_client", "error_description": "unknown client"}, status=401)
        return web.json_response({"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 3600})

    async with serving_post("/token", issue) as base_url:
        state["url"] = f"{base_url}/token"
        yield state


def oauth_settings(bootstrap: str, token_url: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=[bootstrap],
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_url=token_url,
        sasl_oauth_client_id="ime-bridge",
        sasl_oauth_client_secret="s3cr3t",
        enable_idempotence=False,
        request_timeout_ms=2000,
    )


async def test_the_token_is_fetched_and_presented_in_the_handshake_which_tansu_refuses(
    authenticating_broker: str, token_endpoint: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings = oauth_settings(authenticating_broker, token_endpoint["url"])
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(SinkUnavailable) as failed:
        await KafkaSink(settings).start()
    assert token_endpoint["forms"]
    assert token_endpoint["forms"][0] == {
        "grant_type": "client_credentials",
        "client_id": "ime-bridge",
        "client_secret": "s3cr3t",
    }
    # The broker got as far as checking the token: the SASL mechanism was accepted, the token refused.
    assert any("SaslAuthenticationFailed" in record.getMessage() for record in caplog.records)
    assert "Unable to bootstrap" in str(failed.value)


async def test_a_token_endpoint_refusing_the_client_is_named_in_the_start_error(
    authenticating_broker: str, token_endpoint: dict[str, Any]
) -> None:
    token_endpoint["refuse"] = True
    with pytest.raises(SinkUnavailable) as failed:
        await KafkaSink(oauth_settings(authenticating_broker, token_endpoint["url"])).start()
    message = str(failed.value)
    assert f"OAuth token endpoint {token_endpoint['url']}: HTTP 401: invalid_client: unknown client" in message
    assert "s3cr3t" not in message
