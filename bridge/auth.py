"""Tokens for the IME WebSocket: a static token, or one issued by the token endpoint and renewed.

The bridge is not the token's verifier: it reads the JWT's `exp` only to renew ahead of expiry.
Errors from the HTTP library are translated here into AuthRejected (credentials refused: retrying
soon will not help) and AuthUnavailable (the endpoint failed: retry with backoff). Neither the token
nor the password ever appears in an exception message or a log line: a refusal is described by its HTTP
status and the server's `detail`, with the password redacted (a server may echo the submitted form) and
capped at DETAIL_LIMIT characters, never by the response body verbatim.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Protocol

import aiohttp

from bridge import protocol
from bridge.config import ImeSettings

DETAIL_LIMIT = 200
REDACTED = "***"


class AuthError(Exception):
    """Base of the token errors."""


class AuthRejected(AuthError):
    """The token endpoint refused the credentials."""


class AuthUnavailable(AuthError):
    """The token endpoint could not be reached or failed."""


class TokenProvider(Protocol):
    """What the source needs from auth: a current token, and a way to say it was refused."""

    async def token(self) -> str:
        """A token believed valid now."""
        ...

    def invalidate(self, token: str) -> None:
        """`token` was refused by the server: the next `token()` must not return it."""
        ...

    @property
    def expires_at(self) -> float | None:
        """Unix time at which the current token expires, when known."""
        ...


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (no signature check), or None when absent or unreadable."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return float(expiry) if isinstance(expiry, int | float) else None


class StaticToken:
    """A token from configuration. Invalidation cannot replace it, so a refusal stays visible."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        """The configured token."""
        return self._token

    def invalidate(self, token: str) -> None:
        """Nothing to renew: the source keeps reporting the refusal."""

    @property
    def expires_at(self) -> float | None:
        """The configured token's `exp`, if it has one."""
        return jwt_expiry(self._token)


