"""The IME WebSocket side: one long-lived task per subscription, each reconnecting on its own.

Frames are handed to the pipeline as they arrive, a burst at a time (the frames websockets had queued by the time
one was read) with the burst's receive time, synchronously; the handler never blocks, so the reader
keeps answering pings whatever Kafka does. Every ended connection is classified into a bounded `reason` and
followed by a jittered, capped exponential backoff that resets only after the connection stayed up for
`healthy_after` seconds, so a server that accepts and closes at once is not hammered. A 1008 close is
answered by one token re-issue; a second 1008 on a fresh token means an invalid contract in the list.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode

from bridge import protocol
from bridge.auth import AuthError, AuthRejected, TokenProvider
from bridge.config import ImeSettings
from bridge.logs import log_event, log_exception
from bridge.metrics import Metrics
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.refusals import PolicyCause, PolicyRefusals
from bridge.retry import Backoff
from bridge.supervise import supervised

logger = logging.getLogger(__name__)

# A burst of frames received together (websockets had queued them by the time the first was read), their receive
# time (µs since the epoch) and connection.
FrameHandler = Callable[[list[bytes], int, ConnectionInfo], None]


# After a ping timeout websockets still waits this long for a close reply a dead path never sends.
CLOSE_TIMEOUT = 1.0
# Frames websockets buffers before pausing the socket; 16 (its default) pauses on every burst.
MAX_QUEUED_FRAMES = 128


# How long a probe connection must stay open (or deliver a frame) to count as accepted. The service
# refuses an invalid subscription right after the handshake.
PROBE_WINDOW = 3.0
# A probe does not wait for the server's answer to its close frame: many servers do not answer while they
# stream, and every valid contract of a refused subscription waits for the search.
PROBE_CLOSE_TIMEOUT = 0.2


class SourceUnavailable(Exception):
    """The service could not be reached or did not answer in a way that tells anything."""


class SourceFatal(Exception):
    """A failure that retrying cannot fix (TLS verification): the bridge must stop, loudly."""


class CloseReason(enum.StrEnum):
    """Why a connection attempt ended: the bounded `reason` label of reconnects and logs."""

    AUTH_REJECTED = "auth_rejected"  # the token endpoint refused the credentials
    AUTH_UNAVAILABLE = "auth_unavailable"  # no token could be had (network, server error)
    POLICY_VIOLATION = "policy_violation"  # 1008: a bad token or an invalid contract in the list
    FRAME_TOO_LARGE = "frame_too_large"  # the bridge closed with 1009
    STALE = "stale"  # the watchdog closed a silent connection
    CLOSED_BY_SERVER = "closed_by_server"  # 1000
    SERVER_GOING_AWAY = "server_going_away"  # 1001
    SERVER_ERROR = "server_error"  # 1011
    CLOSED_OTHER = "closed_other"  # any other close code
    CONNECTION_LOST = "connection_lost"  # no close frame
    NETWORK_ERROR = "network_error"  # never opened: refused, unreachable, handshake failed
    TLS_ERROR = "tls_error"  # certificate verification failed: fatal
    HTTP_401 = "http_401"
    HTTP_403 = "http_403"
    HTTP_404 = "http_404"
    HTTP_429 = "http_429"
    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    HTTP_504 = "http_504"
    HTTP_1XX = "http_1xx"
    HTTP_2XX = "http_2xx"
    HTTP_3XX = "http_3xx"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"

    @classmethod
    def of_close_code(cls, code: int | None) -> CloseReason:
        """How the server ended the connection (None: no close frame)."""
        if code is None:
            return cls.CONNECTION_LOST
        return _CLOSE_REASONS.get(code, cls.CLOSED_OTHER)

    @classmethod
    def of_http_status(cls, status: int) -> CloseReason:
        """A refused handshake: the status itself where it tells something, else its class."""
        try:
            return cls(f"http_{status}")
        except ValueError:
            return cls(f"http_{status // 100}xx")


_CLOSE_REASONS = {
    1000: CloseReason.CLOSED_BY_SERVER,
    1001: CloseReason.SERVER_GOING_AWAY,
    1011: CloseReason.SERVER_ERROR,
}


@dataclass
class _Connection:
    subscription: Subscription
    task: asyncio.Task[None]
    ws: ClientConnection | None = None
    up: bool = False
    last_close: str = "never connected"
    stale: bool = False  # the watchdog closed it
    received: bool = False  # a frame came on the current attempt


@dataclass(frozen=True)
class _Ended:
    """How one connection attempt ended: why, when it opened and closed (monotonic; None: never opened), with
    which token, whether a frame came, and a server's Retry-After."""

    reason: CloseReason
    opened_at: float | None = None
    closed_at: float = 0.0
    token: str = ""
    received: bool = False
    retry_after: float | None = None

    @property
    def seconds_open(self) -> float:
        return 0.0 if self.opened_at is None else self.closed_at - self.opened_at


