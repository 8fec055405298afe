"""source, auth and catalog against the project's IME simulator on 127.0.0.1 (no Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve

from bridge import source as source_module
from bridge.auth import AuthRejected, IssuedToken, StaticToken, TokenProvider, jwt_expiry
from bridge.catalog import HttpContractCatalog
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.metrics import Metrics
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.source import WebSocketSource
from tests.support.harness import ime_settings
from tests.support.waiting import assert_holds, wait_for


@dataclass
class Captured:
    """A frame handler that keeps each frame of the bursts it is given."""

    frames: list[tuple[bytes, int, ConnectionInfo]] = field(default_factory=list)

    def __call__(self, burst: list[bytes], receive_time: int, info: ConnectionInfo) -> None:
        self.frames.extend((raw, receive_time, info) for raw in burst)

    def count(self, subscription: str) -> int:
        return sum(1 for _, _, info in self.frames if info.subscription.name == subscription)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(contracts=6, rate=200)) as running:
        yield running


def source_for(
    simulator: Simulator, tokens: TokenProvider, *, bearer: bool = False
) -> tuple[WebSocketSource, Captured, Metrics]:
    captured, metrics = Captured(), Metrics()
    source = WebSocketSource(
        settings=ime_settings(simulator.base_url, bearer=bearer, reconnect_min_seconds=0.01, reconnect_max_seconds=0.2),
        tokens=tokens,
        handler=captured,
        metrics=metrics,
    )
    return source, captured, metrics


def reconnects(metrics: Metrics, endpoint: str, reason: str) -> float:
    value = metrics.registry.get_sample_value("ime_bridge_reconnects_total", {"endpoint": endpoint, "reason": reason})
    return value or 0.0


def policy(metrics: Metrics, reason: str) -> float:
    labels = {"endpoint": "id", "reason": reason}
    return metrics.registry.get_sample_value("ime_bridge_policy_rejections_total", labels) or 0.0


async def test_frames_from_both_endpoints_arrive_with_their_connection(simulator: Simulator) -> None:
    ids = Subscription("id-0", Endpoint.ID, tuple(c.id for c in simulator.contracts[:3]))
    names = Subscription("name-0", Endpoint.NAME, tuple(c.name for c in simulator.contracts[3:]))
    source, captured, metrics = source_for(simulator, StaticToken(simulator.issue_token()))
    await source.apply([ids, names])
    try:
        await wait_for(lambda: captured.count("id-0") >= 5 and captured.count("name-0") >= 5)
        assert source.connections_up == 2
        assert metrics.registry.get_sample_value("ime_bridge_connections") == 2
        assert metrics.registry.get_sample_value("ime_bridge_subscribed_contracts") == 6
    finally:
        await source.stop()
    assert all(
        b"contractName" in (raw if isinstance(raw, bytes) else raw.encode())
        for raw, _, info in captured.frames
        if info.subscription.endpoint is Endpoint.NAME
    )
    assert source.connections_up == 0
    assert all(receive_time > 1_700_000_000_000_000 for _, receive_time, _ in captured.frames)


async def test_connections_a_plan_drops_close_at_once_against_a_server_that_does_not_answer_closes() -> None:
    """Each close waits up to CLOSE_TIMEOUT for the server's answer: one after another, a handover of many
    shards took that many seconds. Sent at once, every close frame is out before the first close ends."""
    async with Simulator(SimulatorConfig(contracts=3, rate=50, ignore_close_frames=True)) as simulator:
        plan = [Subscription(f"id-{n}", Endpoint.ID, (c.id,)) for n, c in enumerate(simulator.contracts)]
        source, _, _ = source_for(simulator, StaticToken(simulator.issue_token()))
        await source.apply(plan)
        try:
            await wait_for(lambda: source.connections_up == 3)
            dropping = asyncio.create_task(source.apply([]))
            await wait_for(lambda: source.connections_up < 3, within=10)
            assert simulator.counters.close_frames_ignored == 3
            await dropping
        finally:
            await source.stop()


@pytest.mark.parametrize("bearer", [False, True])
async def test_both_authorization_spellings_are_accepted(simulator: Simulator, bearer: bool) -> None:
    subscription = Subscription("id-0", Endpoint.ID, (simulator.contracts[0].id,))
    source, captured, _ = source_for(simulator, StaticToken(simulator.issue_token()), bearer=bearer)
    await source.apply([subscription])
    try:
        await wait_for(lambda: len(captured.frames) >= 2)
    finally:
        await source.stop()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("drop", "connection_lost"), ("close_1011", "server_error"), ("close_1000", "closed_by_server")],
)
async def test_dropped_connections_are_reopened_and_classified(simulator: Simulator, fault: str, reason: str) -> None:
    subscription = Subscription("id-0", Endpoint.ID, tuple(c.id for c in simulator.contracts))
    source, captured, metrics = source_for(simulator, StaticToken(simulator.issue_token()))
    await source.apply([subscription])
    try:
        await wait_for(lambda: len(captured.frames) >= 3)
        if fault == "drop":
            assert await simulator.drop_connections() == 1
        else:
            assert await simulator.close_connections(int(fault.removeprefix("close_"))) == 1
        await wait_for(lambda: reconnects(metrics, "id", reason) == 1, what=f"reconnect with reason {reason}")
        before = len(captured.frames)
        await wait_for(lambda: len(captured.frames) > before + 3, what="frames after the reconnect")
        assert {info.attempt for _, _, info in captured.frames} == {1, 2}
    finally:
        await source.stop()


async def test_repeated_1008s_on_a_token_that_cannot_be_renewed_never_blame_a_contract(simulator: Simulator) -> None:
    subscription = Subscription("id-0", Endpoint.ID, (simulator.contracts[0].id,))
    source, captured, metrics = source_for(simulator, StaticToken("not-a-token"))
    await source.apply([subscription])
    try:
        await wait_for(lambda: policy(metrics, "auth") >= 3, what="1008s on the same token")
        assert policy(metrics, "contract") == 0, "the same token refused again says nothing about the contracts"
        assert captured.frames == []
    finally:
        await source.stop()


async def test_a_quick_1008_on_a_fresh_token_counts_auth_then_contract(simulator: Simulator) -> None:
    subscription = Subscription("id-0", Endpoint.ID, (simulator.contracts[0].id,))
    await simulator.invalidate_contracts([simulator.contracts[0].id])
    async with aiohttp.ClientSession() as http:
        tokens = IssuedToken(http, ime_settings(simulator.base_url))
        source, _captured, metrics = source_for(simulator, tokens)
        await source.apply([subscription])
        try:
            await wait_for(lambda: policy(metrics, "contract") >= 1, what="a second 1008, on a fresh token")
            assert policy(metrics, "auth") == 1
            assert simulator.counters.tokens_issued >= 2, "blamed only on a token issued after the refusal"
            handed_over = await asyncio.wait_for(source.refused.get(), timeout=5)
            assert handed_over == subscription, "the refused subscription goes to whoever searches it"
        finally:
            await source.stop()


async def test_1008_after_revocation_is_recovered_by_a_fresh_token(simulator: Simulator) -> None:
    subscription = Subscription("id-0", Endpoint.ID, tuple(c.id for c in simulator.contracts[:2]))
    async with aiohttp.ClientSession() as http:
        tokens = IssuedToken(http, ime_settings(simulator.base_url))
        source, captured, metrics = source_for(simulator, tokens)
        await source.apply([subscription])
        try:
            await wait_for(lambda: len(captured.frames) >= 2)
            issued = simulator.counters.tokens_issued
            simulator.revoke_tokens()
            await simulator.close_connections(1008)
            before = len(captured.frames)
            await wait_for(lambda: len(captured.frames) > before + 2, what="frames on a fresh token")
            assert simulator.counters.tokens_issued == issued + 1
            assert policy(metrics, "auth") == 1
            assert policy(metrics, "contract") == 0
        finally:
            await source.stop()


async def test_handshake_refused_with_http_status(simulator: Simulator) -> None:
    simulator.reject_handshakes(503)
    subscription = Subscription("id-0", Endpoint.ID, (simulator.contracts[0].id,))
    source, captured, metrics = source_for(simulator, StaticToken(simulator.issue_token()))
    await source.apply([subscription])
    try:
        await wait_for(lambda: reconnects(metrics, "id", "http_503") >= 2)
        simulator.reject_handshakes(None)
        await wait_for(lambda: len(captured.frames) >= 1, what="frames once the server accepts again")
    finally:
        await source.stop()


@pytest.mark.parametrize("sdk_field_names", [False, True])
async def test_token_issue_with_both_form_spellings(simulator: Simulator, sdk_field_names: bool) -> None:
    async with aiohttp.ClientSession() as http:
        token_form = "sdk" if sdk_field_names else "documented"
        tokens = IssuedToken(http, ime_settings(simulator.base_url, token_form=token_form))
        token = await tokens.token()
        assert await tokens.token() == token  # cached until close to expiry
        expiry = jwt_expiry(token)
        assert expiry is not None
        assert tokens.expires_at == expiry
        tokens.invalidate(token)
        assert await tokens.token() != token


async def test_bad_credentials_are_rejected_without_leaking_the_password(simulator: Simulator) -> None:
    async with aiohttp.ClientSession() as http:
        tokens = IssuedToken(http, ime_settings(simulator.base_url, password="wrong-password-value"))
        with pytest.raises(AuthRejected, match="HTTP 401") as caught:
            await tokens.token()
    assert "wrong-password-value" not in str(caught.value)


async def test_static_lookups_resolve_names_and_ids_and_leave_out_unknown_ones(simulator: Simulator) -> None:
    first, second = simulator.contracts[:2]
    async with aiohttp.ClientSession() as http:
        catalog = HttpContractCatalog(http, ime_settings(simulator.base_url), StaticToken(simulator.issue_token()))
        by_name = await catalog.by_names([first.name, "NOPE", second.name])
        by_id = await catalog.by_ids(["999999", second.id])
    assert {name: ref.contract_id for name, ref in by_name.items()} == {first.name: first.id, second.name: second.id}
    assert {contract_id: ref.contract_name for contract_id, ref in by_id.items()} == {second.id: second.name}


async def test_stop_closes_connections_with_going_away(simulator: Simulator) -> None:
    subscription = Subscription("id-0", Endpoint.ID, (simulator.contracts[0].id,))
    source, captured, _ = source_for(simulator, StaticToken(simulator.issue_token()))
    await source.apply([subscription])
    await wait_for(lambda: len(captured.frames) >= 1)
    await asyncio.wait_for(source.stop(), timeout=10)
    await wait_for(lambda: not simulator.connections, what="the simulator to see the close")


async def test_a_handshake_refused_with_429_waits_its_retry_after(simulator: Simulator) -> None:
    subscription = Subscription("id-0", Endpoint.ID, (simulator.contracts[0].id,))
    simulator.reject_handshakes(429, retry_after=3)
    source, captured, metrics = source_for(simulator, StaticToken(simulator.issue_token()))
    await source.apply([subscription])
    try:
        await wait_for(lambda: reconnects(metrics, "id", "http_429") == 1, what="a 429")
        handshakes = simulator.counters.handshakes
        simulator.reject_handshakes(None)
        # reconnect_max is 0.2 s: only the server's Retry-After keeps the next attempt away this long.
        await assert_holds(lambda: simulator.counters.handshakes == handshakes, seconds=2.5, what="no new attempt")
        await wait_for(lambda: len(captured.frames) > 0, what="frames once Retry-After has passed")
    finally:
        await source.stop()


async def test_a_connection_dropped_by_a_new_plan_loses_its_series_a_reopened_one_keeps_its_time(
    simulator: Simulator,
) -> None:
    """The per-connection alerts read ime_bridge_connection_up and ime_bridge_last_message_timestamp_seconds: a
    connection the plan no longer has must not linger as down (0) or silent (an old time); one reopened with
    other contracts keeps its series and last-frame time."""
    contracts = [c.id for c in simulator.contracts]
    first = Subscription("id-0", Endpoint.ID, tuple(contracts[:2]))
    second = Subscription("id-1", Endpoint.ID, tuple(contracts[2:4]))
    source, captured, metrics = source_for(simulator, StaticToken(simulator.issue_token()))
    registry = metrics.registry

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    await source.apply([first, second])
    try:
        await wait_for(lambda: captured.count("id-0") >= 1 and captured.count("id-1") >= 1)
        await wait_for(lambda: source.connections_up == 2)
        last = sample("ime_bridge_last_message_timestamp_seconds", connection="id-0")
        assert last is not None
        assert last > 0
        await source.apply([Subscription("id-0", Endpoint.ID, tuple(contracts[:3]))])  # id-0 reopened, id-1 gone
        assert sample("ime_bridge_connection_up", endpoint="id", connection="id-1") is None
        assert sample("ime_bridge_last_message_timestamp_seconds", connection="id-1") is None
        kept = sample("ime_bridge_last_message_timestamp_seconds", connection="id-0")
        assert kept is not None
        assert kept >= last
        await wait_for(lambda: sample("ime_bridge_connection_up", endpoint="id", connection="id-0") == 1)
    finally:
        await source.stop()
    assert sample("ime_bridge_connection_up", endpoint="id", connection="id-0") == 0


@pytest.mark.parametrize("queue_found", [True, False], ids=["from-the-queue", "recv-only"])
async def test_a_burst_arrives_whole_and_in_order_with_fragmented_and_binary_messages(
    monkeypatch: pytest.MonkeyPatch, queue_found: bool
) -> None:
    """A burst is read in one go from websockets' queue of frames (source._queued_frames, which must still find
    it in the installed websockets); fragmented messages in it go through recv() and keep their place. Without
    the queue (a websockets that keeps it elsewhere), recv() alone delivers the same."""
    burst: list[str | bytes | list[str]] = [f"text {n}" for n in range(40)]
    burst[7] = ["frag", "mented ", "seven"]
    burst[20] = b"binary \xff twenty"
    burst[33] = ["thirty", "-three"]
    expected = [b"".join(part.encode() for part in m) if isinstance(m, list) else m for m in burst]
    expected = [m.encode() if isinstance(m, str) else m for m in expected]
    found: list[bool] = []

    async def serve_burst(ws: ServerConnection) -> None:
        for message in burst:
            await ws.send(message)
        await ws.wait_closed()

    async with serve(serve_burst, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        captured, metrics = Captured(), Metrics()
        source = WebSocketSource(
            settings=ime_settings(f"http://127.0.0.1:{port}"),
            tokens=StaticToken("t"),
            handler=captured,
            metrics=metrics,
        )
        original = source_module._queued_frames

        def spy(ws: ClientConnection) -> object:
            queue = original(ws)
            found.append(queue is not None)
            return queue if queue_found else None

        monkeypatch.setattr(source_module, "_queued_frames", spy)
        try:
            await source.apply([Subscription("id-0", Endpoint.ID, ("1001",))])
            await wait_for(lambda: len(captured.frames) >= len(burst))
        finally:
            await source.stop()
    assert [raw for raw, _, _ in captured.frames] == expected
    assert found == [True]
    times = [receive_time for _, receive_time, _ in captured.frames]
    assert times == sorted(times)
    if queue_found:
        assert len(set(times)) < len(times), "the frames of a burst read from the queue share its receive time"
    received = metrics.registry.get_sample_value("ime_bridge_messages_received_total", {"endpoint": "id"})
    assert received == len(burst)