class IssuedToken:
    """Issues tokens from `POST {base_url}/auth/user/token/issue` and renews them before expiry."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: ImeSettings,
        *,
        on_issue: Callable[[str, float | None], None] | None = None,
        on_held_back: Callable[[], None] | None = None,
    ) -> None:
        """`settings` has ime.username and ime.password (the config requires them when there is no ime.token)."""
        assert settings.username is not None
        assert settings.password is not None
        password = settings.password.get_secret_value()
        self._session = session
        self._url = str(settings.base_url).rstrip("/") + protocol.TOKEN_PATH
        user_field, password_field = (
            (protocol.USERNAME_FIELDS[1], protocol.PASSWORD_FIELDS[1])
            if settings.token_form == "sdk"
            else (protocol.USERNAME_FIELDS[0], protocol.PASSWORD_FIELDS[0])
        )
        self._form = {user_field: settings.username, password_field: password}
        self._secrets = (password,)
        self._refresh_margin = settings.token_refresh_margin_seconds
        self._timeout = aiohttp.ClientTimeout(total=settings.http_timeout_seconds)
        self._token: str | None = None
        self._expires_at: float | None = None
        self._issued_at = 0.0
        # Requests are spaced by min_interval (shared by every connection and probe), or by a 429's Retry-After.
        self._min_interval = settings.token_request_interval_seconds
        self._next_request_at = 0.0  # monotonic
        self._on_held_back = on_held_back
        self._lock = asyncio.Lock()
        self._rejected_backoff = settings.auth_rejected_backoff_seconds
        self._rejected: tuple[float, AuthRejected] | None = None
        self._on_issue = on_issue

    @property
    def expires_at(self) -> float | None:
        """Expiry of the current token, when it has one."""
        return self._expires_at

    async def token(self) -> str:
        """The current token, issuing a new one when there is none or it is about to expire.

        A refusal of the credentials is remembered for `rejected_backoff` seconds: every caller gets it
        again without a request, so many connections cannot hammer the endpoint with bad credentials.
        """
        async with self._lock:
            if self._token is None or self._expiring():
                if self._rejected is not None and time.monotonic() < self._rejected[0]:
                    raise self._rejected[1]
                await self._wait_for_turn()
                try:
                    token = await self._issue()
                except AuthRejected as exc:
                    self._rejected = (time.monotonic() + self._rejected_backoff, exc)
                    self._report("rejected", None)
                    raise
                except AuthUnavailable:
                    self._report("error", None)
                    raise
                self._rejected = None
                self._token, self._expires_at, self._issued_at = token, jwt_expiry(token), time.time()
                self._report("ok", self._expires_at)
            return self._token

    async def _wait_for_turn(self) -> None:
        """Space token requests: wait out min_interval; refuse at once while a 429's Retry-After runs longer."""
        wait = self._next_request_at - time.monotonic()
        if wait > self._min_interval:
            raise AuthUnavailable(f"token endpoint asked to retry in {wait:.0f} s")
        if wait > 0:
            if self._on_held_back is not None:
                self._on_held_back()
            await asyncio.sleep(wait)
        self._next_request_at = time.monotonic() + self._min_interval

    def _report(self, outcome: str, expires_at: float | None) -> None:
        if self._on_issue is not None:
            self._on_issue(outcome, expires_at)

    async def refresh_ahead(self) -> None:
        """Keep a fresh token ready (run as a task): renew `refresh_margin` before each expiry.

        Renewing does not interrupt open connections; the token is only sent in handshakes, so every
        reconnect finds a valid one instead of meeting a 1008.
        """
        while True:
            with contextlib.suppress(AuthError):  # logged and counted by the callers and the metrics
                await self.token()
            expires_at = self._expires_at
            if expires_at is None:
                delay = self._rejected_backoff if self._rejected is not None else self._refresh_margin
            else:
                delay = max(1.0, expires_at - self._margin() - time.time())
            await asyncio.sleep(delay)

    def invalidate(self, token: str) -> None:
        """Forget `token` if it is still the current one."""
        if token == self._token:
            self._token = None
            self._expires_at = None

    def _margin(self) -> float:
        """The refresh margin, at most a quarter of the current token's lifetime: a short-lived token is renewed
        once per three quarters of its life, not on every call."""
        if self._expires_at is None:
            return self._refresh_margin
        return min(self._refresh_margin, (self._expires_at - self._issued_at) / 4)

    def _expiring(self) -> bool:
        return self._expires_at is not None and time.time() >= self._expires_at - self._margin()

    async def _issue(self) -> str:
        try:
            async with self._session.post(self._url, data=self._form, timeout=self._timeout) as response:
                status = response.status
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AuthUnavailable(f"token endpoint unreachable: {type(exc).__name__}") from exc
        if status in (400, 401, 403, 422):
            detail = redacted_detail(body, self._secrets)
            raise AuthRejected(f"token endpoint refused the credentials (HTTP {status}): {detail}")
        if not 200 <= status < 300:
            retry_after = protocol.retry_after_seconds(response.headers.get("Retry-After"))
            if retry_after is not None:
                self._next_request_at = max(self._next_request_at, time.monotonic() + retry_after)
            raise AuthUnavailable(f"token endpoint answered HTTP {status}")
        try:
            token = json.loads(body)["Authorization"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthUnavailable("token endpoint answered without an Authorization field") from exc
        if not isinstance(token, str) or not token:
            raise AuthUnavailable("token endpoint answered an empty Authorization field")
        return protocol.strip_bearer(token)


def redacted_detail(body: bytes, secrets: Iterable[str]) -> str:
    """The `detail` of an error answer, fit for a log line: every form of each secret replaced by `***`
    (as sent, URL-encoded, JSON-escaped) and any password form field's value too, then capped at
    DETAIL_LIMIT characters. "no detail" when the body has none."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return "no detail"
    if not detail:
        return "no detail"
    text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False, default=str)
    return _redact(text, secrets)[:DETAIL_LIMIT]


_FIELDS = "|".join(re.escape(field) for field in protocol.PASSWORD_FIELDS)
# A password form field echoed as a form (`password=…`) or as JSON (`"password": "…"`).
_PASSWORD_FIELD = re.compile(rf'(?<![\w])((?:{_FIELDS})=)[^&\s]*|("(?:{_FIELDS})"\s*:\s*")(?:[^"\\]|\\.)*"')


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if not secret:
            continue
        forms = {
            secret,
            urllib.parse.quote_plus(secret),
            urllib.parse.quote(secret, safe=""),
            json.dumps(secret, ensure_ascii=False)[1:-1],
            json.dumps(secret)[1:-1],
        }
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, REDACTED)
    return _PASSWORD_FIELD.sub(_redact_field, text)


def _redact_field(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return match.group(1) + REDACTED
    return match.group(2) + REDACTED + '"'
