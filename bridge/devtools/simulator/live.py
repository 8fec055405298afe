"""The simulator's live part: the WebSocket endpoints (the handshake and its faults, authorization, the
subscription), each streaming connection's queue and writer task, close answering and closes at token expiry.
The frames come from the feed (feed.py); the fault switches are set by the `Simulator` (server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from bridge.devtools.simulator.model import (
    CLOSE_INTERNAL_ERROR,
    POLICY_CLOSE_MESSAGE,
    Catalogue,
    PolicyCause,
    SentFrame,
    ServerConnection,
    SimulatorConfig,
    SimulatorCounters,
    retry_after_header,
)
from bridge.devtools.simulator.tokens import Claims, TokenAuthority
from bridge.protocol import CLOSE_POLICY_VIOLATION, Endpoint, strip_bearer

QueueItem = tuple[str | None, bytes, WSMsgType]

# While a client's close frame is left unanswered, how often to look whether it dropped the TCP connection.
_DROP_POLL_INTERVAL = 0.05


class Changes:
    """Wakes whoever waits for a change: connections, counters, faults, each batch of frames sent."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self) -> None:
        """Until the next `notify`."""
        await self._changed.wait()


@dataclass(slots=True)
class LiveSwitches:
    """The live part's fault switches: set by the `Simulator`'s fault API, read at every handshake, write and
    close (the feed reads `stalled` too)."""

    stalled: bool = False
    accept_then_close: bool = False
    accept_close_code: int | None = CLOSE_INTERNAL_ERROR  # None: drop TCP
    handshake_delay: float = 0.0
    handshake_status: int | None = None
    handshake_retry_after: int | None = None  # None: the config's retry_after_seconds
    ignore_close_frames: bool = False
    close_on_token_expiry: bool = False


class LiveConnection:
    """A streaming connection: its subscription, outbound queue and writer task."""

    def __init__(
        self,
        connection_id: int,
        ws: web.WebSocketResponse,
        request: web.Request,
        endpoint: Endpoint,
        identifiers: tuple[str, ...],
        contract_ids: frozenset[str],
        heads: dict[str, bytes],
    ) -> None:
        self.info = ServerConnection(connection_id, endpoint, request.path, identifiers, contract_ids)
        self.ws = ws
        self.transport = request.transport
        self.heads = heads
        self.queue: deque[QueueItem] = deque()
        self.wakeup = asyncio.Event()
        self.drained = asyncio.Event()
        self.closing = False
        self.writing = False  # a frame is being written: it counts as sent once the write returns
        self.token: Claims | None = None  # the claims of the token it connected with
        self.expiry_timer: asyncio.TimerHandle | None = None

    def push(self, contract_id: str | None, payload: bytes, opcode: WSMsgType = WSMsgType.TEXT) -> None:
        self.queue.append((contract_id, payload, opcode))
        self.wakeup.set()


def _as_sent(payload: bytes, opcode: WSMsgType) -> str | bytes:
    """A frame as `sent_frames` keeps it: text for text frames, bytes for binary ones and invalid UTF-8."""
    if opcode is not WSMsgType.TEXT:
        return payload
    try:
        return payload.decode()
    except UnicodeDecodeError:
        return payload


