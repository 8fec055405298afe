"""The simulator's server: lifecycle, the fault API tests drive, and the live part (WebSocket streams fed by
the paced market generator through a queue and writer per connection); the token, static and admin parts
are tokens.py, static.py and admin.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import WSMsgType, web

from bridge.devtools.market import (
    Contract,
    FramePayload,
    FrameRenderer,
    MarketGenerator,
    PrerenderedFrame,
    build_catalogue,
    prerender,
)
from bridge.devtools.simulator.admin import AdminEndpoints
from bridge.devtools.simulator.model import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    GARBAGE_KINDS,
    POLICY_CLOSE_MESSAGE,
    PRERENDER_BUDGET,
    GarbageKind,
    PolicyCause,
    SentFrame,
    ServerConnection,
    SimulatorConfig,
    SimulatorCounters,
    retry_after_header,
)
from bridge.devtools.simulator.replay import CapturedMarket, ReplayedFrame
from bridge.devtools.simulator.static import StaticLookups
from bridge.devtools.simulator.tokens import Claims, TokenEndpoint
from bridge.protocol import (
    CHANNEL,
    CLOSE_POLICY_VIOLATION,
    TOKEN_PATH,
    Endpoint,
    strip_bearer,
)

_QueueItem = tuple[str | None, bytes, WSMsgType]

# With rate 0, the generator pauses while a connection has more than this many frames queued.
_UNPACED_HIGH_WATER = 4_096
# While a client's close frame is left unanswered, how often to look whether it dropped the TCP connection.
_DROP_POLL_INTERVAL = 0.05


class _Connection:
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
        self.queue: deque[_QueueItem] = deque()
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


def _zone(name: str) -> tzinfo:
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class _BadFrame(PrerenderedFrame):
    """A malformed pre-rendered frame: routed to `contract_id`'s subscribers, recorded as a fault frame."""


# A good frame's tail → a tail that spoils the head it follows (`{"channel": …, <identifier>: …, "timestamp": "`).
_SPOILERS: tuple[Callable[[bytes], bytes], ...] = (
    lambda tail: b'", "data": <html>502 Bad Gateway</html>',  # invalid_json
    lambda tail: b'", "data": {"ContractInfo": {"open_interest": "n/a", "open_interest_changes": 0}}}',  # invalid_frame
    # unknown_contract: the snapshot, under an id and a name outside the catalogue (a later duplicate key wins)
    lambda tail: b'", "contractId": "999", "contractName": "XX0999"' + tail[1:],
)


def _spoiled(frames: list[PrerenderedFrame], ratio: float) -> list[PrerenderedFrame]:
    """`frames` with a `ratio` share, evenly spread, replaced by bad frames of each kind in turn."""
    spoiled: list[PrerenderedFrame] = []
    for index, frame in enumerate(frames):
        bad = int((index + 1) * ratio) - int(index * ratio)
        if not bad:
            spoiled.append(frame)
            continue
        spoil = _SPOILERS[int(index * ratio) % len(_SPOILERS)]
        spoiled.append(_BadFrame(frame.contract_id, spoil(frame.tail)))
    return spoiled


