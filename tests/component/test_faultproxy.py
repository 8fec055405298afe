"""The TCP fault proxy: forwarding, blackhole, refuse/drop/cut, restore, counters; and a WebSocket through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bridge.devtools.broker import free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.protocol import CHANNEL, Endpoint, live_url
from tests.support.faultproxy import FaultProxy
from tests.support.waiting import wait_for

WAIT = 5.0  # deadline for what should happen almost at once
SILENCE = 0.3  # how long a black-holed read must stay empty


class Target:
    """An echo server that keeps its connections, so that tests can push bytes from it and see them end."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.finished = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.finished += 1
            writer.close()

    def push(self, data: bytes) -> None:
        """Send `data` to the client of the latest connection, unasked."""
        self.writers[-1].write(data)


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    echo = Target()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    echo.port = server.sockets[0].getsockname()[1]
    yield echo
    server.close()
    await server.wait_closed()
    for writer in echo.writers:
        writer.close()
    await wait_for(lambda: echo.finished == len(echo.writers), within=WAIT, what="echo handlers to end")


@pytest.fixture
async def proxy(target: Target) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", target.port) as running:
        yield running


async def open_client(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), WAIT)


async def assert_closed_by_proxy(reader: asyncio.StreamReader) -> None:
    """The connection ends, by EOF or by reset, without a byte more."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(1), WAIT) == b""


async def assert_silent(reader: asyncio.StreamReader) -> None:
    """Nothing arrives: the bounded wait is the assertion itself."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), SILENCE)


async def test_forwards_both_ways_with_flow_control_and_counts(proxy: FaultProxy, target: Target) -> None:
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert proxy.port != 0
    reader, writer = await open_client(proxy)
    assert await round_trip(reader, writer, b"hello") == b"hello"
    target.push(b"unasked")
    assert await asyncio.wait_for(reader.readexactly(7), WAIT) == b"unasked"
    # Far more than the proxy buffers in either direction: only flow control gets it through intact.
    payload = os.urandom(8 << 20)
    writer.write(payload)
    writer.write_eof()  # half-close: the echo server sees EOF, finishes echoing and closes
    assert await asyncio.wait_for(reader.read(), WAIT * 4) == payload
    assert proxy.counters.accepted == 1
    assert proxy.counters.bytes_to_target == 5 + len(payload)
    assert proxy.counters.bytes_to_client == 5 + 7 + len(payload)
    await wait_for(lambda: proxy.open_connections == 0, within=WAIT, what="the proxied connection to close")
    writer.close()


async def test_a_client_that_does_not_read_stops_the_target_instead_of_filling_memory(
    proxy: FaultProxy, target: Target
) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a fixed small window: no autotuning
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port)), WAIT)
    reader, writer = await asyncio.open_connection(sock=sock)
    assert await round_trip(reader, writer, b"ready") == b"ready"
    payload = os.urandom(64 << 20)
    target.push(payload)
    # Without flow control the proxy would read all of it from the target at once, into its own memory.
    with pytest.raises(AssertionError):
        await wait_for(lambda: proxy.counters.bytes_to_client >= 5 + (16 << 20), within=SILENCE)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), WAIT * 4) == payload
    writer.close()


async def test_counts_concurrent_connections(proxy: FaultProxy, target: Target) -> None:
    clients = [await open_client(proxy) for _ in range(20)]
    replies = await asyncio.gather(*(round_trip(r, w, f"client {i}".encode()) for i, (r, w) in enumerate(clients)))
    assert replies == [f"client {i}".encode() for i in range(20)]
    assert (proxy.counters.accepted, proxy.open_connections, len(target.writers)) == (20, 20, 20)
    for _, writer in clients[:5]:
        writer.close()
    await wait_for(lambda: proxy.open_connections == 15, within=WAIT, what="5 connections to close")
    for _, writer in clients[5:]:
        writer.close()


