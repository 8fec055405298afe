"""The IME simulator: the pure market (catalogue, generator, rendering) and the server over real sockets."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge.devtools.simulator import (
    GARBAGE_KINDS,
    PolicyCause,
    Simulator,
    SimulatorConfig,
    add_arguments,
    run_from_args,
)
from bridge.normalize import ContractDirectory, ContractUpdate, Normalizer, Rejected
from bridge.protocol import (
    MARKETS,
    STATIC_BY_ID_PATH,
    STATIC_BY_NAME_PATH,
    STATIC_SEARCH_PATH,
    TOKEN_PATH,
    Endpoint,
    authorization_header,
    live_url,
)

WAIT = 5.0  # deadline for conditions that should hold almost at once
CLOSE_MESSAGE_TOO_BIG = 1009


# --- the server


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(contracts=8, rate=400.0, record_sent=True)) as simulator:
        yield simulator


@contextlib.asynccontextmanager
async def live(
    simulator: Simulator,
    contracts: list[str] | None = None,
    *,
    endpoint: Endpoint = Endpoint.ID,
    token: str | None = "issue",
    bearer: bool = False,
    url: str | None = None,
    **options: Any,
) -> AsyncIterator[ClientConnection]:
    """A websockets client subscribed to `contracts` (default: the first contract's id)."""
    if url is None:
        identifiers = contracts if contracts is not None else [simulator.contracts[0].id]
        url = live_url(simulator.ws_url, endpoint, identifiers)
    if token == "issue":
        token = simulator.issue_token()
    headers = {} if token is None else {"Authorization": authorization_header(token, bearer=bearer)}
    async with connect(url, additional_headers=headers, open_timeout=WAIT, **options) as ws:
        yield ws


async def frames(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), WAIT)) for _ in range(count)]


