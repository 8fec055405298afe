"""The OAuth token endpoint's answer, read from whatever bytes a server sends (bridge/kafka_oauth.py)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.kafka_oauth import TokenEndpointError, token_from_answer

URL, SECRET = "https://idp.example/token", "s3cr3t"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def read(status: int, body: bytes) -> tuple[str, float] | None:
    """The token and lifetime, or None when refused with TokenEndpointError (never any other exception)."""
    try:
        return token_from_answer(URL, status, body, SECRET)
    except TokenEndpointError as exc:
        message = str(exc)
    assert SECRET not in message
    return None


@given(st.integers(100, 599), st.binary(max_size=2000))
def test_any_bytes_give_a_token_or_a_token_endpoint_error(status: int, body: bytes) -> None:
    read(status, body)


@given(st.dictionaries(st.sampled_from(["access_token", "expires_in", "error", "error_description"]), json_values))
def test_any_json_answer_gives_a_finite_lifetime_or_a_token_endpoint_error(answer: dict[str, object]) -> None:
    got = read(200, json.dumps(answer).encode())
    if got is not None:
        token, lifetime = got
        assert token == answer["access_token"]
        assert math.isfinite(lifetime)
        assert lifetime >= 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"access_token": "t", "expires_in": NaN}',
        b'{"access_token": "t", "expires_in": Infinity}',
        b'{"access_token": "t", "expires_in": 1e400}',
        b'{"access_token": "t", "expires_in": ' + b"9" * 400 + b"}",
    ],
)
def test_a_lifetime_that_would_never_refresh_the_token_is_refused(body: bytes) -> None:
    with pytest.raises(TokenEndpointError, match="bad expires_in"):
        token_from_answer(URL, 200, body, SECRET)


def test_a_refusal_nested_past_the_parser_depth_is_read_as_no_error_given() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(TokenEndpointError, match="HTTP 401: no error given"):
        token_from_answer(URL, 401, body, SECRET)