@dataclass
class WebSocketSource:
    """Keeps every subscription connected and feeds their frames to `handler`.

    `apply(plan)` changes the subscriptions live: connections whose contract set is unchanged stay open.
    A subscription refused with 1008 even on a fresh token is put on `refused` and no longer retried here:
    its list holds an invalid contract, which the subscription manager (the queue's reader) finds and
    quarantines.
    """

    settings: ImeSettings
    tokens: TokenProvider
    handler: FrameHandler
    metrics: Metrics
    refused: asyncio.Queue[Subscription] = field(default_factory=asyncio.Queue)
    # A frame past max_message_bytes: the connection was closed with 1009 before the frame was read.
    on_frame_too_large: Callable[[ConnectionInfo, str], None] | None = None
    # A connection opened, before its first frame is read (raw capture writes its subscription marker then).
    on_open: Callable[[ConnectionInfo], None] | None = None
    _connections: dict[str, _Connection] = field(default_factory=dict)
    _last_message_at: dict[str, float] = field(default_factory=dict)
    _stopping: bool = False
    _wanted: set[str] = field(default_factory=set)  # the names of the last plan applied

    def __post_init__(self) -> None:
        self._fatal: asyncio.Future[SourceFatal] = asyncio.get_running_loop().create_future()
        self._ws_url = str(self.settings.ws_url)

    async def fatal(self) -> SourceFatal:
        """Wait for a failure retrying cannot fix (TLS verification); the bridge must then stop."""
        return await asyncio.shield(self._fatal)

    @property
    def subscriptions(self) -> list[Subscription]:
        """The subscriptions currently kept."""
        return [connection.subscription for connection in self._connections.values()]

    async def apply(self, plan: Sequence[Subscription]) -> set[str]:
        """Keep exactly `plan`: start new subscriptions, reopen changed ones, close removed ones.

        Returns the names of the connections opened or reopened.
        """
        wanted = {subscription.name: subscription for subscription in plan}
        self._wanted = set(wanted)
        # At once: each close may wait CLOSE_TIMEOUT for a server that does not answer close frames.
        changed = [name for name in self._connections if wanted.get(name) != self._connections[name].subscription]
        await asyncio.gather(*(self._close(name) for name in changed))
        started = set()
        for name, subscription in wanted.items():
            if name not in self._connections:
                self._start(subscription)
                started.add(name)
        self._refresh_totals()
        return started

    def _start(self, subscription: Subscription) -> None:
        name = subscription.name
        if name not in self._last_message_at:
            self._last_message_at[name] = 0.0
            # Read at scrape time: the per-frame cost is one dict store.
            self.metrics.last_message_timestamp.labels(name).set_function(
                functools.partial(self._last_message_at.__getitem__, name)
            )
        task = asyncio.create_task(
            supervised("reader", functools.partial(self._keep_connected, subscription), metrics=self.metrics),
            name=f"source-{name}",
        )
        self._connections[name] = _Connection(subscription, task)

    async def _close(self, name: str) -> None:
        connection = self._connections.pop(name, None)
        if connection is None:  # closed meanwhile by `stop` (a shutdown during a handover's reconcile)
            return
        if connection.ws is not None:
            await connection.ws.close(1001, "subscription changed")
        connection.task.cancel()
        await asyncio.gather(connection.task, return_exceptions=True)
        self.metrics.connection_up.labels(connection.subscription.endpoint.value, name).set(0)
        if name not in self._wanted:
            # A connection the plan dropped has no series: a lasting 0 would page as down, its old timestamp as
            # silent. One reopened under the same name keeps its last-frame time.
            self.metrics.connection_up.remove(connection.subscription.endpoint.value, name)
            self.metrics.last_message_timestamp.remove(name)
            self._last_message_at.pop(name, None)

    def status(self) -> dict[str, dict[str, object]]:
        """Per connection: whether it is up, and how the last connection ended."""
        return {
            name: {
                "up": connection.up,
                "last_close": connection.last_close,
                "contracts": len(connection.subscription.contracts),
            }
            for name, connection in self._connections.items()
        }

    def streaming(self, group: str) -> bool:
        """Whether every connection of `group` (bridge/planner.py's connection groups) is open: the server has
        its subscriptions (they travel in the URL)."""
        return all(c.up for c in self._connections.values() if c.subscription.group == group)

    @property
    def connections_up(self) -> int:
        """How many subscriptions currently have an open connection."""
        return sum(connection.up for connection in self._connections.values())

    async def stop(self) -> None:
        """Stop intake: close every connection with 1001 (going away) and end the tasks."""
        self._stopping = True
        await asyncio.gather(*(self._close(name) for name in list(self._connections)))

    async def _keep_connected(self, subscription: Subscription) -> None:
        backoff = Backoff(self.settings.reconnect_min_seconds, self.settings.reconnect_max_seconds)
        endpoint = subscription.endpoint.value
        attempt = 0
        refusals = PolicyRefusals(PROBE_WINDOW)
        while not self._stopping:
            attempt += 1
            ended = await self._connect_once(ConnectionInfo(subscription, attempt))
            reason = ended.reason
            if self._stopping:
                return
            self._connections[subscription.name].last_close = reason
            if ended.seconds_open >= self.settings.healthy_after_seconds:
                backoff.reset()
            delay = backoff.next_delay()
            if reason is CloseReason.POLICY_VIOLATION:
                # Fresh token first; if that is refused at once too, the list holds an invalid contract.
                cause = refusals.on_policy_close(ended.token, ended.seconds_open, ended.received)
                self.metrics.policy_rejections.labels(endpoint, cause.value).inc()
                if cause is PolicyCause.AUTH:
                    self.tokens.invalidate(ended.token)  # a fresh token next time; kept when a contract is blamed
                else:
                    self.metrics.reconnects.labels(endpoint, reason).inc()
                    log_event(logger, logging.WARNING, "invalid_contract_suspected", connection=subscription.name)
                    self.refused.put_nowait(subscription)
                    return
                delay = min(delay, self.settings.reconnect_min_seconds)
            elif ended.opened_at is not None:
                refusals.on_other_end(ended.seconds_open, ended.received)
            if reason is CloseReason.AUTH_REJECTED:
                delay = self.settings.auth_rejected_backoff_seconds
            elif reason is CloseReason.HTTP_429:
                delay = (
                    ended.retry_after if ended.retry_after is not None else self.settings.rate_limited_backoff_seconds
                )
            elif reason is CloseReason.TLS_ERROR:
                if not self._fatal.done():
                    self._fatal.set_result(SourceFatal(f"TLS verification failed for {self._ws_url}"))
                return
            self.metrics.reconnects.labels(endpoint, reason).inc()
            log_event(
                logger,
                logging.WARNING,
                "reconnecting",
                connection=subscription.name,
                reason=reason,
                delay_seconds=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def _connect_once(self, info: ConnectionInfo) -> _Ended:
        """Run one connection to its end; say how it ended."""
        subscription = info.subscription
        try:
            token = await self.tokens.token()
        except AuthRejected as exc:
            log_event(logger, logging.ERROR, "token_rejected", connection=subscription.name, error=str(exc))
            return _Ended(CloseReason.AUTH_REJECTED)
        except AuthError as exc:
            log_event(logger, logging.WARNING, "token_unavailable", connection=subscription.name, error=str(exc))
            return _Ended(CloseReason.AUTH_UNAVAILABLE)
        connection = self._connections[subscription.name]
        connection.received = False
        reason, opened_at, retry_after = await self._run_connection(info, connection, token)
        return _Ended(reason, opened_at, time.monotonic(), token, connection.received, retry_after)

    async def _run_connection(
        self, info: ConnectionInfo, connection: _Connection, token: str
    ) -> tuple[CloseReason, float | None, float | None]:
        """(why it ended, when it opened or None, the server's Retry-After if it sent one)."""
        subscription = info.subscription
        settings = self.settings
        opened_at: float | None = None
        try:
            async with connect(
                subscription.url(self._ws_url),
                additional_headers={"Authorization": protocol.authorization_header(token, bearer=settings.bearer)},
                compression="deflate" if settings.compression else None,
                open_timeout=settings.open_timeout_seconds,
                ping_interval=settings.ping_interval_seconds,
                ping_timeout=settings.ping_timeout_seconds,
                close_timeout=CLOSE_TIMEOUT,
                max_size=settings.max_message_bytes,
                max_queue=MAX_QUEUED_FRAMES,
                proxy=None,
            ) as ws:
                opened_at = time.monotonic()
                self._mark_up(info, connection, ws)
                watch = functools.partial(self._watch, connection, ws, opened_at)
                watchdog = asyncio.create_task(supervised("watchdog", watch, metrics=self.metrics))
                try:
                    await self._read(ws, info, connection)
                finally:
                    watchdog.cancel()
                    await asyncio.gather(watchdog, return_exceptions=True)
            reason = CloseReason.STALE if connection.stale else CloseReason.of_close_code(ws.close_code)
            return reason, opened_at, None
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == protocol.CLOSE_POLICY_VIOLATION:
                return CloseReason.POLICY_VIOLATION, opened_at, None
            if exc.sent is not None and exc.sent.code == protocol.CLOSE_MESSAGE_TOO_BIG:
                if self.on_frame_too_large is not None:
                    self.on_frame_too_large(info, exc.sent.reason)
                return CloseReason.FRAME_TOO_LARGE, opened_at, None
            if connection.stale:
                return CloseReason.STALE, opened_at, None
            return CloseReason.of_close_code(exc.rcvd.code if exc.rcvd is not None else None), opened_at, None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                self.tokens.invalidate(token)
            retry_after = protocol.retry_after_seconds(exc.response.headers.get("Retry-After"))
            return CloseReason.of_http_status(status), None, retry_after
        except ssl.SSLCertVerificationError as exc:
            log_event(logger, logging.CRITICAL, "tls_verification_failed", connection=subscription.name, error=str(exc))
            return CloseReason.TLS_ERROR, None, None
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            log_event(logger, logging.WARNING, "connect_failed", connection=subscription.name, error=repr(exc))
            lost = CloseReason.NETWORK_ERROR if opened_at is None else CloseReason.CONNECTION_LOST
            return lost, opened_at, None
        finally:
            self._mark_down(info, connection)

    async def probe(self, endpoint: Endpoint, contracts: Sequence[str], purpose: str) -> bool:
        """Whether the service accepts a subscription to `contracts`: one short-lived probe connection.

        Refused with 1008 → False; still open after PROBE_WINDOW seconds or a first frame → True.
        Raises SourceUnavailable when the probe cannot tell (network, handshake or token failure).
        """
        self.metrics.contract_probes.labels(purpose).inc()
        try:
            token = await self.tokens.token()
            url = Subscription("probe", endpoint, tuple(contracts)).url(self._ws_url)
            headers = {"Authorization": protocol.authorization_header(token, bearer=self.settings.bearer)}
            async with connect(
                url,
                additional_headers=headers,
                open_timeout=self.settings.open_timeout_seconds,
                close_timeout=PROBE_CLOSE_TIMEOUT,
                proxy=None,
                compression=None,
            ) as ws:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ws.recv(), timeout=PROBE_WINDOW)
                return True
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == protocol.CLOSE_POLICY_VIOLATION:
                return False
            raise SourceUnavailable(
                f"probe connection closed: {CloseReason.of_close_code(exc.rcvd.code if exc.rcvd else None)}"
            ) from exc
        except (AuthError, InvalidHandshake, OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"probe failed: {type(exc).__name__}") from exc

    async def _watch(self, connection: _Connection, ws: ClientConnection, opened_at: float) -> None:
        """The data watchdog: close a connection silent for `stale_after` during trading sessions.

        IME sends only on change and is quiet outside its sessions, so silence there is normal. A connection
        that never received anything counts as silent since it opened.
        """
        stale_after = self.settings.stale_after_seconds
        if stale_after <= 0:
            return
        name = connection.subscription.name
        opened_wall = time.time() - (time.monotonic() - opened_at)
        while True:
            await asyncio.sleep(min(stale_after / 4, 5.0))
            now = time.time()
            last = max(self._last_message_at.get(name, 0.0), opened_wall)
            if now - last >= stale_after and self.settings.calendar.is_open(datetime.fromtimestamp(now, UTC)):
                log_event(
                    logger, logging.WARNING, "stale_connection", connection=name, silent_seconds=round(now - last)
                )
                connection.stale = True
                await ws.close(1000, "no data")
                return

    async def _read(self, ws: ClientConnection, info: ConnectionInfo, connection: _Connection) -> None:
        handler = self.handler
        name = info.subscription.name
        last_message_at = self._last_message_at
        received = self.metrics.messages_received.labels(info.subscription.endpoint.value)
        failures = self.metrics.task_failures.labels("frame-handler")
        queued = _queued_frames(ws)
        while True:
            # Bytes, text frames included: invalid UTF-8 is the normalizer's dead letter, not websockets' 1007 close.
            try:
                message = await ws.recv(decode=False)
            except ConnectionClosedOK:
                return
            connection.received = True
            # One receive time for the burst: the frames taken from the queue below were all there before recv()
            # returned (nothing arrives while this loop runs), so a time taken per frame, after handling the
            # earlier ones, would understate how long each waited.
            now_us = time.time_ns() // 1000
            burst = [message]
            # The rest of the burst, without a recv() each: whole messages at the head of websockets' queue.
            while queued is not None and queued.frames and _whole_message(queued.frames[0]):
                data = queued.frames.popleft().data
                burst.append(data if type(data) is bytes else bytes(data))
            if queued is not None:
                queued.resume()
            try:
                handler(burst, now_us, info)
            except Exception:  # the handler dead-letters what it cannot handle; this is the last line of defence
                failures.inc()
                log_exception(logger, "frame_handler_failed", connection=info.label)
            received.inc(len(burst))
            last_message_at[name] = now_us / 1e6

    def _mark_up(self, info: ConnectionInfo, connection: _Connection, ws: ClientConnection) -> None:
        subscription = info.subscription
        connection.ws, connection.up, connection.stale = ws, True, False
        if self.on_open is not None:
            self.on_open(info)
        self.metrics.connection_up.labels(subscription.endpoint.value, subscription.name).set(1)
        self._refresh_totals()
        log_event(
            logger,
            logging.INFO,
            "connected",
            connection=info.label,
            endpoint=subscription.endpoint.value,
            contracts=len(subscription.contracts),
        )

    def _mark_down(self, info: ConnectionInfo, connection: _Connection) -> None:
        if connection.ws is None:
            return
        connection.ws, connection.up = None, False
        self.metrics.connection_up.labels(info.subscription.endpoint.value, info.subscription.name).set(0)
        self._refresh_totals()

    def _refresh_totals(self) -> None:
        up = [connection for connection in self._connections.values() if connection.up]
        self.metrics.connections.set(len(up))
        self.metrics.subscribed_contracts.set(sum(len(connection.subscription.contracts) for connection in up))


@dataclass(frozen=True)
class _FrameQueue:
    """The frames websockets has read but `recv()` has not returned, and its flow control's resume."""

    frames: collections.deque[Frame]
    resume: Callable[[], None]


def _queued_frames(ws: ClientConnection) -> _FrameQueue | None:
    """websockets' queue of received frames, where it is where websockets 17 keeps it; else None (`recv()` only).

    One data_received reads a whole burst of frames; `recv()` then costs ~1.5 µs per frame in coroutines and
    checks around a deque's popleft. tests/component/test_source.py fails when this stops finding the queue.
    """
    assembler = getattr(ws, "recv_messages", None)
    frames = getattr(getattr(assembler, "frames", None), "queue", None)
    resume = getattr(assembler, "maybe_resume", None)
    if isinstance(frames, collections.deque) and callable(resume):
        return _FrameQueue(frames, resume)
    return None


def _whole_message(frame: Frame) -> bool:
    """Whether `frame` is a whole text or binary message (not a fragment, which `recv()` assembles)."""
    return frame.fin and (frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY)