async def test_blackhole_holds_connections_open_and_restore_resumes_them(proxy: FaultProxy, target: Target) -> None:
    reader, writer = await open_client(proxy)
    assert await round_trip(reader, writer, b"before") == b"before"
    proxy.blackhole()
    assert proxy.blackholed
    writer.write(b"during")
    target.push(b"pushed")
    await assert_silent(reader)
    assert not writer.is_closing()
    # A new connection is accepted too, but the target never hears of it while the path is black-holed.
    late_reader, late_writer = await open_client(proxy)
    late_writer.write(b"late")
    await assert_silent(late_reader)
    assert len(target.writers) == 1
    assert (proxy.open_connections, proxy.counters.accepted) == (2, 2)

    proxy.restore()
    # Nothing was lost: what waited in the buffers goes through, in order, as when a network path heals.
    assert await asyncio.wait_for(reader.readexactly(12), WAIT) == b"pushedduring"
    assert await asyncio.wait_for(late_reader.readexactly(4), WAIT) == b"late"
    assert await round_trip(reader, writer, b"after") == b"after"
    assert len(target.writers) == 2
    writer.close()
    late_writer.close()


async def test_cut_drops_connections_and_refuses_new_ones_until_restore(proxy: FaultProxy, target: Target) -> None:
    reader, writer = await open_client(proxy)
    assert await round_trip(reader, writer, b"up") == b"up"
    proxy.cut()
    assert proxy.refusing
    await assert_closed_by_proxy(reader)
    await wait_for(lambda: target.finished == 1, within=WAIT, what="the target to see its connection end")
    refused_reader, refused_writer = await open_client(proxy)
    await assert_closed_by_proxy(refused_reader)
    assert len(target.writers) == 1
    assert (proxy.counters.dropped, proxy.counters.refused, proxy.counters.accepted) == (1, 1, 2)
    await wait_for(lambda: proxy.open_connections == 0, within=WAIT, what="no connection left open")

    proxy.restore()
    assert not proxy.refusing
    again_reader, again_writer = await open_client(proxy)
    assert await round_trip(again_reader, again_writer, b"again") == b"again"
    for closing in (writer, refused_writer, again_writer):
        closing.close()


async def test_drop_all_alone_lets_clients_reconnect(proxy: FaultProxy, target: Target) -> None:
    reader, writer = await open_client(proxy)
    assert await round_trip(reader, writer, b"one") == b"one"
    proxy.drop_all()
    await assert_closed_by_proxy(reader)
    reader, writer2 = await open_client(proxy)
    assert await round_trip(reader, writer2, b"two") == b"two"
    assert (proxy.counters.dropped, proxy.counters.refused) == (1, 0)
    writer.close()
    writer2.close()


async def test_target_down_resets_the_client() -> None:
    async with FaultProxy("127.0.0.1", free_port()) as proxy:
        reader, writer = await open_client(proxy)
        await assert_closed_by_proxy(reader)
        assert proxy.counters.target_failures == 1
        writer.close()


async def test_stop_closes_every_connection_and_is_idempotent(target: Target) -> None:
    proxy = FaultProxy("127.0.0.1", target.port)
    await proxy.start()
    reader, writer = await open_client(proxy)
    assert await round_trip(reader, writer, b"x") == b"x"
    await proxy.stop()
    assert proxy.open_connections == 0
    await assert_closed_by_proxy(reader)
    await proxy.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.close()


async def test_listens_on_the_port_it_is_given(target: Target) -> None:
    port = free_port()
    async with FaultProxy("127.0.0.1", target.port, listen_port=port) as proxy:
        assert proxy.port == port
        reader, writer = await open_client(proxy)
        assert await round_trip(reader, writer, b"fixed") == b"fixed"
        writer.close()


async def receive_until_closed(ws: ClientConnection) -> None:
    while True:  # frames already past the proxy come first
        await ws.recv()


async def test_websocket_through_the_proxy_dies_by_ping_timeout_when_black_holed() -> None:
    async with (
        Simulator(SimulatorConfig(contracts=4, rate=200)) as simulator,
        FaultProxy("127.0.0.1", simulator.port) as proxy,
    ):
        ids = [contract.id for contract in simulator.contracts]
        url = live_url(f"ws://{proxy.address}", Endpoint.ID, ids)
        headers = {"Authorization": simulator.issue_token()}
        async with connect(
            url, additional_headers=headers, open_timeout=WAIT, ping_interval=0.2, ping_timeout=0.2, close_timeout=0.2
        ) as ws:
            for _ in range(3):
                frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
                assert frame["channel"] == CHANNEL
                assert frame["contractId"] in ids
            assert proxy.counters.bytes_to_client > 0
            proxy.blackhole()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(receive_until_closed(ws), WAIT)
