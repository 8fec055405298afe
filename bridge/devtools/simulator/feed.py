"""The simulator's market feed: generates snapshots (paced, or as fast as the connections drain), pre-rendered
or not, spoiled with bad frames on request, or plays a capture (replay.py), and queues each frame for the
connections subscribed to its contract; it also makes the fault frames (garbage, oversized) the simulator
sends. It sees the live part (live.py) only through `Audience`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from aiohttp import WSMsgType

from bridge.devtools.market import (
    FramePayload,
    FrameRenderer,
    MarketGenerator,
    PrerenderedFrame,
    prerender,
)
from bridge.devtools.simulator.live import Changes, LiveConnection, LiveSwitches
from bridge.devtools.simulator.model import (
    CLOSE_INTERNAL_ERROR,
    PRERENDER_BUDGET,
    Catalogue,
    GarbageKind,
    SimulatorConfig,
    SimulatorCounters,
)
from bridge.devtools.simulator.replay import CapturedMarket, ReplayedFrame
from bridge.protocol import CHANNEL, Endpoint

# With rate 0, the generator pauses while a connection has more than this many frames queued.
_UNPACED_HIGH_WATER = 4_096


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


class Audience(Protocol):
    """What the feed needs of the live part (`LiveEndpoints`): who is connected and subscribed to what, and a
    way to close a connection that fell too far behind."""

    @property
    def connections(self) -> list[LiveConnection]: ...

    @property
    def subscribers(self) -> dict[str, list[LiveConnection]]: ...

    @property
    def ever_subscribed(self) -> set[str]: ...

    def open_connections(self) -> list[LiveConnection]: ...

    def close_later(self, connection: LiveConnection, code: int, message: bytes) -> None: ...


class MarketFeed:
    """Makes the frames and queues them for the audience; `run` is the simulator's pump task."""

    def __init__(
        self,
        config: SimulatorConfig,
        counters: SimulatorCounters,
        changes: Changes,
        switches: LiveSwitches,
        audience: Audience,
        *,
        catalogue: Catalogue,
        generator: MarketGenerator,
        renderer: FrameRenderer,
        captured: CapturedMarket | None,
    ) -> None:
        self._config = config
        self._counters = counters
        self._changes = changes
        self._switches = switches
        self._audience = audience
        self._catalogue = catalogue
        self._generator = generator
        self._renderer = renderer
        self._captured = captured
        self._prerendered: list[PrerenderedFrame] = []
        self._cursor = 0

    def prerender(self) -> None:
        """Render the frames to cycle through (with `prerender`), a `bad_frame_ratio` share of them spoiled."""
        variants = max(2, min(self._config.prerender_variants, PRERENDER_BUDGET // len(self._catalogue.contracts)))
        self._prerendered = prerender(self._generator, self._catalogue.contracts, variants, datetime.now(UTC))
        if self._config.bad_frame_ratio:
            self._prerendered = _spoiled(self._prerendered, self._config.bad_frame_ratio)

    async def run(self) -> None:
        """Feed the market until cancelled (or until a capture played once ends)."""
        if self._captured is not None:
            await self._pump_captured(self._captured)
        elif self._config.rate > 0:
            await self._pump_paced(self._config.rate)
        else:
            await self._pump_unpaced()

    # --- the fault frames

    def garbage(self, kind: GarbageKind, connection: LiveConnection) -> tuple[bytes, WSMsgType]:
        """A malformed frame of `kind` for `connection`."""
        if kind == "binary":
            return b"\x00\x01\xffIME\x9c binary garbage", WSMsgType.BINARY
        if kind == "text":
            return b"<html>502 Bad Gateway</html> {not json", WSMsgType.TEXT
        timestamp = self._renderer.timestamp(datetime.now(UTC))
        if kind == "missing_fields":
            return json.dumps({"channel": CHANNEL, "timestamp": timestamp}).encode(), WSMsgType.TEXT
        contract = self._catalogue.by_id[min(connection.info.contract_ids)]
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

    def oversized(self, connection: LiveConnection, size: int, now: datetime) -> tuple[str, bytes]:
        """A well-formed snapshot frame of the connection's first contract, padded to `size` bytes: the
        contract id and the frame."""
        contract_id = min(connection.info.contract_ids)
        snapshot = self._generator.snapshot(contract_id, now)
        frame = connection.heads[contract_id] + self._renderer.timestamp(now).encode() + snapshot.tail
        padding_overhead = len(b', "padding": ""')
        padding = b"x" * max(0, size - len(frame) - padding_overhead)
        return contract_id, frame[:-1] + b', "padding": "' + padding + b'"}'

    # --- generating and sending

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
            await asyncio.sleep(max(next_due - loop.time(), self._config.min_interval))

    async def _pump_unpaced(self) -> None:
        while True:
            while self._switches.stalled or not self._audience.subscribers:
                await self._changes.wait()
            self._emit(self._config.burst)
            await self._wait_for_slow_connections()

    async def _wait_for_slow_connections(self) -> None:
        """As fast as clients read: wait while a connection's queue is long, and let the writers run."""
        for connection in self._audience.connections:
            if len(connection.queue) > _UNPACED_HIGH_WATER:
                connection.drained.clear()
                await connection.drained.wait()
        await asyncio.sleep(0)  # let the writers run even when every queue is short

    async def _pump_captured(self, market: CapturedMarket) -> None:
        """Play the capture (from its first frame once a client subscribed), at its pace times replay_speed."""
        loop = asyncio.get_running_loop()
        speed = self._config.replay_speed
        while True:
            while not self._audience.subscribers:
                await self._changes.wait()
            start = loop.time()
            for number, frame in enumerate(market.frames):
                if speed > 0 and (delay := start + frame.at / speed - loop.time()) > 0:
                    await asyncio.sleep(delay)
                elif number % self._config.burst == 0:
                    await self._wait_for_slow_connections()
                while self._switches.stalled:
                    await self._changes.wait()
                self._play(frame)
            if not self._config.replay_loop:
                return

    def _play(self, frame: ReplayedFrame) -> None:
        """Queue one captured frame for its contract's subscribers, or for every connection of its endpoint."""
        if frame.contract_id is not None:
            targets = self._audience.subscribers.get(frame.contract_id, [])
        else:
            targets = [c for c in self._audience.open_connections() if c.info.endpoint is frame.endpoint]
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
        if self._switches.stalled:
            return
        timestamp = self._renderer.timestamp(now).encode()
        subscribers = self._audience.subscribers
        max_queue = self._config.max_queue
        for item in items:
            connections = subscribers.get(item.contract_id)
            if not connections:
                if item.contract_id in self._audience.ever_subscribed:
                    self._counters.unheard[item.contract_id] += 1
                continue
            tail = item.tail
            sent_as = None if type(item) is _BadFrame else item.contract_id
            for connection in connections:
                if connection.closing:
                    continue
                connection.push(sent_as, connection.heads[item.contract_id] + timestamp + tail)
                if len(connection.queue) > max_queue:
                    connection.closing = True
                    self._counters.slow_consumer_closes += 1
                    self._audience.close_later(connection, CLOSE_INTERNAL_ERROR, b"slow consumer")

    def _next_prerendered(self, count: int) -> list[PrerenderedFrame]:
        frames, items = self._prerendered, []
        while count:
            take = min(count, len(frames) - self._cursor)
            items += frames[self._cursor : self._cursor + take]
            self._cursor = (self._cursor + take) % len(frames)
            count -= take
        return items
