"""The simulator's server: `Simulator`, its lifecycle, what tests read and the fault API they drive, wired
into one aiohttp app with the token, static, live and admin parts (tokens.py, static.py, live.py, admin.py) and
the market feed (feed.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import WSMsgType, web

from bridge.devtools.market import Contract, FrameRenderer, MarketGenerator, build_catalogue
from bridge.devtools.simulator.admin import AdminEndpoints
from bridge.devtools.simulator.feed import MarketFeed
from bridge.devtools.simulator.live import Changes, LiveEndpoints, LiveSwitches
from bridge.devtools.simulator.model import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    GARBAGE_KINDS,
    POLICY_CLOSE_MESSAGE,
    Catalogue,
    GarbageKind,
    PolicyCause,
    SentFrame,
    ServerConnection,
    SimulatorConfig,
    SimulatorCounters,
)
from bridge.devtools.simulator.replay import CapturedMarket
from bridge.devtools.simulator.static import StaticLookups
from bridge.devtools.simulator.tokens import TokenEndpoint
from bridge.protocol import CLOSE_POLICY_VIOLATION, TOKEN_PATH, Endpoint, strip_bearer


def _zone(name: str) -> tzinfo:
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


class Simulator:
    """The fake IME service. Use as `async with Simulator(SimulatorConfig(...)) as sim:`."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.counters = SimulatorCounters()
        captured = CapturedMarket.load(self.config.replay) if self.config.replay is not None else None
        self._catalogue = Catalogue.of(captured.contracts if captured else build_catalogue(self.config.contracts))
        zone = _zone(self.config.naive_zone)
        generator = MarketGenerator(self._catalogue.contracts, seed=self.config.seed, zone=zone)
        renderer = FrameRenderer(self.config.dialect, zone)
        heads = {
            endpoint: {contract.id: renderer.head(contract, endpoint) for contract in self._catalogue.contracts}
            for endpoint in Endpoint
        }
        self._changes = Changes()
        self._token_endpoint = TokenEndpoint(self.config, self.counters, self._notify)
        self._sent: list[SentFrame] | None = [] if self.config.record_sent else None
        # Fault modes: the live part's switches, and the contracts made invalid (and delisted).
        self._switches = LiveSwitches(
            ignore_close_frames=self.config.ignore_close_frames,
            close_on_token_expiry=self.config.close_on_token_expiry,
        )
        self._invalid: set[str] = set()
        self._delisted: set[str] = set()
        self._live = LiveEndpoints(
            self.config,
            self.counters,
            self._changes,
            self._switches,
            catalogue=self._catalogue,
            invalid=self._invalid,
            heads=heads,
            authority=self._token_endpoint.authority,
            authorize=self._authorize,
            sent=self._sent,
        )
        self._feed = MarketFeed(
            self.config,
            self.counters,
            self._changes,
            self._switches,
            self._live,
            catalogue=self._catalogue,
            generator=generator,
            renderer=renderer,
            captured=captured,
        )
        self._pump_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._stopped = False

    # --- lifecycle

    async def start(self) -> None:
        """Bind the port, and start generating the market."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        if not 0.0 <= self.config.bad_frame_ratio <= 1.0 or (self.config.bad_frame_ratio and not self.config.prerender):
            raise ValueError("bad_frame_ratio must be between 0 and 1, and needs prerender")
        if self.config.prerender:
            self._feed.prerender()
        runner = web.AppRunner(self._build_app(), access_log=None, shutdown_timeout=self.config.close_timeout)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._pump_task = asyncio.create_task(self._feed.run(), name="ime-simulator-pump")

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
        await self._live.cancel_pending()
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
        return list(self._catalogue.contracts)

    @property
    def connections(self) -> list[ServerConnection]:
        """The connections currently streaming, in the order they opened."""
        return [connection.info for connection in self._live.connections]

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
            await self._changes.wait()

    # --- faults

    async def drop_connections(self) -> int:
        """Abort every connection's TCP stream, without a close frame. Returns how many."""
        dropped = self._live.connections
        for connection in dropped:
            connection.closing = True
            if connection.transport is not None:
                connection.transport.abort()
        return len(dropped)

    async def close_connections(self, code: int = CLOSE_INTERNAL_ERROR, message: str = "") -> int:
        """Close every connection with `code`, as the service does when its backend fails."""
        closing = self._live.connections
        await asyncio.gather(*(self._live.close(connection, code, message.encode()) for connection in closing))
        return len(closing)

    def stall(self, enabled: bool = True) -> None:
        """Stop (or resume) sending anything and answering pings; connections stay open. Frames already
        queued go out on resume; snapshots generated meanwhile are never sent."""
        self._switches.stalled = enabled
        if not enabled:
            for connection in self._live.connections:
                connection.wakeup.set()
        self._notify()

    async def stall_and_settle(self, within: float = 30.0) -> None:
        """Stall, then wait (at most `within` seconds) until no frame is mid-write: from then on
        `sent_frames()` and `counters` hold everything the bridge can receive, until the stall ends."""
        self.stall()
        async with asyncio.timeout(within):
            await self.wait_for(lambda: not any(connection.writing for connection in self._live.connections))

    def accept_then_close(self, enabled: bool = True, *, code: int | None = CLOSE_INTERNAL_ERROR) -> None:
        """New connections are upgraded and then closed at once with `code` (None: dropped)."""
        self._switches.accept_then_close = enabled
        self._switches.accept_close_code = code
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
        self._live.close_expired()
        self._notify()

    def close_on_token_expiry(self, enabled: bool = True) -> int:
        """Close (or stop closing) streaming connections with 1008 when their token expires; when enabled,
        those whose token already expired are closed at once. Returns how many those were."""
        self._switches.close_on_token_expiry = enabled
        closed = self._live.close_expired()
        self._notify()
        return closed

    def ignore_close_frames(self, enabled: bool = True) -> None:
        """Leave clients' close frames on streaming connections unanswered (or answer them again): the
        connection keeps streaming until the client drops TCP. Turning it off answers the waiting ones."""
        self._switches.ignore_close_frames = enabled
        self._notify()

    async def invalidate_contracts(self, identifiers: Iterable[str], *, delist: bool = False) -> int:
        """Mark contracts (ids or names) invalid: subscribing connections are closed with 1008 and new
        subscriptions refused. With `delist`, the static lookups also stop knowing them. Returns how
        many connections were closed."""
        ids = self._resolve_any(identifiers)
        self._invalid |= ids
        if delist:
            self._delisted |= ids
        affected = [connection for connection in self._live.connections if connection.info.contract_ids & ids]
        self.counters.policy_closes[PolicyCause.CONTRACT_INVALIDATED] += len(affected)
        await asyncio.gather(
            *(self._live.close(connection, CLOSE_POLICY_VIOLATION, POLICY_CLOSE_MESSAGE) for connection in affected)
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
        connections = self._live.open_connections()
        for connection in connections:
            payload, opcode = self._feed.garbage(kind, connection)
            connection.push(None, payload, opcode)
        return len(connections)

    def send_raw(self, payload: bytes, *, binary: bool = False) -> int:
        """Send `payload` byte for byte as one text (or binary) frame to every open connection, invalid UTF-8
        included: what a hostile or broken server may send. Returns how many connections."""
        connections = self._live.open_connections()
        for connection in connections:
            connection.push(None, payload, WSMsgType.BINARY if binary else WSMsgType.TEXT)
        return len(connections)

    def send_oversized(self, size: int | None = None) -> int:
        """Send every open connection a well-formed snapshot frame padded to `size` bytes (default one
        byte over `max_frame_bytes`). Returns how many connections."""
        size = self.config.max_frame_bytes + 1 if size is None else size
        connections = self._live.open_connections()
        now = datetime.now(UTC)
        for connection in connections:
            contract_id, frame = self._feed.oversized(connection, size, now)
            connection.push(contract_id, frame)
        return len(connections)

    def delay_handshakes(self, seconds: float) -> None:
        """Hold every WebSocket upgrade for `seconds` before answering it (0 = no delay)."""
        self._switches.handshake_delay = max(0.0, seconds)
        self._notify()

    def reject_handshakes(self, status: int | None, *, retry_after: int | None = None) -> None:
        """Answer WebSocket upgrades with HTTP `status` instead of upgrading (None = upgrade again); 429 and
        503 carry `Retry-After: retry_after` (None: the config's `retry_after_seconds`)."""
        self._switches.handshake_status = status
        self._switches.handshake_retry_after = retry_after
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
        switches = self._switches
        switches.accept_then_close = False
        switches.accept_close_code = CLOSE_INTERNAL_ERROR
        switches.handshake_delay = 0.0
        switches.handshake_status = None
        switches.handshake_retry_after = None
        self._token_endpoint.reset()
        switches.ignore_close_frames = self.config.ignore_close_frames
        switches.close_on_token_expiry = self.config.close_on_token_expiry
        self._invalid.clear()
        self._delisted.clear()
        self._notify()

    def fault_modes(self) -> dict[str, Any]:
        """The fault switches as they stand (the admin endpoints answer with them)."""
        switches = self._switches
        return {
            "stalled": switches.stalled,
            "accept_then_close": switches.accept_then_close,
            "close_on_token_expiry": switches.close_on_token_expiry,
            "ignore_close_frames": switches.ignore_close_frames,
            "handshake_delay": switches.handshake_delay,
            "handshake_status": switches.handshake_status,
            "token_status": self._token_endpoint.status,
            "token_rate_limit": self._token_endpoint.rate_limit,
        }

    # --- internals

    def _notify(self) -> None:
        self._changes.notify()

    def _resolve_any(self, identifiers: Iterable[str]) -> set[str]:
        ids = set()
        for identifier in identifiers:
            contract = self._catalogue.by_id.get(identifier) or self._catalogue.by_name.get(identifier)
            if contract is None:
                raise ValueError(f"unknown contract {identifier!r}")
            ids.add(contract.id)
        return ids

    def _authorize(self, header: str | None) -> PolicyCause | None:
        if header is None or not strip_bearer(header):
            return PolicyCause.MISSING_TOKEN
        return self._token_endpoint.authority.check(strip_bearer(header), time.time())

    def _build_app(self) -> web.Application:
        app = web.Application()
        for endpoint in Endpoint:
            handler = self._live.handler(endpoint)
            app.router.add_get(endpoint.path, handler)
            app.router.add_get(endpoint.legacy_path, handler)
        app.router.add_post(TOKEN_PATH, self._token_endpoint.handle)
        StaticLookups(self._catalogue, self._delisted, self._authorize).add_routes(app)
        AdminEndpoints(self).add_routes(app)
        return app