async def close_of(ws: ClientConnection) -> ConnectionClosed:
    """Read until the connection closes; the exception says how."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                return closed


def close_code(closed: ConnectionClosed) -> int | None:
    return None if closed.rcvd is None else closed.rcvd.code


async def post_token(simulator: Simulator, form: dict[str, str]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(simulator.base_url + TOKEN_PATH, data=form) as response,
    ):
        return response.status, await response.json()


async def get(simulator: Simulator, path: str, params: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": token}
    async with (
        aiohttp.ClientSession() as session,
        session.get(simulator.base_url + path, params=params, headers=headers) as response,
    ):
        return response.status, await response.json()


async def admin(simulator: Simulator, action: str, **params: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{simulator.base_url}/admin/{action}", params=params) as response,
    ):
        return response.status, await response.json()


def jwt_claims(token: str, secret: str) -> dict[str, Any]:
    header, payload, signature = token.split(".")
    expected = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


@pytest.mark.parametrize(
    "form",
    [
        {"username": "demo", "password": "demo-password"},
        {"UserName_or_Email": "demo", "Password": "demo-password"},
    ],
)
async def test_token_endpoint_accepts_both_spellings(sim: Simulator, form: dict[str, str]) -> None:
    status, body = await post_token(sim, form)
    assert status == 201
    claims = jwt_claims(body["Authorization"], sim.config.jwt_secret)
    assert claims["sub"] == "demo"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["jti"]
    assert sim.counters.tokens_issued == 1


async def test_token_endpoint_refuses_bad_credentials_and_missing_fields(sim: Simulator) -> None:
    status, body = await post_token(sim, {"username": "demo", "password": "wrong"})
    assert (status, body) == (401, {"detail": "Incorrect username or password"})
    status, body = await post_token(sim, {"username": "demo"})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "password"]
    assert sim.counters.tokens_issued == 0


@pytest.mark.parametrize(("dialect", "key", "zone_suffix"), [("ht", "contractId", "Z"), ("legacy", "ContractId", "")])
async def test_id_endpoint_streams_subscribed_contracts_in_the_dialect(
    dialect: str, key: str, zone_suffix: str
) -> None:
    config = SimulatorConfig(contracts=8, rate=400.0, dialect=dialect)  # type: ignore[arg-type]
    async with Simulator(config) as simulator, live(simulator, ["1001", "1002"]) as ws:
        received = await frames(ws, 10)
    assert {frame[key] for frame in received} <= {"1001", "1002"}
    for frame in received:
        assert list(frame) == ["channel", key, "timestamp", "data"]
        assert frame["channel"] == "IME Stream"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}" + zone_suffix, frame["timestamp"])
        assert list(frame["data"]) == ["BestLimit", "Aggregate", "AllowedPriceRange", "ContractInfo"]


@pytest.mark.parametrize("bearer", [False, True])
async def test_raw_and_bearer_authorization_both_stream(sim: Simulator, bearer: bool) -> None:
    async with live(sim, bearer=bearer) as ws:
        assert (await frames(ws, 1))[0]["contractId"] == "1001"


@pytest.mark.parametrize("param", ["contract_name", "contract_names"])
async def test_name_endpoint_accepts_both_spellings(sim: Simulator, param: str) -> None:
    names = [sim.contracts[0].name, sim.contracts[1].name]
    url = f"{sim.ws_url}{Endpoint.NAME.path}?{param}={names[0]}&{param}={names[1]}"
    async with live(sim, url=url) as ws:
        received = await frames(ws, 6)
    assert {frame["contractName"] for frame in received} <= set(names)
    assert all("contractId" not in frame for frame in received)


@pytest.mark.parametrize("endpoint", list(Endpoint))
async def test_legacy_paths_stream(sim: Simulator, endpoint: Endpoint) -> None:
    contract = sim.contracts[0]
    identifier = contract.id if endpoint is Endpoint.ID else contract.name
    url = f"{sim.ws_url}{endpoint.legacy_path}?{endpoint.query_params[-1]}={identifier}"
    async with live(sim, url=url) as ws:
        frame = (await frames(ws, 1))[0]
        assert sim.connections[0].path == endpoint.legacy_path
    assert frame.get("contractId", frame.get("contractName")) == identifier


@pytest.mark.parametrize(
    ("token", "contracts", "cause"),
    [
        (None, ["1001"], PolicyCause.MISSING_TOKEN),
        ("not.a.jwt", ["1001"], PolicyCause.BAD_TOKEN),
        ("expired", ["1001"], PolicyCause.EXPIRED_TOKEN),
        ("issue", ["1001", "9999"], PolicyCause.UNKNOWN_CONTRACT),
        ("issue", [], PolicyCause.NO_CONTRACTS),
    ],
)
async def test_policy_violations_close_with_1008(
    sim: Simulator, token: str | None, contracts: list[str], cause: PolicyCause
) -> None:
    if token == "expired":
        token = sim.issue_token(ttl=-1)
    async with live(sim, contracts, token=token) as ws:
        closed = await close_of(ws)
    assert close_code(closed) == 1008
    assert closed.rcvd is not None
    assert closed.rcvd.reason == "Policy Violation"  # the same for every cause
    assert sim.counters.policy_closes == {cause: 1}
    assert sim.counters.connections_accepted == 1


async def test_a_tampered_token_is_refused(sim: Simulator) -> None:
    header, payload, signature = sim.issue_token().split(".")
    forged = f"{header}.{payload}.{signature[:-2]}AA"
    async with live(sim, token=forged) as ws:
        assert close_code(await close_of(ws)) == 1008
    assert sim.counters.policy_closes == {PolicyCause.BAD_TOKEN: 1}


async def test_static_lookups_answer_in_order_with_null_for_unknown(sim: Simulator) -> None:
    first, second = sim.contracts[0], sim.contracts[1]
    status, body = await get(sim, STATIC_BY_NAME_PATH, [("contract_names", second.name), ("contract_names", "NOPE")])
    assert status == 200
    assert body["Status"] == {"Code": 200, "Message": "OK"}
    assert body["Data"][0]["contractId"] == second.id
    assert body["Data"][1] is None
    status, body = await get(sim, STATIC_BY_ID_PATH, [("contract_ids", "42"), ("contract_ids", first.id)])
    assert status == 200
    assert [item and item["contractName"] for item in body["Data"]] == [None, first.name]


async def test_static_search_by_market(sim: Simulator) -> None:
    for market in MARKETS:
        status, body = await get(sim, STATIC_SEARCH_PATH, {"market": market})
        assert status == 200
        expected = [c.id for c in sim.contracts if c.market == market]
        assert [item["contractId"] for item in body["Data"]] == expected
        assert expected
    status, body = await get(sim, STATIC_SEARCH_PATH, {"market": "Nymex"})
    assert status == 422
    assert "market" in body["detail"]


async def test_static_lookups_need_no_token_but_refuse_a_bad_one(sim: Simulator) -> None:
    params = {"contract_ids": "1001"}
    assert (await get(sim, STATIC_BY_ID_PATH, params, token=sim.issue_token()))[0] == 200
    assert (await get(sim, STATIC_BY_ID_PATH, params, token="Bearer " + sim.issue_token()))[0] == 200
    status, body = await get(sim, STATIC_BY_ID_PATH, params, token="garbage")
    assert status == 401
    assert body["detail"]
    assert (await get(sim, STATIC_BY_ID_PATH))[0] == 422


async def test_only_subscribed_contracts_arrive_and_the_rate_is_an_upper_bound() -> None:
    rate = 40.0
    started = time.monotonic()  # before the generator starts: it can never be ahead of this clock
    async with Simulator(SimulatorConfig(contracts=4, rate=rate)) as simulator:
        async with live(simulator, ["1001", "1003"]) as ws:
            received = await frames(ws, 5)
            while simulator.counters.frames_sent < 15:
                received += await frames(ws, 1)
        elapsed = time.monotonic() - started
    assert {frame["contractId"] for frame in received} <= {"1001", "1003"}
    # All four contracts share the market's rate, so two of them can never get more than all of it.
    assert len(received) <= rate * elapsed + 1


async def test_recorded_frames_are_what_the_client_received(sim: Simulator) -> None:
    async with live(sim, ["1001", "1002"]) as ws:
        texts = [await asyncio.wait_for(ws.recv(), WAIT) for _ in range(8)]
        connection_id = sim.connections[0].id
    sent = sim.sent_frames(connection_id=connection_id)
    assert [frame.payload for frame in sent[:8]] == texts
    by_contract = sim.sent_frames(contract_id="1002")
    assert all(json.loads(frame.payload)["contractId"] == "1002" for frame in by_contract)


async def test_recording_is_opt_in() -> None:
    async with Simulator(SimulatorConfig(contracts=2)) as simulator:
        with pytest.raises(RuntimeError, match="record_sent"):
            simulator.sent_frames()


async def test_unpaced_prerendered_mode_streams_fresh_timestamps() -> None:
    config = SimulatorConfig(contracts=4, rate=0, prerender=True, prerender_variants=4, burst=16)
    ids = ["1001", "1002", "1003", "1004"]
    # Unbounded client queue: a paused websockets client cannot read the close reply behind a flood.
    async with Simulator(config) as simulator, live(simulator, ids, max_queue=None) as ws:
        received = await frames(ws, 200)
    assert {frame["contractId"] for frame in received} == {"1001", "1002", "1003", "1004"}
    assert len({frame["timestamp"] for frame in received}) > 1


async def test_counters_and_open_connections(sim: Simulator) -> None:
    async with live(sim, ["1002", "1001", "1002"]) as ws:
        await frames(ws, 1)
        [info] = sim.connections
        assert info.endpoint is Endpoint.ID
        assert info.contract_ids == {"1001", "1002"}
        assert info.identifiers == ("1002", "1001", "1002")
        assert (sim.counters.handshakes, sim.counters.connections_accepted) == (1, 1)
    await asyncio.wait_for(sim.wait_for(lambda: not sim.connections), WAIT)
    status, stats = await get(sim, "/admin/stats")
    assert status == 200
    assert stats["handshakes"] == 1
    assert stats["connections"] == []


# --- faults


async def test_drop_connections_sends_no_close_frame(sim: Simulator) -> None:
    async with live(sim) as ws:
        await frames(ws, 1)
        assert await sim.drop_connections() == 1
        closed = await close_of(ws)
    assert closed.rcvd is None


@pytest.mark.parametrize("via_admin", [False, True])
async def test_close_connections_with_a_code(sim: Simulator, via_admin: bool) -> None:
    async with live(sim) as first, live(sim) as second:
        await frames(first, 1)
        await frames(second, 1)
        if via_admin:
            assert await admin(sim, "close", code="1011") == (200, {"ok": True, "connections": 2})
        else:
            assert await sim.close_connections(1011) == 2
        assert close_code(await close_of(first)) == close_code(await close_of(second)) == 1011


async def test_stall_stops_data_and_pongs_until_resumed(sim: Simulator) -> None:
    async with live(sim, ping_interval=None) as ws:
        await frames(ws, 1)
        await asyncio.wait_for(await ws.ping(), WAIT)
        await sim.stall_and_settle(WAIT)
        sent = sim.counters.frames_sent
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(await ws.ping(), 0.5)
        assert sim.counters.frames_sent == sent
        sim.stall(False)
        await asyncio.wait_for(await ws.ping(), WAIT)
        await asyncio.wait_for(sim.wait_for(lambda: sim.counters.frames_sent > sent), WAIT)


async def test_stall_makes_a_keepalive_client_give_up(sim: Simulator) -> None:
    assert await admin(sim, "stall") == (200, {"ok": True, "stalled": True})
    async with live(sim, ping_interval=0.1, ping_timeout=0.3) as ws:
        closed = await close_of(ws)
    assert closed.sent is not None
    assert closed.sent.code == 1011  # websockets' "keepalive ping timeout"


@pytest.mark.parametrize(("code", "expected"), [(1011, 1011), (1000, 1000), (None, None)])
async def test_accept_then_close(sim: Simulator, code: int | None, expected: int | None) -> None:
    sim.accept_then_close(code=code)
    async with live(sim) as ws:
        assert close_code(await close_of(ws)) == expected
    assert sim.counters.connections_accepted == 1
    sim.accept_then_close(False)
    async with live(sim) as ws:
        await frames(ws, 1)


async def test_revoked_tokens_are_refused_but_new_ones_work(sim: Simulator) -> None:
    old = sim.issue_token()
    async with live(sim, token=old) as streaming:
        sim.revoke_tokens()
        await frames(streaming, 1)  # validated at the handshake only
        async with live(sim, token=old) as ws:
            assert close_code(await close_of(ws)) == 1008
        async with live(sim) as ws:
            await frames(ws, 1)
    assert sim.counters.policy_closes == {PolicyCause.REVOKED_TOKEN: 1}


async def test_expired_tokens_are_refused_and_new_ones_get_the_new_ttl(sim: Simulator) -> None:
    old = sim.issue_token()
    assert await admin(sim, "tokens/expire", ttl="5") == (200, {"ok": True, "token_ttl": 5.0})
    async with live(sim, token=old) as ws:
        assert close_code(await close_of(ws)) == 1008
    assert sim.counters.policy_closes == {PolicyCause.EXPIRED_TOKEN: 1}
    status, body = await post_token(sim, {"username": "demo", "password": "demo-password"})
    assert status == 201
    claims = jwt_claims(body["Authorization"], sim.config.jwt_secret)
    assert claims["exp"] - claims["iat"] in (5, 6)
    async with live(sim, token=body["Authorization"]) as ws:
        await frames(ws, 1)


async def test_invalidated_contracts_close_subscribers_and_refuse_new_ones(sim: Simulator) -> None:
    first, second = sim.contracts[0], sim.contracts[1]
    async with live(sim, [first.id, second.id]) as affected, live(sim, [second.id]) as unaffected:
        await frames(affected, 1)
        assert await sim.invalidate_contracts([first.name]) == 1
        assert close_code(await close_of(affected)) == 1008
        await frames(unaffected, 1)
    async with live(sim, [first.name], endpoint=Endpoint.NAME) as ws:
        assert close_code(await close_of(ws)) == 1008
    assert sim.counters.policy_closes == {PolicyCause.CONTRACT_INVALIDATED: 1, PolicyCause.INVALID_CONTRACT: 1}
    assert (await get(sim, STATIC_BY_ID_PATH, {"contract_ids": first.id}))[1]["Data"] != [None]
    sim.revalidate_contracts([first.id])
    async with live(sim, [first.id]) as ws:
        await frames(ws, 1)


async def test_delisted_contracts_vanish_from_the_static_lookups(sim: Simulator) -> None:
    first = sim.contracts[0]
    assert await admin(sim, "contracts/invalidate", contract=first.id, delist="1") == (
        200,
        {"ok": True, "connections": 0},
    )
    assert (await get(sim, STATIC_BY_ID_PATH, {"contract_ids": first.id}))[1]["Data"] == [None]
    body = (await get(sim, STATIC_SEARCH_PATH, {"market": first.market}))[1]
    assert first.id not in [item["contractId"] for item in body["Data"]]
    assert (await admin(sim, "contracts/revalidate", contract=first.name))[0] == 200
    assert (await get(sim, STATIC_BY_ID_PATH, {"contract_ids": first.id}))[1]["Data"][0]["contractId"] == first.id


async def test_invalidating_an_unknown_contract_is_an_error(sim: Simulator) -> None:
    status, body = await admin(sim, "contracts/invalidate", contract="NOPE")
    assert status == 400
    assert "NOPE" in body["detail"]


async def test_three_invalid_among_64_refuse_every_list_holding_one() -> None:
    async with Simulator(SimulatorConfig(contracts=64, rate=1000.0)) as simulator:
        catalogue = simulator.contracts
        invalid = {catalogue[5].id, catalogue[30].id, catalogue[63].id}
        status, body = await admin(
            simulator, "contracts/invalidate", contract=[catalogue[5].id, catalogue[30].name, catalogue[63].id]
        )
        assert (status, body) == (200, {"ok": True, "connections": 0})
        valid = [contract for contract in catalogue if contract.id not in invalid]
        for endpoint, key in ((Endpoint.ID, "id"), (Endpoint.NAME, "name")):
            async with live(simulator, [getattr(c, key) for c in catalogue], endpoint=endpoint) as ws:
                assert close_code(await close_of(ws)) == 1008
            async with live(simulator, [getattr(c, key) for c in valid], endpoint=endpoint) as ws:
                await frames(ws, 1)
        for start in range(0, 64, 8):
            group = catalogue[start : start + 8]
            async with live(simulator, [c.id for c in group]) as ws:
                if invalid.intersection(c.id for c in group):
                    assert close_code(await close_of(ws)) == 1008
                else:
                    await frames(ws, 1)
        assert simulator.counters.policy_closes[PolicyCause.INVALID_CONTRACT] == 2 + 3


@pytest.mark.parametrize("kind", GARBAGE_KINDS)
async def test_garbage_frames(sim: Simulator, kind: str) -> None:
    async with live(sim) as ws:
        await frames(ws, 1)
        assert await admin(sim, "garbage", kind=kind) == (200, {"ok": True, "connections": 1})
        async with asyncio.timeout(WAIT):
            while True:
                message = await ws.recv()
                normal = '{"channel": "IME Stream", "contractId": "1001", "timestamp": "'
                if isinstance(message, bytes) or not message.startswith(normal):
                    break
    if kind == "binary":
        assert isinstance(message, bytes)
        return
    assert isinstance(message, str)
    if kind == "text":
        with pytest.raises(json.JSONDecodeError):
            json.loads(message)
        return
    frame = json.loads(message)
    if kind == "missing_fields":
        assert "data" not in frame
        assert "contractId" not in frame
    else:
        assert frame["contractId"] == "1001"
        assert not isinstance(frame["timestamp"], str)
        assert isinstance(frame["data"]["BestLimit"]["1"]["buy_quantity"], str)


async def test_unknown_garbage_kind_is_refused(sim: Simulator) -> None:
    assert (await admin(sim, "garbage", kind="poetry"))[0] == 400
    with pytest.raises(ValueError, match="garbage kind"):
        sim.send_garbage("poetry")  # type: ignore[arg-type]


async def test_oversized_frames(sim: Simulator) -> None:
    async with live(sim, max_size=None) as ws:
        await frames(ws, 1)
        assert sim.send_oversized(50_000) == 1
        async with asyncio.timeout(WAIT):
            message: str | bytes = ""
            while len(message) < 1000:
                message = await ws.recv()
    assert len(message) == 50_000
    assert json.loads(message)["contractId"] == "1001"
    async with live(sim) as ws:  # websockets' default limit: 1 MiB, the default max_frame_bytes
        await frames(ws, 1)
        assert await admin(sim, "oversized") == (200, {"ok": True, "connections": 1})
        closed = await close_of(ws)
    assert closed.sent is not None
    assert closed.sent.code == CLOSE_MESSAGE_TOO_BIG


async def test_delayed_handshakes(sim: Simulator) -> None:
    assert (await admin(sim, "handshake/delay", seconds="0.5"))[0] == 200
    started = time.monotonic()
    async with live(sim) as ws:
        assert time.monotonic() - started >= 0.5
        await frames(ws, 1)
    sim.delay_handshakes(0)
    async with live(sim) as ws:
        await frames(ws, 1)


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
async def test_rejected_handshakes(sim: Simulator, status: int) -> None:
    sim.reject_handshakes(status)
    with pytest.raises(InvalidStatus) as rejected:
        async with live(sim):
            pass
    assert rejected.value.response.status_code == status
    assert rejected.value.response.headers.get("Retry-After") == ("1" if status in (429, 503) else None)
    assert sim.counters.connections_accepted == 0
    assert sim.counters.handshakes == 1
    assert await admin(sim, "handshake/reject") == (200, {"ok": True, "status": None})
    async with live(sim) as ws:
        await frames(ws, 1)


async def test_rejected_token_requests(sim: Simulator) -> None:
    good = {"username": "demo", "password": "demo-password"}
    assert await admin(sim, "token/reject", status="401") == (200, {"ok": True, "status": 401})
    assert (await post_token(sim, good))[0] == 401
    sim.reject_token_requests(503)
    assert (await post_token(sim, good))[0] == 503
    assert await admin(sim, "reset") == (200, {"ok": True})
    assert (await post_token(sim, good))[0] == 201


async def post_token_headers(simulator: Simulator) -> tuple[int, str | None]:
    """A token request with good credentials: its status and Retry-After header."""
    form = {"username": "demo", "password": "demo-password"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(simulator.base_url + TOKEN_PATH, data=form) as response,
    ):
        return response.status, response.headers.get("Retry-After")


async def handshake_refusal(simulator: Simulator) -> tuple[int, str | None]:
    with pytest.raises(InvalidStatus) as rejected:
        async with live(simulator):
            pass
    response = rejected.value.response
    return response.status_code, response.headers.get("Retry-After")


async def test_retry_after_of_rejected_handshakes_and_token_requests() -> None:
    async with Simulator(SimulatorConfig(contracts=2, retry_after_seconds=7)) as simulator:
        simulator.reject_handshakes(429)
        assert await handshake_refusal(simulator) == (429, "7")
        assert (await admin(simulator, "handshake/reject", status="503", retry_after="3"))[0] == 200
        assert await handshake_refusal(simulator) == (503, "3")
        simulator.reject_handshakes(500, retry_after=3)
        assert await handshake_refusal(simulator) == (500, None)
        simulator.reject_token_requests(503)
        assert await post_token_headers(simulator) == (503, "7")
        assert await admin(simulator, "token/reject", status="429", retry_after="4") == (
            200,
            {"ok": True, "status": 429},
        )
        assert await post_token_headers(simulator) == (429, "4")
        simulator.reject_token_requests(401, retry_after=4)
        assert await post_token_headers(simulator) == (401, None)
        assert (await admin(simulator, "token/reject", status="429", retry_after="-1"))[0] == 400
    async with Simulator(SimulatorConfig(contracts=2, retry_after_seconds=None)) as simulator:
        simulator.reject_handshakes(429)
        assert await handshake_refusal(simulator) == (429, None)
        simulator.reject_token_requests(429)
        assert await post_token_headers(simulator) == (429, None)


async def test_token_requests_are_rate_limited_with_retry_after() -> None:
    async with Simulator(SimulatorConfig(contracts=2, token_rate_limit_seconds=30)) as simulator:
        assert (await post_token_headers(simulator))[0] == 201
        assert await post_token_headers(simulator) == (429, "30")
        assert await post_token_headers(simulator) == (429, "30")
        assert simulator.counters.token_requests_rate_limited == 2
        assert simulator.counters.tokens_issued == 1
        assert await admin(simulator, "token/rate-limit", seconds="0") == (200, {"ok": True, "seconds": 0.0})
        assert await post_token_headers(simulator) == (201, None)
        assert await admin(simulator, "token/rate-limit", seconds="30") == (200, {"ok": True, "seconds": 30.0})
        status, retry_after = await post_token_headers(simulator)
        assert status == 429
        assert retry_after in ("29", "30")
        simulator.reset_faults()  # back to the config's limit
        assert (await post_token_headers(simulator))[0] == 429
        assert (await get(simulator, "/admin/stats"))[1]["token_requests_rate_limited"] == 4
    async with Simulator(SimulatorConfig(contracts=2)) as simulator:  # off by default
        for _ in range(3):
            assert (await post_token_headers(simulator))[0] == 201


async def test_tokens_expiring_while_streaming_close_with_1008() -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=200.0, close_on_token_expiry=True)) as simulator:
        token = simulator.issue_token(ttl=2)
        expires = jwt_claims(token, simulator.config.jwt_secret)["exp"]
        async with live(simulator, token=token) as ws:
            await frames(ws, 1)
            closed = await close_of(ws)
        assert time.time() >= expires - 0.01  # not before the token's exp
        assert close_code(closed) == 1008
        assert closed.rcvd is not None
        assert closed.rcvd.reason == "Policy Violation"
        assert simulator.counters.policy_closes == {PolicyCause.TOKEN_EXPIRED: 1}
        async with live(simulator) as ws:  # forced expiry closes streams at once too
            await frames(ws, 1)
            simulator.expire_tokens()
            assert close_code(await close_of(ws)) == 1008
        assert simulator.counters.policy_closes == {PolicyCause.TOKEN_EXPIRED: 2}


async def test_closing_on_token_expiry_is_a_runtime_switch(sim: Simulator) -> None:
    async with live(sim) as ws:
        await frames(ws, 1)
        sim.expire_tokens()  # off by default: a stream is checked at the handshake only
        await frames(ws, 1)
        assert await admin(sim, "tokens/close-on-expiry") == (200, {"ok": True, "enabled": True, "connections": 1})
        assert close_code(await close_of(ws)) == 1008
    assert sim.counters.policy_closes == {PolicyCause.TOKEN_EXPIRED: 1}
    assert await admin(sim, "tokens/close-on-expiry", enabled="0") == (
        200,
        {"ok": True, "enabled": False, "connections": 0},
    )


async def timed_close(ws: ClientConnection) -> float:
    started = time.monotonic()
    await ws.close()
    return time.monotonic() - started


@pytest.mark.parametrize("endpoint", list(Endpoint))
async def test_ignored_close_frames_make_the_client_wait_its_close_timeout(endpoint: Endpoint) -> None:
    config = SimulatorConfig(contracts=2, rate=200.0, ignore_close_frames=True)
    async with Simulator(config) as simulator:
        identifier = simulator.contracts[0].id if endpoint is Endpoint.ID else simulator.contracts[0].name
        async with live(simulator, [identifier], endpoint=endpoint, close_timeout=2) as ws:
            await frames(ws, 1)
            assert await timed_close(ws) >= 1.5
        assert ws.close_code == 1006  # no close frame came back
        assert simulator.counters.close_frames_ignored == 1
        await asyncio.wait_for(simulator.wait_for(lambda: not simulator.connections), WAIT)  # cleaned up
        simulator.ignore_close_frames(False)
        async with live(simulator, [identifier], endpoint=endpoint, close_timeout=2) as ws:
            await frames(ws, 1)
            assert await timed_close(ws) < 1.0
        assert ws.close_code == 1000


async def test_ignoring_close_frames_is_a_runtime_switch(sim: Simulator) -> None:
    async with live(sim, close_timeout=2) as ws:  # probe-like: closes right after its first frame
        await frames(ws, 1)
        assert await timed_close(ws) < 1.0
    assert await admin(sim, "ignore-close-frames") == (200, {"ok": True, "enabled": True})
    async with live(sim, close_timeout=30) as ws:
        await frames(ws, 1)
        closing = asyncio.create_task(ws.close())
        await asyncio.wait_for(sim.wait_for(lambda: sim.counters.close_frames_ignored == 1), WAIT)
        frames_sent = sim.counters.frames_sent
        await asyncio.wait_for(sim.wait_for(lambda: sim.counters.frames_sent > frames_sent), WAIT)  # streams on
        assert not closing.done()
        assert await admin(sim, "ignore-close-frames", enabled="0") == (200, {"ok": True, "enabled": False})
        await asyncio.wait_for(closing, WAIT)  # the waiting close frame is answered now
    assert ws.close_code == 1000
    await asyncio.wait_for(sim.wait_for(lambda: not sim.connections), WAIT)


async def test_admin_refuses_bad_parameters(sim: Simulator) -> None:
    assert (await admin(sim, "close", code="loud"))[0] == 400
    assert (await admin(sim, "stall", enabled="perhaps"))[0] == 400
    assert (await admin(sim, "handshake/reject", status="42"))[0] == 400


async def test_slow_consumers_are_closed() -> None:
    config = SimulatorConfig(contracts=1, rate=20_000.0, max_queue=100)
    async with Simulator(config) as simulator, live(simulator, max_queue=1) as ws:
        await asyncio.wait_for(simulator.wait_for(lambda: simulator.counters.slow_consumer_closes > 0), 20)
        assert close_code(await close_of(ws)) == 1011


async def test_stop_closes_clients_with_1001_and_is_idempotent() -> None:
    simulator = Simulator(SimulatorConfig(contracts=2))
    await simulator.start()
    async with live(simulator, ["1001", "1002"]) as ws:
        await frames(ws, 1)
        await simulator.stop()
        assert close_code(await close_of(ws)) == 1001
    await simulator.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(simulator, STATIC_SEARCH_PATH)


# --- CLI glue


@pytest.fixture
def cli_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--contracts", "3", "--rate", "5", "--dialect", "legacy", "--prerender"])


async def test_run_from_args_serves_until_cancelled(
    cli_args: argparse.Namespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (cli_args.port, cli_args.username, cli_args.token_ttl) == (0, "demo", 3600.0)
    task = asyncio.create_task(run_from_args(cli_args))
    output = ""
    async with asyncio.timeout(WAIT):
        while "ws://" not in output:
            await asyncio.sleep(0.01)  # polling captured output: there is nothing to await on
            output += capsys.readouterr().out
    match = re.search(r"http (http://\S+) ws (ws://\S+) username=demo password=demo-password", output)
    assert match
    async with aiohttp.ClientSession() as session, session.get(match[1] + STATIC_SEARCH_PATH) as response:
        assert len((await response.json())["Data"]) == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- bad frames mixed into the pre-rendered stream (the benchmark's rejection phase)


@pytest.mark.parametrize("endpoint", list(Endpoint))
async def test_prerendered_bad_frames_are_every_tenth_and_recorded_as_fault_frames(endpoint: Endpoint) -> None:
    config = SimulatorConfig(
        contracts=4, rate=0, prerender=True, prerender_variants=10, bad_frame_ratio=0.1, record_sent=True, burst=16
    )
    async with Simulator(config) as simulator:
        contracts = simulator.contracts
        identifiers = [contract.name if endpoint is Endpoint.NAME else contract.id for contract in contracts]
        async with live(simulator, identifiers, endpoint=endpoint, max_queue=None) as ws:
            received = [await asyncio.wait_for(ws.recv(), WAIT) for _ in range(400)]
        await asyncio.wait_for(simulator.wait_for(lambda: len(simulator.sent_frames()) >= 400), WAIT)
        sent = simulator.sent_frames()[:400]

    assert [frame.payload for frame in sent] == received
    bad = [index for index, frame in enumerate(sent) if frame.contract_id is None]
    assert bad == list(range(9, 400, 10))
    normalize = Normalizer(
        session_id="s",
        contracts=ContractDirectory({contract.id: contract.name for contract in contracts}),
    )
    outcomes = []
    for frame in sent:
        result = normalize(frame.payload, endpoint, 0)
        if frame.contract_id is not None:
            assert isinstance(result, ContractUpdate)
            assert result.contract_id == frame.contract_id
        elif isinstance(result, Rejected):
            outcomes.append(result.reason.value)
        else:  # well-formed, for a contract outside the catalogue: the bridge's pipeline refuses it
            assert (result.contract_id, result.contract_name) == ("999", "XX0999")
            outcomes.append("unknown_contract")
    # The 40 frames rendered hold 4 bad ones, of kinds json, frame, contract, json: sent 10 times over.
    assert collections.Counter(outcomes) == {"invalid_json": 20, "invalid_frame": 10, "unknown_contract": 10}
