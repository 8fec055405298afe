"""The OAUTHBEARER token provider against a local OAuth token endpoint (aiohttp, in process).

No broker handshake here: tansu (the test broker) accepts the OAUTHBEARER mechanism in its SASL handshake
but has no way to be given an issuer to validate tokens against, so it refuses every token. What is tested
is the client-credentials flow, the caching, the errors, and that aiokafka takes the provider.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.conn import OAuthAuthenticator
from aiokafka.errors import KafkaConnectionError

from bridge.config import KafkaSettings
from bridge.devtools.broker import free_port
from bridge.kafka_oauth import ClientCredentialsTokenProvider, TokenEndpointError
from bridge.sink import client_options
from tests.support.http_server import serving_post

SECRET = "s3cr3t-client-secret"


@dataclass
class TokenEndpoint:
    """A token endpoint: answers with `status` and `body` (or issues tokens), recording each request's form."""

    url: str = ""
    forms: list[dict[str, str]] = field(default_factory=list)
    status: int = 200
    body: dict[str, Any] | None = None
    expires_in: int | None = 3600
    delay: float = 0.0

    def settings(self, **extra: Any) -> KafkaSettings:
        """OAUTHBEARER settings pointing at this endpoint."""
        return KafkaSettings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="OAUTHBEARER",
            sasl_oauth_token_url=self.url,
            sasl_oauth_client_id="ime-bridge",
            sasl_oauth_client_secret=SECRET,
            request_timeout_ms=2000,
            **extra,
        )


@pytest.fixture
async def endpoint() -> AsyncIterator[TokenEndpoint]:
    state = TokenEndpoint()

    async def issue(request: web.Request) -> web.Response:
        state.forms.append({key: str(value) for key, value in (await request.post()).items()})
        await asyncio.sleep(state.delay)
        if state.body is not None or state.status != 200:
            return web.json_response(state.body or {}, status=state.status)
        answer: dict[str, Any] = {"access_token": f"token-{len(state.forms)}", "token_type": "Bearer"}
        if state.expires_in is not None:
            answer["expires_in"] = state.expires_in
        return web.json_response(answer)

    async with serving_post("/oauth2/token", issue) as base_url:
        state.url = f"{base_url}/oauth2/token"
        yield state


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_client_credentials_grant_posts_the_client_and_scope(endpoint: TokenEndpoint) -> None:
    provider = ClientCredentialsTokenProvider(endpoint.settings(sasl_oauth_scope="kafka.produce kafka.admin"))
    assert await provider.token() == "token-1"
    assert endpoint.forms == [
        {
            "grant_type": "client_credentials",
            "client_id": "ime-bridge",
            "client_secret": SECRET,
            "scope": "kafka.produce kafka.admin",
        }
    ]


async def test_without_a_scope_none_is_sent(endpoint: TokenEndpoint) -> None:
    await ClientCredentialsTokenProvider(endpoint.settings()).token()
    assert "scope" not in endpoint.forms[0]


async def test_the_token_is_reused_until_most_of_its_lifetime_passed(endpoint: TokenEndpoint) -> None:
    clock = Clock()
    provider = ClientCredentialsTokenProvider(endpoint.settings(), clock=clock)
    assert await provider.token() == "token-1"
    clock.now += 0.8 * 3600 - 1
    assert await provider.token() == "token-1"
    assert len(endpoint.forms) == 1
    clock.now += 1  # 80 % of the hour: renewed before it expires
    assert await provider.token() == "token-2"
    assert len(endpoint.forms) == 2


async def test_an_answer_without_expires_in_is_reused_for_the_default_lifetime(endpoint: TokenEndpoint) -> None:
    endpoint.expires_in = None
    clock = Clock()
    provider = ClientCredentialsTokenProvider(endpoint.settings(), clock=clock)
    await provider.token()
    clock.now += 0.8 * 300 - 1
    assert await provider.token() == "token-1"
    clock.now += 1
    assert await provider.token() == "token-2"


async def test_connections_opened_together_make_one_request(endpoint: TokenEndpoint) -> None:
    endpoint.delay = 0.2
    provider = ClientCredentialsTokenProvider(endpoint.settings())
    assert await asyncio.gather(*(provider.token() for _ in range(5))) == ["token-1"] * 5
    assert len(endpoint.forms) == 1


async def test_a_refusal_names_the_endpoint_and_oauth_error_never_the_secret(endpoint: TokenEndpoint) -> None:
    endpoint.status = 401
    endpoint.body = {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}
    with pytest.raises(TokenEndpointError) as refused:
        await ClientCredentialsTokenProvider(endpoint.settings()).token()
    message = str(refused.value)
    assert (
        message == f"TokenEndpointError: OAuth token endpoint {endpoint.url}: HTTP 401: invalid_client: bad secret ***"
    )
    assert SECRET not in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"token_type": "Bearer"}, "the answer has no access_token"),
        ({"access_token": "t", "expires_in": "soon"}, "bad expires_in 'soon'"),
    ],
)
async def test_an_unusable_answer_is_an_error(endpoint: TokenEndpoint, body: dict[str, Any], expected: str) -> None:
    endpoint.body = body
    with pytest.raises(TokenEndpointError, match=expected):
        await ClientCredentialsTokenProvider(endpoint.settings()).token()


async def test_an_unreachable_endpoint_is_a_connection_error_aiokafka_retries(endpoint: TokenEndpoint) -> None:
    endpoint.url = f"http://127.0.0.1:{free_port()}/oauth2/token"  # nothing listens there
    with pytest.raises(
        TokenEndpointError,
        match=r"^TokenEndpointError: OAuth token endpoint http://127\.0\.0\.1:\d+/oauth2/token: unreachable",
    ):
        await ClientCredentialsTokenProvider(endpoint.settings()).token()
    assert issubclass(TokenEndpointError, KafkaConnectionError)  # what aiokafka's bootstrap catches and retries


async def test_aiokafka_sends_the_token_in_its_oauthbearer_message(endpoint: TokenEndpoint) -> None:
    """The provider is what aiokafka's OAUTHBEARER authenticator asks, and its token goes in the message."""
    options = client_options(endpoint.settings())
    producer = AIOKafkaProducer(**options)  # aiokafka refuses a provider that is not an AbstractTokenProvider
    try:
        authenticator = OAuthAuthenticator(sasl_oauth_token_provider=options["sasl_oauth_token_provider"])
        payload, expect_response = await authenticator.step(None)
        assert payload == b"n,,\x01auth=Bearer token-1\x01\x01"
        assert expect_response
    finally:
        await producer.stop()
