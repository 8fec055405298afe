"""SASL OAUTHBEARER for Kafka: access tokens from an OAuth 2.0 token endpoint (client-credentials grant).

aiokafka asks `token()` whenever it opens a broker connection. The token is fetched once and reused until
REFRESH_FRACTION of its lifetime has passed (the default of Kafka's Java client), so that connections opened
together make one request and none is opened with a token about to expire. The client authenticates in the
form body (`client_id` and `client_secret`, RFC 6749 section 2.3.1), which identity providers accept.

A failure raises TokenEndpointError, a KafkaConnectionError: aiokafka treats it as a broker it cannot reach,
so the bridge retries the start as for any Kafka outage. Its message names the endpoint, the HTTP status and
the server's OAuth error, never the secret or the token.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaConnectionError

from bridge.config import KafkaSettings

REFRESH_FRACTION = 0.8
DEFAULT_LIFETIME_SECONDS = 300.0  # when the answer has no expires_in (it is only RECOMMENDED)
_DETAIL_LIMIT = 200


class TokenEndpointError(KafkaConnectionError):  # type: ignore[misc]  # aiokafka is untyped
    """The token endpoint could not be reached, refused the client, or answered something unusable."""


class ClientCredentialsTokenProvider(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """aiokafka's token provider over the client-credentials grant, caching the token until near expiry."""

    def __init__(self, settings: KafkaSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        if settings.sasl_oauth_token_url is None or settings.sasl_oauth_client_id is None:
            raise ValueError("kafka.sasl_oauth_token_url and kafka.sasl_oauth_client_id are required")
        if settings.sasl_oauth_client_secret is None:
            raise ValueError("kafka.sasl_oauth_client_secret is required")
        self._url = str(settings.sasl_oauth_token_url)
        self._secret = settings.sasl_oauth_client_secret.get_secret_value()
        self._form = {
            "grant_type": "client_credentials",
            "client_id": settings.sasl_oauth_client_id,
            "client_secret": self._secret,
            **({"scope": settings.sasl_oauth_scope} if settings.sasl_oauth_scope else {}),
        }
        self._timeout = aiohttp.ClientTimeout(total=settings.request_timeout_ms / 1000)
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A current access token: the cached one, or a new one once REFRESH_FRACTION of its lifetime passed."""
        async with self._lock:  # concurrent connections wait for the one request in flight
            if self._token is None or self._clock() >= self._refresh_at:
                requested = self._clock()
                self._token, lifetime = await self._request()
                self._refresh_at = requested + lifetime * REFRESH_FRACTION
            return self._token

    async def _request(self) -> tuple[str, float]:
        """Ask the endpoint for a token: (token, lifetime in seconds)."""
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(self._url, data=self._form, headers={"Accept": "application/json"}) as response,
            ):
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenEndpointError(
                f"OAuth token endpoint {self._url}: unreachable: {type(exc).__name__}: {exc}"
            ) from None
        return token_from_answer(self._url, status, body, self._secret)


def token_from_answer(url: str, status: int, body: bytes, secret: str) -> tuple[str, float]:
    """The token endpoint's answer read: (access token, lifetime in seconds, finite and not negative).

    Pure, for whatever bytes a server sends: anything but a usable 200 answer raises TokenEndpointError
    naming `url` and the server's OAuth error (RFC 6749 section 5.2), never `secret`.
    """
    answer = _json_object(body)
    if status != 200:
        parts = [str(answer[key]) for key in ("error", "error_description") if answer.get(key)]
        error = (": ".join(parts) or "no error given").replace(secret, "***")[:_DETAIL_LIMIT]
        raise TokenEndpointError(f"OAuth token endpoint {url}: HTTP {status}: {error}")
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenEndpointError(f"OAuth token endpoint {url}: the answer has no access_token")
    expires_in = answer.get("expires_in", DEFAULT_LIFETIME_SECONDS)
    try:
        lifetime = float(expires_in)
    except (TypeError, ValueError, OverflowError):
        lifetime = math.nan
    if not math.isfinite(lifetime):  # NaN or infinity would never refresh the token
        raise TokenEndpointError(f"OAuth token endpoint {url}: bad expires_in {str(expires_in)[:40]!r}")
    return token, max(lifetime, 0.0)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested past the parser's depth
        return {}
    return value if isinstance(value, dict) else {}
