"""auth: reading a JWT's expiry without verifying it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from bridge.auth import (
    DETAIL_LIMIT,
    AuthRejected,
    AuthUnavailable,
    IssuedToken,
)
from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.support.harness import ime_settings
from tests.support.http_server import serving_post

PASSWORD = "s3cr3t p@ss&wörd"  # URL-encoding changes it


@asynccontextmanager
async def echoing_token_endpoint(status: int) -> AsyncIterator[str]:
    """A token endpoint on 127.0.0.1 that refuses every request and echoes the submitted form back."""

    async def issue(request: web.Request) -> web.Response:
        raw = (await request.read()).decode()
        form = await request.post()
        detail = f"no user {form.get('username')} with password {form.get('password')} (you sent {raw})"
        return web.json_response({"detail": detail, "input": dict(form)}, status=status)

    async with serving_post("/auth/user/token/issue", issue) as base_url:
        yield base_url


async def test_a_refusal_echoing_the_password_is_reported_without_it() -> None:
    async with echoing_token_endpoint(401) as base_url, aiohttp.ClientSession() as http:
        tokens = IssuedToken(http, ime_settings(base_url, password=PASSWORD))
        with pytest.raises(AuthRejected) as refused:
            await tokens.token()
        with pytest.raises(AuthRejected) as remembered:
            await tokens.token()  # the remembered refusal, without a request
    for error in (refused.value, remembered.value):
        for text in (str(error), repr(error)):
            assert "HTTP 401" in text
            assert PASSWORD not in text
            assert "s3cr3t" not in text
            assert "***" in text
        assert len(str(error)) <= len("token endpoint refused the credentials (HTTP 401): ") + DETAIL_LIMIT


async def test_a_short_lived_token_is_not_renewed_on_every_call_and_requests_are_spaced() -> None:
    async with Simulator(SimulatorConfig(contracts=1, token_ttl=4.0)) as simulator, aiohttp.ClientSession() as http:
        held_back = []
        settings = ime_settings(
            simulator.base_url,
            token_refresh_margin_seconds=120.0,  # longer than the token lives: clamped to a quarter of it
            token_request_interval_seconds=1.0,
        )
        tokens = IssuedToken(http, settings, on_held_back=lambda: held_back.append(1))
        first = await tokens.token()
        assert await tokens.token() == first, "not renewed on every call"
        assert simulator.counters.token_requests == 1
        tokens.invalidate(first)
        started = time.monotonic()
        await tokens.token()  # a second request within min_interval waits its turn
        assert time.monotonic() - started >= 0.9
        assert held_back == [1]


async def test_a_429_with_retry_after_holds_token_requests_back() -> None:
    async with Simulator(SimulatorConfig(contracts=1)) as simulator, aiohttp.ClientSession() as http:
        simulator.reject_token_requests(429, retry_after=30)
        tokens = IssuedToken(http, ime_settings(simulator.base_url))
        with pytest.raises(AuthUnavailable, match="HTTP 429"):
            await tokens.token()
        simulator.reject_token_requests(None)
        with pytest.raises(AuthUnavailable, match="retry in"):
            await tokens.token()
        assert simulator.counters.token_requests == 1, "no request before Retry-After has passed"