class Simulator:
    """The fake IME service. Use as `async with Simulator(SimulatorConfig(...)) as sim:`."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.counters = SimulatorCounters()
        self._captured = CapturedMarket.load(self.config.replay) if self.config.replay is not None else None
        self._contracts = self._captured.contracts if self._captured else build_catalogue(self.config.contracts)
        self._by_id = {contract.id: contract for contract in self._contracts}
        self._by_name = {contract.name: contract for contract in self._contracts}
        zone = _zone(self.config.naive_zone)
        self._generator = MarketGenerator(self._contracts, seed=self.config.seed, zone=zone)
        self._renderer = FrameRenderer(self.config.dialect, zone)
        self._heads = {
            endpoint: {contract.id: self._renderer.head(contract, endpoint) for contract in self._contracts}
            for endpoint in Endpoint
        }
        self._token_endpoint = TokenEndpoint(self.config, self.counters, self._notify)
        self._prerendered: list[PrerenderedFrame] = []
        self._cursor = 0
        self._connections: dict[int, _Connection] = {}
        self._subscribers: dict[str, list[_Connection]] = {}
        self._next_connection_id = 1
        self._sent: list[SentFrame] | None = [] if self.config.record_sent else None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pump_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._stopped = False
        # Fault modes.
        self._stalled = False
        self._accept_then_close = False
        self._accept_close_code: int | None = CLOSE_INTERNAL_ERROR
        self._handshake_delay = 0.0
        self._handshake_status: int | None = None
        self._handshake_retry_after: int | None = None  # None: the config's retry_after_seconds
        self._ignore_close_frames = self.config.ignore_close_frames
        self._close_on_token_expiry = self.config.close_on_token_expiry
        self._invalid: set[str] = set()
        self._delisted: set[str] = set()

    # --- lifecycle

    async def start(self) -> None:
        """Bind the port, and start generating the market."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        if not 0.0 <= self.config.bad_frame_ratio <= 1.0 or (self.config.bad_frame_ratio and not self.config.prerender):
            raise ValueError("bad_frame_ratio must be between 0 and 1, and needs prerender")
        if self.config.prerender:
            variants = max(2, min(self.config.prerender_variants, PRERENDER_BUDGET // len(self._contracts)))
            self._prerendered = prerender(self._generator, self._contracts, variants, datetime.now(UTC))
            if self.config.bad_frame_ratio:
                self._prerendered = _spoiled(self._prerendered, self.config.bad_frame_ratio)
        runner = web.AppRunner(self._build_app(), access_log=None, shutdown_timeout=self.config.close_timeout)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._pump_task = asyncio.create_task(self._pump(), name="ime-simulator-pump")

    async def stop(self) -> None:
        """Close every connection (1001) and the server. Idempotent."""
        if self._stopped or self._runner is None:
            self._stopped = True
            return
        self._stopped = True
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
        await self.close_connections(CLOSE_GOING_AWAY)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- what tests and callers read

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        return self._port

    @property
    def base_url(self) -> str:
        """HTTP root of the token, static and admin endpoints."""
        return f"http://{self._url_host}:{self._port}"

    @property
    def ws_url(self) -> str:
        """WebSocket root of the live endpoints."""
        return f"ws://{self._url_host}:{self._port}"

    @property
    def _url_host(self) -> str:
        host = self.config.host
        return f"[{host}]" if ":" in host else host

    @property
    def contracts(self) -> list[Contract]:
        """The catalogue, in id order."""
        return list(self._contracts)

    @property
    def connections(self) -> list[ServerConnection]:
        """The connections currently streaming, in the order they opened."""
        return [connection.info for connection in self._connections.values()]

    def issue_token(self, ttl: float | None = None) -> str:
        """A valid token without going through HTTP; a negative `ttl` gives an already expired one."""
        return self._token_endpoint.issue(ttl)

    def sent_frames(self, *, connection_id: int | None = None, contract_id: str | None = None) -> list[SentFrame]:
        """Frames sent so far, optionally of one connection or one contract (needs `record_sent`)."""
        if self._sent is None:
            raise RuntimeError("frames are recorded only with SimulatorConfig(record_sent=True)")
        return [
            sent
            for sent in self._sent
            if (connection_id is None or sent.connection_id == connection_id)
            and (contract_id is None or sent.contract_id == contract_id)
        ]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds, re-checked whenever connections, counters or faults change
        and after each batch of frames sent. Bound it with `asyncio.timeout`."""
        while not predicate():
            await self._changed.wait()

    # --- faults

    async def drop_connections(self) -> int:
        """Abort every connection's TCP stream, without a close frame. Returns how many."""
        dropped = list(self._connections.values())
        for connection in dropped:
            connection.closing = True
            if connection.transport is not None:
                connection.transport.abort()
        return len(dropped)

    async def close_connections(self, code: int = CLOSE_INTERNAL_ERROR, message: str = "") -> int:
        """Close every connection with `code`, as the service does when its backend fails."""
        closing = list(self._connections.values())
        await asyncio.gather(*(self._close(connection, code, message.encode()) for connection in closing))
        return len(closing)

    def stall(self, enabled: bool = True) -> None:
        """Stop (or resume) sending anything and answering pings; connections stay open. Frames already
        queued go out on resume; snapshots generated meanwhile are never sent."""
        self._stalled = enabled
        if not enabled:
            for connection in self._connections.values():
                connection.wakeup.set()
        self._notify()

    async def stall_and_settle(self, within: float = 30.0) -> None:
        """Stall, then wait (at most `within` seconds) until no frame is mid-write: from then on
        `sent_frames()` and `counters` hold everything the bridge can receive, until the stall ends."""
        self.stall()
        async with asyncio.timeout(within):
            await self.wait_for(lambda: not any(connection.writing for connection in self._connections.values()))

    def accept_then_close(self, enabled: bool = True, *, code: int | None = CLOSE_INTERNAL_ERROR) -> None:
        """New connections are upgraded and then closed at once with `code` (None: dropped)."""
        self._accept_then_close = enabled
        self._accept_close_code = code
        self._notify()

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused (1008); new ones are good."""
        self._token_endpoint.authority.revoke_all()
        self._notify()

    def expire_tokens(self, ttl: float | None = None) -> None:
        """Every token issued so far counts as expired; with `ttl`, new tokens live that long. With
        `close_on_token_expiry`, streaming connections are closed with 1008 at once."""
        self._token_endpoint.authority.expire_all()
        if ttl is not None:
            self.config.token_ttl = ttl
        self._close_expired()
        self._notify()

    def close_on_token_expiry(self, enabled: bool = True) -> int:
        """Close (or stop closing) streaming connections with 1008 when their token expires; when enabled,
        those whose token already expired are closed at once. Returns how many those were."""
        self._close_on_token_expiry = enabled
        closed = self._close_expired()
        self._notify()
        return closed

    def ignore_close_frames(self, enabled: bool = True) -> None:
        """Leave clients' close frames on streaming connections unanswered (or answer them again): the
        connection keeps streaming until the client drops TCP. Turning it off answers the waiting ones."""
        self._ignore_close_frames = enabled
        self._notify()

    async def invalidate_contracts(self, identifiers: Iterable[str], *, delist: bool = False) -> int:
        """Mark contracts (ids or names) invalid: subscribing connections are closed with 1008 and new
        subscriptions refused. With `delist`, the static lookups also stop knowing them. Returns how
        many connections were closed."""
        ids = self._resolve_any(identifiers)
        self._invalid |= ids
        if delist:
            self._delisted |= ids
        affected = [connection for connection in self._connections.values() if connection.info.contract_ids & ids]
        self.counters.policy_closes[PolicyCause.CONTRACT_INVALIDATED] += len(affected)
        await asyncio.gather(
            *(self._close(connection, CLOSE_POLICY_VIOLATION, POLICY_CLOSE_MESSAGE) for connection in affected)
        )
        return len(affected)

    def revalidate_contracts(self, identifiers: Iterable[str]) -> None:
        """Make contracts (ids or names) valid and listed again."""
        ids = self._resolve_any(identifiers)
        self._invalid -= ids
        self._delisted -= ids
        self._notify()

    def send_garbage(self, kind: GarbageKind) -> int:
        """Send one malformed frame to every open connection. Returns how many connections."""
        if kind not in GARBAGE_KINDS:
            raise ValueError(f"unknown garbage kind {kind!r}; expected one of {', '.join(GARBAGE_KINDS)}")
        connections = self._open_connections()
        for connection in connections:
            payload, opcode = self._garbage(kind, connection)
            connection.push(None, payload, opcode)
        return len(connections)

    def send_raw(self, payload: bytes, *, binary: bool = False) -> int:
        """Send `payload` byte for byte as one text (or binary) frame to every open connection, invalid UTF-8
        included: what a hostile or broken server may send. Returns how many connections."""
        connections = self._open_connections()
        for connection in connections:
            connection.push(None, payload, WSMsgType.BINARY if binary else WSMsgType.TEXT)
        return len(connections)

    def send_oversized(self, size: int | None = None) -> int:
        """Send every open connection a well-formed snapshot frame padded to `size` bytes (default one
        byte over `max_frame_bytes`). Returns how many connections."""
        size = self.config.max_frame_bytes + 1 if size is None else size
        connections = self._open_connections()
        now = datetime.now(UTC)
        for connection in connections:
            contract_id = min(connection.info.contract_ids)
            snapshot = self._generator.snapshot(contract_id, now)
            frame = connection.heads[contract_id] + self._renderer.timestamp(now).encode() + snapshot.tail
            padding_overhead = len(b', "padding": ""')
            padding = b"x" * max(0, size - len(frame) - padding_overhead)
            connection.push(contract_id, frame[:-1] + b', "padding": "' + padding + b'"}')
        return len(connections)

    def delay_handshakes(self, seconds: float) -> None:
        """Hold every WebSocket upgrade for `seconds` before answering it (0 = no delay)."""
        self._handshake_delay = max(0.0, seconds)
        self._notify()

    def reject_handshakes(self, status: int | None, *, retry_after: int | None = None) -> None:
        """Answer WebSocket upgrades with HTTP `status` instead of upgrading (None = upgrade again); 429 and
        503 carry `Retry-After: retry_after` (None: the config's `retry_after_seconds`)."""
        self._handshake_status = status
        self._handshake_retry_after = retry_after
        self._notify()

    def reject_token_requests(self, status: int | None = 401, *, retry_after: int | None = None) -> None:
        """Answer every token request with `status`, valid credentials included (None = normal); 429 and
        503 carry `Retry-After: retry_after` (None: the config's `retry_after_seconds`)."""
        self._token_endpoint.status = status
        self._token_endpoint.retry_after = retry_after
        self._notify()

    def rate_limit_token_requests(self, seconds: float) -> None:
        """Answer 429, with Retry-After the seconds left (rounded up), to a token request made within
        `seconds` of the last one not refused so (0 = no limit)."""
        self._token_endpoint.rate_limit = max(0.0, seconds)
        self._notify()

    def reset_faults(self) -> None:
        """Clear every fault mode; the config's switches (ignore_close_frames, close_on_token_expiry,
        token_rate_limit_seconds) return to its values. Revoked and expired tokens stay refused."""
        self.stall(False)
        self._accept_then_close = False
        self._accept_close_code = CLOSE_INTERNAL_ERROR
        self._handshake_delay = 0.0
        self._handshake_status = None
        self._handshake_retry_after = None
        self._token_endpoint.reset()
        self._ignore_close_frames = self.config.ignore_close_frames
        self._close_on_token_expiry = self.config.close_on_token_expiry
        self._invalid.clear()
        self._delisted.clear()
        self._notify()

    def fault_modes(self) -> dict[str, Any]:
        """The fault switches as they stand (the admin endpoints answer with them)."""
        return {
            "stalled": self._stalled,
            "accept_then_close": self._accept_then_close,
            "close_on_token_expiry": self._close_on_token_expiry,
            "ignore_close_frames": self._ignore_close_frames,
            "handshake_delay": self._handshake_delay,
            "handshake_status": self._handshake_status,
            "token_status": self._token_endpoint.status,
            "token_rate_limit": self._token_endpoint.rate_limit,
        }

    # --- internals: state changes

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _open_connections(self) -> list[_Connection]:
        return [connection for connection in self._connections.values() if not connection.closing]

    def _resolve_any(self, identifiers: Iterable[str]) -> set[str]:
        ids = set()
        for identifier in identifiers:
            contract = self._by_id.get(identifier) or self._by_name.get(identifier)
            if contract is None:
                raise ValueError(f"unknown contract {identifier!r}")
            ids.add(contract.id)
        return ids

    async def _close(self, connection: _Connection, code: int, message: bytes) -> None:
        connection.closing = True
        await connection.ws.close(code=code, message=message)

    def _close_expired(self) -> int:
        """With close_on_token_expiry, close every streaming connection whose token expired."""
        if not self._close_on_token_expiry:
            return 0
        now = time.time()
        expired = [
            connection
            for connection in self._open_connections()
            if connection.token is not None and self._token_endpoint.authority.expired(connection.token, now)
        ]
        for connection in expired:
            self._token_expired(connection)
        return len(expired)

    def _token_expired(self, connection: _Connection) -> None:
        """The connection's token expired (its timer fired): with close_on_token_expiry, close it with 1008."""
        if not self._close_on_token_expiry or connection.closing:
            return
        connection.closing = True
        self.counters.policy_closes[PolicyCause.TOKEN_EXPIRED] += 1
        self._notify()
        self._spawn(self._close(connection, CLOSE_POLICY_VIOLATION, POLICY_CLOSE_MESSAGE))

    async def _answer_close(self, connection: _Connection) -> None:
        """The client sent a close frame: answer it as aiohttp's autoclose would, unless close frames are
        ignored: then keep streaming, unanswered, until the client drops TCP (or the switch goes off)."""
        transport = connection.transport
        if self._ignore_close_frames and transport is not None and not transport.is_closing():
            self.counters.close_frames_ignored += 1
            self._notify()
            # Nothing to await tells that the client dropped TCP: asyncio transports only say is_closing().
            while self._ignore_close_frames and not transport.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(_DROP_POLL_INTERVAL)
        await connection.ws.close(drain=False)

    def _register(self, connection: _Connection) -> None:
        self._connections[connection.info.id] = connection
        for contract_id in connection.info.contract_ids:
            self._subscribers.setdefault(contract_id, []).append(connection)
        self._notify()

    def _unregister(self, connection: _Connection) -> None:
        connection.closing = True
        connection.drained.set()  # never leave the unpaced generator waiting on a gone connection
        self._connections.pop(connection.info.id, None)
        for contract_id in connection.info.contract_ids:
            subscribers = self._subscribers.get(contract_id, [])
            if connection in subscribers:
                subscribers.remove(connection)
            if not subscribers:
                self._subscribers.pop(contract_id, None)
        self._notify()

    # --- internals: generating and sending

    async def _pump(self) -> None:
        if self._captured is not None:
            await self._pump_captured(self._captured)
        elif self.config.rate > 0:
            await self._pump_paced(self.config.rate)
        else:
            await self._pump_unpaced()

    async def _pump_paced(self, rate: float) -> None:
        loop = asyncio.get_running_loop()
        start, emitted = loop.time(), 0
        while True:
            target = int((loop.time() - start) * rate)
            if target - emitted > rate:  # over a second behind (a blocked loop): forget the debt
                emitted = target - 1
            if target > emitted:
                self._emit(target - emitted)
                emitted = target
            next_due = start + (emitted + 1) / rate
            await asyncio.sleep(max(next_due - loop.time(), self.config.min_interval))

    async def _pump_unpaced(self) -> None:
        while True:
            while self._stalled or not self._subscribers:
                await self._changed.wait()
            self._emit(self.config.burst)
            await self._wait_for_slow_connections()

    async def _wait_for_slow_connections(self) -> None:
        """As fast as clients read: wait while a connection's queue is long, and let the writers run."""
        for connection in list(self._connections.values()):
            if len(connection.queue) > _UNPACED_HIGH_WATER:
                connection.drained.clear()
                await connection.drained.wait()
        await asyncio.sleep(0)  # let the writers run even when every queue is short

    async def _pump_captured(self, market: CapturedMarket) -> None:
        """Play the capture (from its first frame once a client subscribed), at its pace times replay_speed."""
        loop = asyncio.get_running_loop()
        speed = self.config.replay_speed
        while True:
            while not self._subscribers:
                await self._changed.wait()
            start = loop.time()
            for number, frame in enumerate(market.frames):
                if speed > 0 and (delay := start + frame.at / speed - loop.time()) > 0:
                    await asyncio.sleep(delay)
                elif number % self.config.burst == 0:
                    await self._wait_for_slow_connections()
                while self._stalled:
                    await self._changed.wait()
                self._play(frame)
            if not self.config.replay_loop:
                return

    def _play(self, frame: ReplayedFrame) -> None:
        """Queue one captured frame for its contract's subscribers, or for every connection of its endpoint."""
        if frame.contract_id is not None:
            targets = self._subscribers.get(frame.contract_id, [])
        else:
            targets = [c for c in self._open_connections() if c.info.endpoint is frame.endpoint]
        opcode = WSMsgType.TEXT if frame.text else WSMsgType.BINARY
        for connection in targets:
            if not connection.closing:
                connection.push(frame.contract_id, frame.payload, opcode)

    def _emit(self, count: int) -> None:
        """Generate `count` snapshots and queue them for their subscribers."""
        now = datetime.now(UTC)
        items: Sequence[FramePayload] = (
            self._next_prerendered(count) if self._prerendered else self._generator.steps(count, now)
        )
        if self._stalled:
            return
        timestamp = self._renderer.timestamp(now).encode()
        subscribers = self._subscribers
        max_queue = self.config.max_queue
        for item in items:
            connections = subscribers.get(item.contract_id)
            if not connections:
                continue
            tail = item.tail
            sent_as = None if type(item) is _BadFrame else item.contract_id
            for connection in connections:
                if connection.closing:
                    continue
                connection.push(sent_as, connection.heads[item.contract_id] + timestamp + tail)
                if len(connection.queue) > max_queue:
                    connection.closing = True
                    self.counters.slow_consumer_closes += 1
                    self._spawn(self._close(connection, CLOSE_INTERNAL_ERROR, b"slow consumer"))

    def _next_prerendered(self, count: int) -> list[PrerenderedFrame]:
        frames, items = self._prerendered, []
        while count:
            take = min(count, len(frames) - self._cursor)
            items += frames[self._cursor : self._cursor + take]
            self._cursor = (self._cursor + take) % len(frames)
            count -= take
        return items

    async def _write(self, connection: _Connection) -> None:
        """Drain the connection's queue into its socket; one task per connection."""
        ws, queue, wakeup, sent = connection.ws, connection.queue, connection.wakeup, self._sent
        counters = self.counters
        with contextlib.suppress(ConnectionError):
            while True:
                while queue and not self._stalled:
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
                self._notify()
                wakeup.clear()
                await wakeup.wait()

    def _garbage(self, kind: GarbageKind, connection: _Connection) -> tuple[bytes, WSMsgType]:
        if kind == "binary":
            return b"\x00\x01\xffIME\x9c binary garbage", WSMsgType.BINARY
        if kind == "text":
            return b"<html>502 Bad Gateway</html> {not json", WSMsgType.TEXT
        timestamp = self._renderer.timestamp(datetime.now(UTC))
        if kind == "missing_fields":
            return json.dumps({"channel": CHANNEL, "timestamp": timestamp}).encode(), WSMsgType.TEXT
        contract = self._by_id[min(connection.info.contract_ids)]
        key = self._renderer.identifier_field(connection.info.endpoint)
        wrong = {
            "channel": CHANNEL,
            key: contract.name if connection.info.endpoint is Endpoint.NAME else contract.id,
            "timestamp": 1780056000,
            "data": {
                "BestLimit": {"1": {"buy_quantity": "many", "buy_price": [1], "sell_quantity": None, "sell_price": {}}},
                "Aggregate": "closed",
                "AllowedPriceRange": [],
                "ContractInfo": {"open_interest": "n/a", "open_interest_changes": True},
            },
        }
        return json.dumps(wrong).encode(), WSMsgType.TEXT

    # --- internals: HTTP

    def _build_app(self) -> web.Application:
        app = web.Application()
        for endpoint in Endpoint:
            handler = self._live_handler(endpoint)
            app.router.add_get(endpoint.path, handler)
            app.router.add_get(endpoint.legacy_path, handler)
        app.router.add_post(TOKEN_PATH, self._token_endpoint.handle)
        StaticLookups(self._contracts, self._delisted, self._authorize).add_routes(app)
        AdminEndpoints(self).add_routes(app)
        return app

    def _authorize(self, header: str | None) -> PolicyCause | None:
        if header is None or not strip_bearer(header):
            return PolicyCause.MISSING_TOKEN
        return self._token_endpoint.authority.check(strip_bearer(header), time.time())

    def _subscription(self, endpoint: Endpoint, request: web.Request) -> tuple[list[str], PolicyCause | None]:
        identifiers = [value for param in endpoint.query_params for value in request.query.getall(param, [])]
        if not identifiers:
            return [], PolicyCause.NO_CONTRACTS
        lookup = self._by_id if endpoint is Endpoint.ID else self._by_name
        contracts = [lookup.get(identifier) for identifier in identifiers]
        if any(contract is None for contract in contracts):
            return [], PolicyCause.UNKNOWN_CONTRACT
        ids = [contract.id for contract in contracts if contract is not None]
        if self._invalid.intersection(ids):
            return [], PolicyCause.INVALID_CONTRACT
        return identifiers, None

    def _live_handler(self, endpoint: Endpoint) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._live(endpoint, request)

        return handle

    async def _live(self, endpoint: Endpoint, request: web.Request) -> web.StreamResponse:
        self.counters.handshakes += 1
        self._notify()
        if self._handshake_delay:
            await asyncio.sleep(self._handshake_delay)
        if self._handshake_status is not None:
            status = self._handshake_status
            seconds = self._handshake_retry_after
            headers = retry_after_header(status, self.config.retry_after_seconds if seconds is None else seconds)
            return web.json_response({"detail": f"handshake rejected ({status})"}, status=status, headers=headers)
        ws = web.WebSocketResponse(
            autoping=False,  # pings are answered below, so that a stall can stop answering them
            autoclose=False,  # close frames too, so that they can be left unanswered
            compress=self.config.compress,
            timeout=self.config.close_timeout,
        )
        if not ws.can_prepare(request).ok:
            return web.json_response({"detail": "WebSocket upgrade expected"}, status=400)
        await ws.prepare(request)
        self.counters.connections_accepted += 1
        self._notify()
        if self._accept_then_close:
            if self._accept_close_code is None:
                if request.transport is not None:
                    request.transport.abort()
            else:
                await ws.close(code=self._accept_close_code, message=b"")
            return ws
        header = request.headers.get("Authorization")
        cause = self._authorize(header)
        identifiers: list[str] = []
        if cause is None:
            identifiers, cause = self._subscription(endpoint, request)
        if cause is not None:
            self.counters.policy_closes[cause] += 1
            self._notify()
            await ws.close(code=CLOSE_POLICY_VIOLATION, message=POLICY_CLOSE_MESSAGE)
            return ws
        token = self._token_endpoint.authority.claims(strip_bearer(header)) if header is not None else None
        await self._stream(endpoint, request, ws, identifiers, token)
        return ws

    async def _stream(
        self,
        endpoint: Endpoint,
        request: web.Request,
        ws: web.WebSocketResponse,
        identifiers: list[str],
        token: Claims | None,
    ) -> None:
        lookup = self._by_id if endpoint is Endpoint.ID else self._by_name
        contract_ids = frozenset(lookup[identifier].id for identifier in identifiers)
        connection = _Connection(
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
                    if not self._stalled:
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
