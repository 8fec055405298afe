"""auth: reading a JWT's expiry without verifying it."""

from __future__ import annotations

import base64
import json

import pytest

from bridge.auth import (
    StaticToken,
    jwt_expiry,
    redacted_detail,
)
from bridge.protocol import authorization_header, strip_bearer


def jwt(claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(claims)}.signature"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (jwt({"exp": 1_800_000_000}), 1_800_000_000.0),
        (jwt({"exp": 1.5, "sub": "x"}), 1.5),
        (jwt({"sub": "no exp"}), None),
        (jwt(["not", "an", "object"]), None),
        (jwt({"exp": "soon"}), None),
        ("not-a-jwt", None),
        ("a.%%%.c", None),
    ],
)
def test_jwt_expiry(token: str, expected: float | None) -> None:
    assert jwt_expiry(token) == expected


async def test_static_token_survives_invalidation() -> None:
    provider = StaticToken(jwt({"exp": 42}))
    provider.invalidate(await provider.token())
    assert await provider.token() == jwt({"exp": 42})
    assert provider.expires_at == 42


def test_authorization_header_spellings() -> None:
    assert authorization_header("abc") == "abc"
    assert authorization_header("abc", bearer=True) == "Bearer abc"
    assert strip_bearer("Bearer abc") == "abc"
    assert strip_bearer("bearer  abc ") == "abc"
    assert strip_bearer("abc") == "abc"


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ("wrong password hunter2", "wrong password ***"),
        ("form was username=demo&password=hunter2", "form was username=demo&password=***"),
        ("form was username=demo&Password=other", "form was username=demo&Password=***"),
        ({"password": "other", "username": "demo"}, '{"password": "***", "username": "demo"}'),
        ("no password here", "no password here"),
        ("", "no detail"),
    ],
)
def test_redacted_detail(detail: object, expected: str) -> None:
    assert redacted_detail(json.dumps({"detail": detail}).encode(), ["hunter2"]) == expected


def test_redacted_detail_is_capped_after_redaction() -> None:
    body = json.dumps({"detail": "x" * 195 + "hunter2" + "y" * 500}).encode()
    assert redacted_detail(body, ["hunter2"]) == "x" * 195 + "***yy"
    assert redacted_detail(b"<html>hunter2</html>", ["hunter2"]) == "no detail"
