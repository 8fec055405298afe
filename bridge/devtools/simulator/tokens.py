"""The simulator's token part: HS256 JWTs issued and checked with the standard library, and the token
endpoint with its faults (a status for every request, a rate limit)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from bridge.devtools.simulator.model import PolicyCause, SimulatorConfig, SimulatorCounters, retry_after_header
from bridge.protocol import PASSWORD_FIELDS, USERNAME_FIELDS


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


Claims = tuple[float, str]  # a token's exp and jti


class TokenAuthority:
    """Issues and checks HS256 JWTs (stdlib only), and remembers revocations and forced expiries."""

    _HEADER = _b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._issued: set[str] = set()
        self._revoked: set[str] = set()
        self._expired: set[str] = set()

    def issue(self, subject: str, ttl: float, now: float) -> str:
        jti = uuid.uuid4().hex
        claims = {"sub": subject, "iat": int(now), "exp": int(now + ttl), "jti": jti}
        signing_input = f"{self._HEADER}.{_b64encode(json.dumps(claims, separators=(',', ':')).encode())}"
        self._issued.add(jti)
        return f"{signing_input}.{self._sign(signing_input)}"

    def check(self, token: str, now: float) -> PolicyCause | None:
        """None when the token is good, else why not."""
        claims = self.claims(token)
        if claims is None:
            return PolicyCause.BAD_TOKEN
        if claims[1] in self._revoked:
            return PolicyCause.REVOKED_TOKEN
        if self.expired(claims, now):
            return PolicyCause.EXPIRED_TOKEN
        return None

    def claims(self, token: str) -> Claims | None:
        """A well-signed token's exp and jti; None for a bad token."""
        try:
            header, payload, signature = token.split(".")
            if not hmac.compare_digest(signature, self._sign(f"{header}.{payload}")):
                return None
            claims = json.loads(_b64decode(payload))
            return float(claims["exp"]), str(claims["jti"])
        except (ValueError, KeyError, TypeError):
            return None

    def expired(self, claims: Claims, now: float) -> bool:
        expires, jti = claims
        return expires <= now or jti in self._expired

    def revoke_all(self) -> None:
        self._revoked |= self._issued

    def expire_all(self) -> None:
        self._expired |= self._issued

    def _sign(self, signing_input: str) -> str:
        return _b64encode(hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest())


class TokenEndpoint:
    """`POST TOKEN_PATH`: checks the credentials and issues tokens; plays the endpoint's fault modes."""

    def __init__(self, config: SimulatorConfig, counters: SimulatorCounters, notify: Callable[[], None]) -> None:
        self.config = config
        self.counters = counters
        self.authority = TokenAuthority(config.jwt_secret)
        self._notify = notify
        self.status: int | None = None  # answer every request with this status (None: normal)
        self.retry_after: int | None = None  # None: the config's retry_after_seconds
        self.rate_limit = config.token_rate_limit_seconds
        self._last_request: float | None = None  # monotonic time of the last one not rate-limited

    def issue(self, ttl: float | None = None) -> str:
        """A valid token for the configured user, living `ttl` seconds (default: the config's token_ttl)."""
        self.counters.tokens_issued += 1
        token = self.authority.issue(self.config.username, self.config.token_ttl if ttl is None else ttl, time.time())
        self._notify()
        return token

    def reset(self) -> None:
        """Back to normal answers and the config's rate limit."""
        self.status = self.retry_after = None
        self.rate_limit = self.config.token_rate_limit_seconds

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one token request."""
        self.counters.token_requests += 1
        now = time.monotonic()
        if self.rate_limit > 0 and self._last_request is not None:
            remaining = self._last_request + self.rate_limit - now
            if remaining > 0:
                self.counters.token_requests_rate_limited += 1
                self._notify()
                retry_after = {"Retry-After": str(math.ceil(remaining))}
                return web.json_response({"detail": "too many token requests"}, status=429, headers=retry_after)
        self._last_request = now
        if self.status is not None:
            headers = retry_after_header(self.status, self._retry_after_seconds())
            return web.json_response({"detail": "token issuing is unavailable"}, status=self.status, headers=headers)
        form = await request.post()
        values: dict[str, str] = {}
        for fields in (USERNAME_FIELDS, PASSWORD_FIELDS):
            value = next((form[name] for name in fields if name in form), None)
            if not isinstance(value, str):
                missing = [{"loc": ["body", fields[0]], "msg": "Field required", "type": "missing"}]
                return web.json_response({"detail": missing}, status=422)
            values[fields[0]] = value
        good = hmac.compare_digest(
            values[USERNAME_FIELDS[0]].encode(), self.config.username.encode()
        ) & hmac.compare_digest(values[PASSWORD_FIELDS[0]].encode(), self.config.password.encode())
        if not good:
            return web.json_response({"detail": "Incorrect username or password"}, status=401)
        return web.json_response({"Authorization": self.issue()}, status=201)

    def _retry_after_seconds(self) -> int | None:
        return self.config.retry_after_seconds if self.retry_after is None else self.retry_after
