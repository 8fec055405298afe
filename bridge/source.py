"""The IME WebSocket side: one long-lived task per subscription, each reconnecting on its own.

A frame is handed to the pipeline as it arrives, with its receive time, synchronously; the handler
never blocks, so the reader keeps answering pings whatever Kafka does. Every ended connection is
classified into a bounded `reason` and followed by a jittered, capped exponential backoff that resets
only after the connection stayed up for `healthy_after` seconds, so a server that accepts and closes
at once is not hammered. A 1008 close is answered by one token re-issue; a second 1008 on a fresh
token means an invalid contract in the list.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bridge import protocol
from bridge.auth import AuthError, AuthRejected, TokenProvider
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.planner import Subscription

logger = logging.getLogger(__name__)

FrameHandler = Callable[[str | bytes, int, "ConnectionInfo"], None]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Identifies one physical connection: the subscription and which attempt of it this is."""

    subscription: Subscription
    attempt: int

    @property
    def label(self) -> str:
        """`<subscription>/<attempt>`, the `connection` header of records."""
        return f"{self.subscription.name}/{self.attempt}"


@dataclass(frozen=True)
class SourceSettings:
    """Connection behaviour; see ImeSettings for the meaning of each."""

    ws_url: str
    bearer: bool = False
    compression: bool = False
    open_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    auth_rejected_backoff: float = 300.0
    healthy_after: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Frames websockets buffers before pausing the socket; 16 (its default) pauses on every burst.
    max_queued_frames: int = 128


class Backoff:
    """Exponential backoff with full jitter: a uniform delay in [0, min(cap, base * 2**n)]."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        ceiling = min(self.cap, self.base * 2.0**self.failures)
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Forget past failures, after a connection proved healthy."""
        self.failures = 0


@dataclass
class _ConnectionState:
    up: bool = False
    last_close: str = "never connected"


