"""The IME simulator: a faithful fake of the HT Data Engine service, on one aiohttp port.

Every test, the demo and the benchmark talk to this instead of the real service. It serves:

- `POST /auth/user/token/issue`, form-encoded, with `username`/`password` (documented) or
  `UserName_or_Email`/`Password` (the SDK's). Valid credentials answer 201 `{"Authorization": "<JWT>"}`
  (an HS256 JWT with sub, iat, exp, jti); bad ones 401 `{"detail": ...}`; missing fields 422.
  Default credentials: username `demo`, password `demo-password`.
- The live WebSockets at `Endpoint.ID.path` / `Endpoint.NAME.path` and at the legacy paths without the
  /data-engine/ime prefix. Subscription is the query string: `contract_id` (id endpoint), `contract_name`
  or `contract_names` (name endpoint), repeated. `Authorization` carries the raw JWT or `Bearer <JWT>`.
  The handshake is always accepted; a missing, bad, expired or revoked token, an empty list or any
  unknown or invalidated contract then closes with 1008 and the same generic message, as the real
  service does. Otherwise each changed snapshot of a subscribed contract is sent; the client never sends.
  Real servers' manners, off by default: `close_on_token_expiry` closes a stream with 1008 when its token
  expires; `ignore_close_frames` leaves a client's close frame unanswered and streams on until the client
  drops TCP (it waits out its close timeout).
- Static lookups (GET), answering the envelope `{"Data": [...], "Status": {"Code": 200, "Message": "OK"}}`:
  `STATIC_SEARCH_PATH?market=IMEFutures|IMEOption|IMEDepositCertificate` (all contracts without
  `market`), `STATIC_BY_NAME_PATH?contract_names=..` and `STATIC_BY_ID_PATH?contract_ids=..` (one item
  per identifier, in order, `null` for unknown ones). The token is optional there; a bad one is 401.
  Errors answer `{"detail": ...}` (422 for a missing or invalid parameter).
- Admin endpoints for fault scripts (no authentication: the simulator only ever listens on loopback),
  each answering `{"ok": true, ...}`, 400 on a bad parameter:

  | request | effect (the `Simulator` method) |
  |---|---|
  | `POST /admin/drop` | drop every connection, no close frame (`drop_connections`) |
  | `POST /admin/close?code=1011` | close every connection with `code` (`close_connections`) |
  | `POST /admin/stall?enabled=1` | stop sending data and answering pings; `enabled=0` resumes (`stall`) |
  | `POST /admin/accept-then-close?enabled=1&code=1011` | close new connections once upgraded; `code=abrupt`: drop |
  | `POST /admin/tokens/revoke` | every token issued so far is refused (`revoke_tokens`) |
  | `POST /admin/tokens/expire?ttl=2` | every token issued so far is expired; new ones live `ttl` s (`expire_tokens`) |
  | `POST /admin/tokens/close-on-expiry?enabled=1` | 1008 when a stream's token expires (`close_on_token_expiry`) |
  | `POST /admin/ignore-close-frames?enabled=1` | leave close frames unanswered, stream on (`ignore_close_frames`) |
  | `POST /admin/contracts/invalidate?contract=1001&delist=0` | ids or names become invalid (`invalidate_contracts`) |
  | `POST /admin/contracts/revalidate?contract=1001` | valid again (`revalidate_contracts`) |
  | `POST /admin/garbage?kind=text` | send a bad frame: text, binary, missing_fields, wrong_types (`send_garbage`) |
  | `POST /admin/oversized?size=N` | send a frame of N bytes, default `max_frame_bytes + 1` (`send_oversized`) |
  | `POST /admin/handshake/delay?seconds=3` | delay every upgrade (`delay_handshakes`) |
  | `POST /admin/handshake/reject?status=503&retry_after=1` | upgrades get `status`; none clears (`reject_handshakes`) |
  | `POST /admin/token/reject?status=401&retry_after=1` | requests get `status`; none clears (`reject_token_requests`) |
  | `POST /admin/token/rate-limit?seconds=2` | 429 within `seconds` of the last; 0 = off (`rate_limit_token_requests`) |
  | `POST /admin/reset` | clear every fault mode; switches return to the config's values (`reset_faults`) |
  | `GET /admin/stats` | counters and open connections |

429 and 503 answers carry `Retry-After: retry_after` (default: the config's `retry_after_seconds`); a
rate-limited token request's carries the seconds left, rounded up.

Pacing: `rate` snapshots per second across the whole market (0 = as fast as the connections drain),
generated in bursts per event-loop wake-up; each snapshot goes to every connection subscribed to its
contract, through a per-connection queue and writer task so one slow client does not hold up the others.
A client more than `max_queue` frames behind is closed with 1011, as the real service does when its
Redis subscription overflows. With `rate` 0 the generator instead waits for the slowest connection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import hashlib
import hmac
import json
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo

from aiohttp import WSMsgType, web

from bridge.devtools.market import (
    Contract,
    Dialect,
    FramePayload,
    FrameRenderer,
    MarketGenerator,
    PrerenderedFrame,
    build_catalogue,
    prerender,
)
from bridge.protocol import (
    CHANNEL,
    CLOSE_POLICY_VIOLATION,
    MARKETS,
    PASSWORD_FIELDS,
    STATIC_BY_ID_PATH,
    STATIC_BY_NAME_PATH,
    STATIC_SEARCH_PATH,
    TOKEN_PATH,
    USERNAME_FIELDS,
    Endpoint,
    strip_bearer,
)

ADMIN_PREFIX = "/admin"
# The real service's 1008 does not say whether the token or a contract was at fault.
POLICY_CLOSE_MESSAGE = b"Policy Violation"
CLOSE_INTERNAL_ERROR = 1011
CLOSE_GOING_AWAY = 1001
# Pre-rendered frames kept in memory at most (about 800 bytes each): bounds the benchmark's footprint.
PRERENDER_BUDGET = 65_536
# With rate 0, the generator pauses while a connection has more than this many frames queued.
_UNPACED_HIGH_WATER = 4_096
# While a client's close frame is left unanswered, how often to look whether it dropped the TCP connection.
_DROP_POLL_INTERVAL = 0.05

GarbageKind = Literal["text", "binary", "missing_fields", "wrong_types"]
GARBAGE_KINDS: tuple[GarbageKind, ...] = ("text", "binary", "missing_fields", "wrong_types")


class PolicyCause(enum.StrEnum):
    """Why the simulator closed a connection with 1008 (it never tells the client)."""

    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    EXPIRED_TOKEN = "expired_token"
    REVOKED_TOKEN = "revoked_token"
    NO_CONTRACTS = "no_contracts"
    UNKNOWN_CONTRACT = "unknown_contract"
    INVALID_CONTRACT = "invalid_contract"  # subscribed to a contract marked invalid
    CONTRACT_INVALIDATED = "contract_invalidated"  # connected when one of its contracts became invalid
    TOKEN_EXPIRED = "token_expired"  # connected when its token expired (close_on_token_expiry)


@dataclass
class SimulatorConfig:
    """Everything the simulator can be started with. Port 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    contracts: int = 64
    rate: float = 50.0  # snapshots per second across the market; 0 = as fast as possible
    dialect: Dialect = "ht"
    username: str = "demo"
    password: str = "demo-password"
    token_ttl: float = 3600.0  # lifetime of issued tokens in seconds (`expire_tokens` changes it)
    # Close a streaming connection with 1008 (the generic message) when its token expires, as real servers do.
    close_on_token_expiry: bool = False
    # Leave a client's close frame on a streaming connection unanswered and keep streaming until the client
    # drops the TCP connection: the client waits out its close timeout, as with real servers.
    ignore_close_frames: bool = False
    retry_after_seconds: int | None = 1  # Retry-After of 429 and 503 answers; None sends none
    # A token request within this many seconds of the last one not refused so is answered 429; 0 = no limit.
    token_rate_limit_seconds: float = 0.0
    seed: int = 1
    prerender: bool = False  # cycle through frames rendered up front (the benchmark)
    prerender_variants: int = 32  # per contract, fewer when contracts * variants > PRERENDER_BUDGET
    # With prerender: this share of the frames is malformed, evenly spread (0.1: every 10th frame), cycling
    # through invalid JSON, a wrong-typed field and a contract nobody subscribed; sent as fault frames.
    bad_frame_ratio: float = 0.0
    record_sent: bool = False  # keep every frame sent, for `sent_frames`
    naive_zone: str = "UTC"  # zone of legacy naive timestamps and of Aggregate date/time
    max_frame_bytes: int = 1 << 20  # the clients' frame limit (websockets' default); oversized exceeds it
    # Accept permessage-deflate when a client offers it, as the real service does; it costs about 13 µs per
    # frame here, so benchmarks turn it off (or their client does not offer it).
    compress: bool = True
    min_interval: float = 0.005  # shortest pause between two paced bursts
    burst: int = 256  # snapshots per wake-up when rate is 0
    max_queue: int = 65_536  # frames queued per connection before it is closed as too slow
    close_timeout: float = 5.0  # how long a close waits for the client's close frame
    jwt_secret: str = "ime-bridge-simulator"