class LiveEndpoints:
    """The live WebSocket endpoints and the connections streaming on them."""

    def __init__(
        self,
        config: SimulatorConfig,
        counters: SimulatorCounters,
        changes: Changes,
        switches: LiveSwitches,
        *,
        catalogue: Catalogue,
        invalid: set[str],
        heads: Mapping[Endpoint, dict[str, bytes]],
        authority: TokenAuthority,
        authorize: Callable[[str | None], PolicyCause | None],
        sent: list[SentFrame] | None,
    ) -> None:
        self._config = config
        self._counters = counters
        self._changes = changes
        self._switches = switches
        self._catalogue = catalogue
        self._invalid = invalid  # the simulator's set, changed by invalidate_contracts
        self._heads = heads
        self._authority = authority
        self._authorize = authorize
        self._sent = sent
        self._connections: dict[int, LiveConnection] = {}
        self._subscribers: dict[str, list[LiveConnection]] = {}
        self._ever_subscribed: set[str] = set()
        self._next_connection_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- what the simulator and the feed read

    @property
    def connections(self) -> list[LiveConnection]:
        """The connections currently streaming, in the order they opened."""
        return list(self._connections.values())

    @property
    def subscribers(self) -> dict[str, list[LiveConnection]]:
        """Contract id → the connections subscribed to it (only contracts with at least one)."""
        return self._subscribers

    @property
    def ever_subscribed(self) -> set[str]:
        """The contracts some connection has subscribed to since the simulator started."""
        return self._ever_subscribed

    def open_connections(self) -> list[LiveConnection]:
        """The streaming connections not being closed."""
        return [connection for connection in self._connections.values() if not connection.closing]

    # --- closing

    async def close(self, connection: LiveConnection, code: int, message: bytes) -> None:
        connection.closing = True
        await connection.ws.close(code=code, message=message)

    def close_later(self, connection: LiveConnection, code: int, message: bytes) -> None:
        """Close `connection` in a task of its own (cancelled by `cancel_pending`)."""
        task = asyncio.create_task(self.close(connection, code, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_pending(self) -> None:
        """Cancel the closes still under way (at stop)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close_expired(self) -> int:
        """With close_on_token_expiry, close every streaming connection whose token expired."""
        if not self._switches.close_on_token_expiry:
            return 0
        now = time.time()
        expired = [
            connection
            for connection in self.open_connections()
            if connection.token is not None and self._authority.expired(connection.token, now)
        ]
        for connection in expired:
            self._token_expired(connection)
        return len(expired)

    def _token_expired(self, connection: LiveConnection) -> None:
        """The connection's token expired (its timer fired): with close_on_token_expiry, close it with 1008."""
        if not self._switches.close_on_token_expiry or connection.closing:
            return
        connection.closing = True
        self._counters.policy_closes[PolicyCause.TOKEN_EXPIRED] += 1
        self._changes.notify()
        self.close_later(connection, CLOSE_POLICY_VIOLATION, POLICY_CLOSE_MESSAGE)

    # --- the handshake

    def handler(self, endpoint: Endpoint) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
        """The aiohttp handler of `endpoint` (its path and its legacy path)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._live(endpoint, request)

        return handle

    def _subscription(self, endpoint: Endpoint, request: web.Request) -> tuple[list[str], PolicyCause | None]:
        identifiers = [value for param in endpoint.query_params for value in request.query.getall(param, [])]
        if not identifiers:
            return [], PolicyCause.NO_CONTRACTS
        lookup = self._catalogue.by(endpoint)
        contracts = [lookup.get(identifier) for identifier in identifiers]
        if any(contract is None for contract in contracts):
            return [], PolicyCause.UNKNOWN_CONTRACT
        ids = [contract.id for contract in contracts if contract is not None]
        if self._invalid.intersection(ids):
            return [], PolicyCause.INVALID_CONTRACT
        return identifiers, None

    async def _live(self, endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
        switches = self._switches
        self._counters.handshakes += 1
        self._changes.notify()
        if switches.handshake_delay:
            await asyncio.sleep(switches.handshake_delay)
        if switches.handshake_status is not None:
            status = switches.handshake_status
            seconds = switches.handshake_retry_after
            headers = retry_after_header(status, self._config.retry_after_seconds if seconds is None else seconds)
            return web.json_response({"detail": f"handshake rejected ({status})"}, status=status, headers=headers)
        ws = web.WebSocketResponse(
            autoping=False,  # pings are answered below, so that a stall can stop answering them
            autoclose=False,  # close frames too, so that they can be left unanswered
            compress=self._config.compress,
            timeout=self._config.close_timeout,
        )
        if not ws.can_prepare(request).ok:
            return web.json_response({"detail": "WebSocket upgrade expected"}, status=400)
        await ws.prepare(request)
        self._counters.connections_accepted += 1
        self._changes.notify()
        if switches.accept_then_close:
            if switches.accept_close_code is None:
                if request.transport is not None:
                    request.transport.abort()
            else:
                await ws.close(code=switches.accept_close_code, message=b"")
            return ws
        header = request.headers.get("Authorization")
        cause = self._authorize(header)
        identifiers: list[str] = []
        if cause is None:
            identifiers, cause = self._subscription(endpoint, request)
        if cause is not None:
            self._counters.policy_closes[cause] += 1
            self._changes.notify()
            await ws.close(code=CLOSE_POLICY_VIOLATION, message=POLICY_CLOSE_MESSAGE)
            return ws
        token = self._authority.claims(strip_bearer(header)) if header is not None else None
        await self._stream(endpoint, request, ws, identifiers, token)
        return ws

    # --- streaming

    async def _stream(
        self,
        endpoint: Endpoint,
        request: web.Request,
        ws: web.WebSocketResponse,
        identifiers: list[str],
        token: Claims | None,
    ) -> None:
        lookup = self._catalogue.by(endpoint)
        contract_ids = frozenset(lookup[identifier].id for identifier in identifiers)
        connection = LiveConnection(
            self._next_connection_id,
            ws,
            request,
            endpoint,
            tuple(identifiers),
            contract_ids,
            self._heads[endpoint],
        )
        self._next_connection_id += 1
        connection.token = token
        if token is not None:  # always armed, so that close_on_token_expiry can be switched on later
            delay = max(0.0, token[0] - time.time())
            connection.expiry_timer = asyncio.get_running_loop().call_later(delay, self._token_expired, connection)
        writer = asyncio.create_task(self._write(connection), name=f"ime-simulator-writer-{connection.info.id}")
        self._register(connection)
        try:
            while True:
                message = await ws.receive()
                if message.type is WSMsgType.PING:
                    if not self._switches.stalled:
                        await ws.pong(message.data)
                elif message.type is WSMsgType.CLOSE:
                    await self._answer_close(connection)
                    break
                elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                # The service ignores anything else a client sends.
        finally:
            if connection.expiry_timer is not None:
                connection.expiry_timer.cancel()
            self._unregister(connection)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _write(self, connection: LiveConnection) -> None:
        """Drain the connection's queue into its socket; one task per connection."""
        ws, queue, wakeup, sent = connection.ws, connection.queue, connection.wakeup, self._sent
        counters, switches = self._counters, self._switches
        with contextlib.suppress(ConnectionError):
            while True:
                while queue and not switches.stalled:
                    contract_id, payload, opcode = queue.popleft()
                    connection.writing = True
                    try:
                        await ws.send_frame(payload, opcode)
                    finally:
                        connection.writing = False
                    counters.frames_sent += 1
                    if sent is not None:
                        sent.append(SentFrame(connection.info.id, contract_id, _as_sent(payload, opcode)))
                connection.drained.set()
                self._changes.notify()
                wakeup.clear()
                await wakeup.wait()

    async def _answer_close(self, connection: LiveConnection) -> None:
        """The client sent a close frame: answer it as aiohttp's autoclose would, unless close frames are
        ignored: then keep streaming, unanswered, until the client drops TCP (or the switch goes off)."""
        transport = connection.transport
        switches = self._switches
        if switches.ignore_close_frames and transport is not None and not transport.is_closing():
            self._counters.close_frames_ignored += 1
            self._changes.notify()
            # Nothing to await tells that the client dropped TCP: asyncio transports only say is_closing().
            while switches.ignore_close_frames and not transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(_DROP_POLL_INTERVAL)
        await connection.ws.close(drain=False)

    def _register(self, connection: LiveConnection) -> None:
        self._connections[connection.info.id] = connection
        for contract_id in connection.info.contract_ids:
            self._subscribers.setdefault(contract_id, []).append(connection)
        self._ever_subscribed.update(connection.info.contract_ids)
        self._changes.notify()

    def _unregister(self, connection: LiveConnection) -> None:
        connection.closing = True
        connection.drained.set()  # never leave the unpaced generator waiting on a gone connection
        self._connections.pop(connection.info.id, None)
        for contract_id in connection.info.contract_ids:
            subscribers = self._subscribers.get(contract_id, [])
            if connection in subscribers:
                subscribers.remove(connection)
            if not subscribers:
                self._subscribers.pop(contract_id, None)
        self._changes.notify()