@dataclass
class WebSocketSource:
    """Keeps every subscription connected and feeds their frames to `handler`."""

    settings: SourceSettings
    tokens: TokenProvider
    handler: FrameHandler
    metrics: Metrics
    subscriptions: Sequence[Subscription]
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _open: dict[str, ClientConnection] = field(default_factory=dict)
    _states: dict[str, _ConnectionState] = field(default_factory=dict)
    _last_message_at: dict[str, float] = field(default_factory=dict)
    _stopping: bool = False

    def start(self) -> None:
        """Start one task per subscription."""
        for subscription in self.subscriptions:
            self._states[subscription.name] = _ConnectionState()
            self._last_message_at[subscription.name] = 0.0
            # Read at scrape time: the per-frame cost is one dict store.
            self.metrics.last_message_timestamp.labels(subscription.name).set_function(
                functools.partial(self._last_message_at.__getitem__, subscription.name)
            )
            task = asyncio.create_task(self._keep_connected(subscription), name=f"source-{subscription.name}")
            self._tasks.append(task)

    def status(self) -> dict[str, dict[str, object]]:
        """Per connection: whether it is up, and how the last connection ended."""
        return {name: {"up": state.up, "last_close": state.last_close} for name, state in self._states.items()}

    @property
    def connections_up(self) -> int:
        """How many subscriptions currently have an open connection."""
        return sum(state.up for state in self._states.values())

    async def stop(self) -> None:
        """Stop intake: close every connection with 1001 (going away) and end the tasks."""
        self._stopping = True
        await asyncio.gather(*(ws.close(1001, "bridge shutting down") for ws in list(self._open.values())))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _keep_connected(self, subscription: Subscription) -> None:
        backoff = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        endpoint = subscription.endpoint.value
        attempt = 0
        refused_after_reissue = False
        while not self._stopping:
            attempt += 1
            reason, opened_at = await self._connect_once(ConnectionInfo(subscription, attempt))
            if self._stopping:
                return
            self._states[subscription.name].last_close = reason
            if opened_at is not None and time.monotonic() - opened_at >= self.settings.healthy_after:
                backoff.reset()
            delay = backoff.next_delay()
            if reason == "policy_violation":
                # Fresh token first; if that is refused too, the list holds an invalid contract.
                cause = "contract" if refused_after_reissue else "auth"
                self.metrics.policy_rejections.labels(endpoint, cause).inc()
                refused_after_reissue = True
                if cause == "auth":
                    delay = min(delay, self.settings.reconnect_min)
            elif opened_at is not None:
                refused_after_reissue = False
            if reason == "auth_rejected":
                delay = self.settings.auth_rejected_backoff
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

    async def _connect_once(self, info: ConnectionInfo) -> tuple[str, float | None]:
        """Run one connection to its end; return why it ended and when it opened (None: never)."""
        subscription = info.subscription
        try:
            token = await self.tokens.token()
        except AuthRejected as exc:
            log_event(logger, logging.ERROR, "token_rejected", connection=subscription.name, error=str(exc))
            return "auth_rejected", None
        except AuthError as exc:
            log_event(logger, logging.WARNING, "token_unavailable", connection=subscription.name, error=str(exc))
            return "auth_unavailable", None

        settings = self.settings
        opened_at: float | None = None
        try:
            async with connect(
                subscription.url(settings.ws_url),
                additional_headers={"Authorization": protocol.authorization_header(token, bearer=settings.bearer)},
                compression="deflate" if settings.compression else None,
                open_timeout=settings.open_timeout,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
                close_timeout=settings.close_timeout,
                max_size=settings.max_message_bytes,
                max_queue=settings.max_queued_frames,
                proxy=None,
            ) as ws:
                opened_at = time.monotonic()
                self._mark_up(info, ws)
                await self._read(ws, info)
            return _close_reason(ws.close_code), opened_at
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == protocol.CLOSE_POLICY_VIOLATION:
                self.tokens.invalidate(token)
                return "policy_violation", opened_at
            return _close_reason(exc.rcvd.code if exc.rcvd is not None else None), opened_at
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                self.tokens.invalidate(token)
            return f"http_{status}", None
        except ssl.SSLCertVerificationError as exc:
            log_event(logger, logging.CRITICAL, "tls_verification_failed", connection=subscription.name, error=str(exc))
            return "tls_error", None
        except (InvalidHandshake, OSError, TimeoutError) as exc:
            log_event(logger, logging.WARNING, "connect_failed", connection=subscription.name, error=repr(exc))
            return "network_error" if opened_at is None else "connection_lost", opened_at
        finally:
            self._mark_down(info)

    async def _read(self, ws: ClientConnection, info: ConnectionInfo) -> None:
        handler = self.handler
        name = info.subscription.name
        last_message_at = self._last_message_at
        received = self.metrics.messages_received.labels(info.subscription.endpoint.value)
        async for message in ws:
            now_us = time.time_ns() // 1000
            received.inc()
            last_message_at[name] = now_us / 1e6
            handler(message, now_us, info)

    def _mark_up(self, info: ConnectionInfo, ws: ClientConnection) -> None:
        subscription = info.subscription
        self._open[subscription.name] = ws
        self._states[subscription.name].up = True
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

    def _mark_down(self, info: ConnectionInfo) -> None:
        subscription = info.subscription
        if self._open.pop(subscription.name, None) is None:
            return
        self._states[subscription.name].up = False
        self.metrics.connection_up.labels(subscription.endpoint.value, subscription.name).set(0)
        self._refresh_totals()

    def _refresh_totals(self) -> None:
        self.metrics.connections.set(len(self._open))
        self.metrics.subscribed_contracts.set(sum(len(s.contracts) for s in self.subscriptions if s.name in self._open))


_CLOSE_REASONS = {1000: "closed_by_server", 1001: "server_going_away", 1011: "server_error"}


def _close_reason(code: int | None) -> str:
    """A bounded label for how the server ended the connection (None: no close frame)."""
    if code is None:
        return "connection_lost"
    return _CLOSE_REASONS.get(code, "closed_other")