@dataclass
class SimulatorCounters:
    """What the simulator did, for tests to assert on."""

    handshakes: int = 0  # WebSocket requests, rejected ones included
    connections_accepted: int = 0  # upgrades completed, before token and contract checks
    tokens_issued: int = 0
    token_requests: int = 0
    frames_sent: int = 0
    policy_closes: Counter[PolicyCause] = field(default_factory=Counter)  # 1008 closes by cause
    slow_consumer_closes: int = 0
    close_frames_ignored: int = 0  # clients' close frames left unanswered (ignore_close_frames)
    token_requests_rate_limited: int = 0  # token requests answered 429 by token_rate_limit_seconds


@dataclass(frozen=True, slots=True)
class ServerConnection:
    """One open, streaming connection."""

    id: int
    endpoint: Endpoint
    path: str
    identifiers: tuple[str, ...]  # as requested: ids or names
    contract_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class SentFrame:
    """One frame as it went out: text for text frames, bytes for binary ones."""

    connection_id: int
    contract_id: str | None  # None for fault frames
    payload: str | bytes


_QueueItem = tuple[str | None, bytes, WSMsgType]


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
        self.token: _Claims | None = None  # the claims of the token it connected with
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


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_Claims = tuple[float, str]  # a token's exp and jti


class _TokenAuthority:
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

    def claims(self, token: str) -> _Claims | None:
        """A well-signed token's exp and jti; None for a bad token."""
        try:
            header, payload, signature = token.split(".")
            if not hmac.compare_digest(signature, self._sign(f"{header}.{payload}")):
                return None
            claims = json.loads(_b64decode(payload))
            return float(claims["exp"]), str(claims["jti"])
        except (ValueError, KeyError, TypeError):
            return None

    def expired(self, claims: _Claims, now: float) -> bool:
        expires, jti = claims
        return expires <= now or jti in self._expired

    def revoke_all(self) -> None:
        self._revoked |= self._issued

    def expire_all(self) -> None:
        self._expired |= self._issued

    def _sign(self, signing_input: str) -> str:
        return _b64encode(hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest())


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
        self._contracts = build_catalogue(self.config.contracts)
        self._by_id = {contract.id: contract for contract in self._contracts}
        self._by_name = {contract.name: contract for contract in self._contracts}
        zone = _zone(self.config.naive_zone)
        self._generator = MarketGenerator(self._contracts, seed=self.config.seed, zone=zone)
        self._renderer = FrameRenderer(self.config.dialect, zone)
        self._heads = {
            endpoint: {contract.id: self._renderer.head(contract, endpoint) for contract in self._contracts}
            for endpoint in Endpoint
        }
        self._tokens = _TokenAuthority(self.config.jwt_secret)
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
        self._token_status: int | None = None
        self._handshake_retry_after: int | None = None  # None: the config's retry_after_seconds
        self._token_retry_after: int | None = None
        self._ignore_close_frames = self.config.ignore_close_frames
        self._close_on_token_expiry = self.config.close_on_token_expiry
        self._token_rate_limit = self.config.token_rate_limit_seconds
        self._last_token_request: float | None = None  # monotonic time of the last one not rate-limited
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
        self.counters.tokens_issued += 1
        self._notify()
        return self._tokens.issue(self.config.username, self.config.token_ttl if ttl is None else ttl, time.time())

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
        self._tokens.revoke_all()
        self._notify()

    def expire_tokens(self, ttl: float | None = None) -> None:
        """Every token issued so far counts as expired; with `ttl`, new tokens live that long. With
        `close_on_token_expiry`, streaming connections are closed with 1008 at once."""
        self._tokens.expire_all()
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
        self._token_status = status
        self._token_retry_after = retry_after
        self._notify()

    def rate_limit_token_requests(self, seconds: float) -> None:
        """Answer 429, with Retry-After the seconds left (rounded up), to a token request made within
        `seconds` of the last one not refused so (0 = no limit)."""
        self._token_rate_limit = max(0.0, seconds)
        self._notify()

    def reset_faults(self) -> None:
        """Clear every fault mode; the config's switches (ignore_close_frames, close_on_token_expiry,
        token_rate_limit_seconds) return to its values. Revoked and expired tokens stay refused."""
        self.stall(False)
        self._accept_then_close = False
        self._accept_close_code = CLOSE_INTERNAL_ERROR
        self._handshake_delay = 0.0
        self._handshake_status = self._token_status = None
        self._handshake_retry_after = self._token_retry_after = None
        self._ignore_close_frames = self.config.ignore_close_frames
        self._close_on_token_expiry = self.config.close_on_token_expiry
        self._token_rate_limit = self.config.token_rate_limit_seconds
        self._invalid.clear()
        self._delisted.clear()
        self._notify()

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
            if connection.token is not None and self._tokens.expired(connection.token, now)
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
        if self.config.rate > 0:
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
            for connection in list(self._connections.values()):
                if len(connection.queue) > _UNPACED_HIGH_WATER:
                    connection.drained.clear()
                    await connection.drained.wait()
            await asyncio.sleep(0)  # let the writers run even when every queue is short

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
        app.router.add_post(TOKEN_PATH, self._issue)
        app.router.add_get(STATIC_SEARCH_PATH, self._static_search)
        app.router.add_get(STATIC_BY_NAME_PATH, self._static_by_name)
        app.router.add_get(STATIC_BY_ID_PATH, self._static_by_id)
        admin: list[tuple[str, Callable[[web.Request], Coroutine[Any, Any, dict[str, Any]]]]] = [
            ("drop", self._admin_drop),
            ("close", self._admin_close),
            ("stall", self._admin_stall),
            ("accept-then-close", self._admin_accept_then_close),
            ("tokens/revoke", self._admin_revoke),
            ("tokens/expire", self._admin_expire),
            ("tokens/close-on-expiry", self._admin_close_on_expiry),
            ("ignore-close-frames", self._admin_ignore_close_frames),
            ("contracts/invalidate", self._admin_invalidate),
            ("contracts/revalidate", self._admin_revalidate),
            ("garbage", self._admin_garbage),
            ("oversized", self._admin_oversized),
            ("handshake/delay", self._admin_handshake_delay),
            ("handshake/reject", self._admin_handshake_reject),
            ("token/reject", self._admin_token_reject),
            ("token/rate-limit", self._admin_token_rate_limit),
            ("reset", self._admin_reset),
        ]
        for name, action in admin:
            app.router.add_post(f"{ADMIN_PREFIX}/{name}", self._admin_handler(action))
        app.router.add_get(f"{ADMIN_PREFIX}/stats", self._admin_stats)
        return app

    def _authorize(self, header: str | None) -> PolicyCause | None:
        if header is None or not strip_bearer(header):
            return PolicyCause.MISSING_TOKEN
        return self._tokens.check(strip_bearer(header), time.time())

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
            headers = self._retry_after(status, self._handshake_retry_after)
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
        token = self._tokens.claims(strip_bearer(header)) if header is not None else None
        await self._stream(endpoint, request, ws, identifiers, token)
        return ws

    async def _stream(
        self,
        endpoint: Endpoint,
        request: web.Request,
        ws: web.WebSocketResponse,
        identifiers: list[str],
        token: _Claims | None,
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

    async def _issue(self, request: web.Request) -> web.Response:
        self.counters.token_requests += 1
        now = time.monotonic()
        if self._token_rate_limit > 0 and self._last_token_request is not None:
            remaining = self._last_token_request + self._token_rate_limit - now
            if remaining > 0:
                self.counters.token_requests_rate_limited += 1
                self._notify()
                retry_after = {"Retry-After": str(math.ceil(remaining))}
                return web.json_response({"detail": "too many token requests"}, status=429, headers=retry_after)
        self._last_token_request = now
        if self._token_status is not None:
            headers = self._retry_after(self._token_status, self._token_retry_after)
            return web.json_response(
                {"detail": "token issuing is unavailable"}, status=self._token_status, headers=headers
            )
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
        return web.json_response({"Authorization": self.issue_token()}, status=201)

    def _retry_after(self, status: int, seconds: int | None) -> dict[str, str] | None:
        """The Retry-After header of a 429 or 503 answer (`seconds` None: the config's)."""
        if seconds is None:
            seconds = self.config.retry_after_seconds
        return {"Retry-After": str(seconds)} if status in (429, 503) and seconds is not None else None

    def _static_check(self, request: web.Request) -> web.Response | None:
        """401 when a token is given and bad; the static lookups also answer without one."""
        header = request.headers.get("Authorization")
        if header is not None and self._authorize(header) is not None:
            return web.json_response({"detail": "Could not validate credentials"}, status=401)
        return None

    def _static_items(self, contracts: Iterable[Contract | None]) -> web.Response:
        data = [
            None if contract is None or contract.id in self._delisted else contract.static_item()
            for contract in contracts
        ]
        body = {"Data": data, "Status": {"Code": 200, "Message": "OK"}}
        return web.json_response(body, dumps=_dumps_unicode)

    async def _static_search(self, request: web.Request) -> web.Response:
        refused = self._static_check(request)
        if refused is not None:
            return refused
        market = request.query.get("market")
        if market is not None and market not in MARKETS:
            detail = f"market must be one of {', '.join(MARKETS)}"
            return web.json_response({"detail": detail}, status=422)
        return self._static_items(
            contract
            for contract in self._contracts
            if (market is None or contract.market == market) and contract.id not in self._delisted
        )

    async def _static_by_name(self, request: web.Request) -> web.Response:
        return self._static_lookup(request, Endpoint.NAME, self._by_name)

    async def _static_by_id(self, request: web.Request) -> web.Response:
        return self._static_lookup(request, Endpoint.ID, self._by_id)

    def _static_lookup(self, request: web.Request, endpoint: Endpoint, lookup: dict[str, Contract]) -> web.Response:
        refused = self._static_check(request)
        if refused is not None:
            return refused
        param = endpoint.static_lookup_param
        identifiers = request.query.getall(param, [])
        if not identifiers:
            return web.json_response({"detail": f"query parameter {param} is required"}, status=422)
        return self._static_items(lookup.get(identifier) for identifier in identifiers)

    # --- internals: admin

    def _admin_handler(
        self, action: Callable[[web.Request], Coroutine[Any, Any, dict[str, Any]]]
    ) -> Callable[[web.Request], Coroutine[Any, Any, web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                result = await action(request)
            except ValueError as exc:
                return web.json_response({"ok": False, "detail": str(exc)}, status=400)
            return web.json_response({"ok": True, **result})

        return handle

    async def _admin_drop(self, request: web.Request) -> dict[str, Any]:
        return {"connections": await self.drop_connections()}

    async def _admin_close(self, request: web.Request) -> dict[str, Any]:
        code = _int_param(request, "code")
        closed = await self.close_connections(
            CLOSE_INTERNAL_ERROR if code is None else code, request.query.get("message", "")
        )
        return {"connections": closed}

    async def _admin_stall(self, request: web.Request) -> dict[str, Any]:
        self.stall(_bool_param(request, "enabled", True))
        return {"stalled": self._stalled}

    async def _admin_accept_then_close(self, request: web.Request) -> dict[str, Any]:
        code: int | None = None
        if request.query.get("code") != "abrupt":
            given = _int_param(request, "code")
            code = CLOSE_INTERNAL_ERROR if given is None else given
        self.accept_then_close(_bool_param(request, "enabled", True), code=code)
        return {"enabled": self._accept_then_close, "code": code}

    async def _admin_revoke(self, request: web.Request) -> dict[str, Any]:
        self.revoke_tokens()
        return {}

    async def _admin_expire(self, request: web.Request) -> dict[str, Any]:
        self.expire_tokens(_float_param(request, "ttl"))
        return {"token_ttl": self.config.token_ttl}

    async def _admin_close_on_expiry(self, request: web.Request) -> dict[str, Any]:
        closed = self.close_on_token_expiry(_bool_param(request, "enabled", True))
        return {"enabled": self._close_on_token_expiry, "connections": closed}

    async def _admin_ignore_close_frames(self, request: web.Request) -> dict[str, Any]:
        self.ignore_close_frames(_bool_param(request, "enabled", True))
        return {"enabled": self._ignore_close_frames}

    async def _admin_invalidate(self, request: web.Request) -> dict[str, Any]:
        identifiers = request.query.getall("contract", [])
        closed = await self.invalidate_contracts(identifiers, delist=_bool_param(request, "delist", False))
        return {"connections": closed}

    async def _admin_revalidate(self, request: web.Request) -> dict[str, Any]:
        self.revalidate_contracts(request.query.getall("contract", []))
        return {}

    async def _admin_garbage(self, request: web.Request) -> dict[str, Any]:
        kind = request.query.get("kind", "text")
        for known in GARBAGE_KINDS:
            if kind == known:
                return {"connections": self.send_garbage(known)}
        raise ValueError(f"kind must be one of {', '.join(GARBAGE_KINDS)}")

    async def _admin_oversized(self, request: web.Request) -> dict[str, Any]:
        return {"connections": self.send_oversized(_int_param(request, "size"))}

    async def _admin_handshake_delay(self, request: web.Request) -> dict[str, Any]:
        self.delay_handshakes(_float_param(request, "seconds") or 0.0)
        return {"seconds": self._handshake_delay}

    async def _admin_handshake_reject(self, request: web.Request) -> dict[str, Any]:
        self.reject_handshakes(_status_param(request), retry_after=_retry_after_param(request))
        return {"status": self._handshake_status}

    async def _admin_token_reject(self, request: web.Request) -> dict[str, Any]:
        self.reject_token_requests(_status_param(request), retry_after=_retry_after_param(request))
        return {"status": self._token_status}

    async def _admin_token_rate_limit(self, request: web.Request) -> dict[str, Any]:
        self.rate_limit_token_requests(_float_param(request, "seconds") or 0.0)
        return {"seconds": self._token_rate_limit}

    async def _admin_reset(self, request: web.Request) -> dict[str, Any]:
        self.reset_faults()
        return {}

    async def _admin_stats(self, request: web.Request) -> web.Response:
        counters = self.counters
        return web.json_response(
            {
                "handshakes": counters.handshakes,
                "connections_accepted": counters.connections_accepted,
                "tokens_issued": counters.tokens_issued,
                "token_requests": counters.token_requests,
                "frames_sent": counters.frames_sent,
                "policy_closes": dict(counters.policy_closes),
                "slow_consumer_closes": counters.slow_consumer_closes,
                "close_frames_ignored": counters.close_frames_ignored,
                "token_requests_rate_limited": counters.token_requests_rate_limited,
                "connections": [
                    {
                        "id": info.id,
                        "endpoint": info.endpoint.value,
                        "path": info.path,
                        "contract_ids": sorted(info.contract_ids),
                    }
                    for info in self.connections
                ],
            }
        )


def _dumps_unicode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _int_param(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def _float_param(request: web.Request, name: str) -> float | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None


def _bool_param(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean, got {text!r}")


def _status_param(request: web.Request) -> int | None:
    status = _int_param(request, "status")
    if not status:  # absent or 0: clear the fault
        return None
    if not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status, got {status}")
    return status


def _retry_after_param(request: web.Request) -> int | None:
    seconds = _int_param(request, "retry_after")
    if seconds is not None and seconds < 0:
        raise ValueError(f"retry_after must not be negative, got {seconds}")
    return seconds


# --- CLI glue, wired into `ime-bridge simulate`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to `parser` (defaults from SimulatorConfig)."""
    defaults = SimulatorConfig()
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="port to listen on; 0 picks a free one (default %(default)s)"
    )
    parser.add_argument(
        "--contracts",
        type=int,
        default=defaults.contracts,
        help="number of contracts in the simulated market (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="snapshots per second across the market; 0 = as fast as clients read (default %(default)s)",
    )
    parser.add_argument(
        "--dialect",
        choices=("ht", "legacy"),
        default=defaults.dialect,
        help="frame dialect: ht (contractId, UTC timestamps with Z) or legacy (ContractId, naive timestamps)",
    )
    parser.add_argument("--username", default=defaults.username, help="accepted username (default %(default)s)")
    parser.add_argument("--password", default=defaults.password, help="accepted password (default %(default)s)")
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=defaults.token_ttl,
        help="lifetime of issued tokens in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed of the market generator (default %(default)s)"
    )
    parser.add_argument(
        "--prerender",
        action="store_true",
        help="cycle through frames rendered at start, for benchmarks (the simulator then costs little CPU)",
    )
    parser.add_argument(
        "--bad-frame-ratio",
        type=float,
        default=defaults.bad_frame_ratio,
        help="with --prerender: share of malformed frames, e.g. 0.1 for every 10th (default %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The SimulatorConfig for options added by `add_arguments`."""
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        contracts=args.contracts,
        rate=args.rate,
        dialect=args.dialect,
        username=args.username,
        password=args.password,
        token_ttl=args.token_ttl,
        seed=args.seed,
        prerender=args.prerender,
        bad_frame_ratio=args.bad_frame_ratio,
    )


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve a simulator configured by `args` until cancelled, after printing where and how to log in."""
    async with Simulator(config_from_args(args)) as simulator:
        config = simulator.config
        print(
            f"IME simulator: http {simulator.base_url} ws {simulator.ws_url} "
            f"username={config.username} password={config.password} "
            f"contracts={config.contracts} rate={config.rate:g}/s dialect={config.dialect}",
            flush=True,
        )
        await asyncio.Event().wait()
