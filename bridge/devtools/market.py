"""The simulated IME market: a contract catalogue, a seeded market generator and frame rendering.

Pure and synchronous: nothing here does I/O or reads the clock; the caller passes `now`. The simulator's feed
(bridge/devtools/simulator/feed.py) paces the generator and sends what it returns, so everything here is tested by
feeding values.

Catalogue: `build_catalogue(n)` cycles through seven families, numbering within each family, so names
and ids stay unique and stable for any n (ids are "1001", "1002", ...):

| family | market | names |
|---|---|---|
| gold coin futures | IMEFutures | `GC` + Persian year (2 digits) + month, e.g. `GC0504` (1405, month 4) |
| saffron futures | IMEFutures | `SAF0504`, ... |
| gold coin call options | IMEOption | `GCC0504-1070` (expiry, strike in thousands) |
| gold coin put options | IMEOption | `GCP0504-1070` |
| gold bullion deposit certificates | IMEDepositCertificate | `GBDC0001`, ... |
| saffron deposit certificates | IMEDepositCertificate | `SAFDC0001`, ... |
| cement deposit certificates | IMEDepositCertificate | `CMDC0001`, ... |

Frames: each snapshot renders as `{"channel", <identifier>, "timestamp", "data"}` in that key order,
with `json.dumps`' default separators (the documents' example renders to about 800 bytes). A frame is
assembled from three byte strings (`head + timestamp + tail`): the head depends only on the contract,
endpoint and dialect, the tail only on the snapshot, so a snapshot sent to many connections is
serialized once and pre-rendered frames can carry a fresh timestamp at almost no cost.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import cached_property
from typing import Any, Literal, Protocol

from bridge.protocol import CHANNEL, Endpoint

Dialect = Literal["ht", "legacy"]
ContractKind = Literal["future", "call", "put", "certificate"]
Price = int | float

# Shown by the legacy document's all-zero example: a contract without price limits.
UNLIMITED_PRICE_RANGE = (1, 9_999_999_999)
BOOK_DEPTH = 3
FIRST_CONTRACT_ID = 1001
# The first listed futures month: Persian year 1405, month 4 (Tir).
_FIRST_YEAR, _FIRST_MONTH = 1405, 4
_STRIKE_STEPS = (-0.10, -0.05, 0.0, 0.05, 0.10)


@dataclass(frozen=True, slots=True)
class Contract:
    """One listed contract: what the static lookups describe and the generator moves."""

    id: str
    name: str
    market: str
    kind: ContractKind
    underlying: str
    description: str
    unit: str
    contract_size: int
    tick: Price
    reference_price: Price
    expiry: str | None = None  # Persian calendar, "1405/04/20"
    strike: int | None = None
    liquidity: float = 1.0  # relative share of the market's updates
    empty_side_odds: float = 0.03  # chance that a rebuilt book side is empty

    def static_item(self) -> dict[str, Any]:
        """The item the static lookups answer for this contract."""
        return {
            "contractId": self.id,
            "contractName": self.name,
            "market": self.market,
            "contractType": self.kind,
            "underlying": self.underlying,
            "description": self.description,
            "unit": self.unit,
            "contractSize": self.contract_size,
            "tickSize": self.tick,
            "currency": "IRR",
            "expiryDate": self.expiry,
            "optionType": self.kind if self.kind in ("call", "put") else None,
            "strikePrice": self.strike,
            "status": "active",
        }


@dataclass(frozen=True, slots=True)
class _Family:
    code: str
    market: str
    kind: ContractKind
    underlying: str
    description: str
    unit: str
    contract_size: int
    tick: Price
    reference_price: int
    liquidity: float


_GOLD_COIN = 1_185_000
_FAMILIES = (
    _Family(
        "GC",
        "IMEFutures",
        "future",
        "Bahar Azadi gold coin",
        "آتی سکه طلای بهار آزادی",
        "coin",
        10,
        1000,
        _GOLD_COIN,
        8.0,
    ),
    _Family("SAF", "IMEFutures", "future", "Negin saffron", "آتی زعفران نگین", "gram", 100, 100, 2_450_000, 3.0),
    _Family("GCC", "IMEOption", "call", "Bahar Azadi gold coin", "اختیار خرید سکه طلا", "coin", 1, 0.5, 0, 2.0),
    _Family("GCP", "IMEOption", "put", "Bahar Azadi gold coin", "اختیار فروش سکه طلا", "coin", 1, 0.5, 0, 1.5),
    _Family(
        "GBDC",
        "IMEDepositCertificate",
        "certificate",
        "Gold bullion",
        "گواهی سپرده شمش طلا",
        "gram",
        1,
        10,
        98_500,
        2.0,
    ),
    _Family(
        "SAFDC",
        "IMEDepositCertificate",
        "certificate",
        "Saffron (pushal)",
        "گواهی سپرده زعفران پوشال",
        "gram",
        1,
        10,
        215_000,
        1.0,
    ),
    _Family(
        "CMDC",
        "IMEDepositCertificate",
        "certificate",
        "Portland cement type 2",
        "گواهی سپرده سیمان",
        "ton",
        1,
        1000,
        3_150_000,
        0.5,
    ),
)


def _persian_month(offset: int) -> tuple[int, int]:
    """(year, month) `offset` months after the first listed month."""
    index = _FIRST_YEAR * 12 + _FIRST_MONTH - 1 + offset
    return index // 12, index % 12 + 1


def _make_contract(index: int) -> Contract:
    family = _FAMILIES[index % len(_FAMILIES)]
    serial = index // len(_FAMILIES)
    contract_id = str(FIRST_CONTRACT_ID + index)
    # Front months and near strikes trade most.
    liquidity = family.liquidity / (1 + serial % 6)
    if family.kind == "certificate":
        return Contract(
            contract_id,
            f"{family.code}{serial + 1:04d}",
            family.market,
            family.kind,
            family.underlying,
            f"{family.description} - سری {serial + 1}",
            family.unit,
            family.contract_size,
            family.tick,
            family.reference_price,
            liquidity=liquidity,
        )
    if family.kind == "future":
        year, month = _persian_month(serial)
        return Contract(
            contract_id,
            f"{family.code}{year % 100:02d}{month:02d}",
            family.market,
            family.kind,
            family.underlying,
            f"{family.description} {year}/{month:02d}",
            family.unit,
            family.contract_size,
            family.tick,
            family.reference_price,
            expiry=f"{year}/{month:02d}/20",
            liquidity=liquidity,
        )
    expiry_index, strike_index = divmod(serial, len(_STRIKE_STEPS))
    year, month = _persian_month(expiry_index)
    strike = int(round(_GOLD_COIN * (1 + _STRIKE_STEPS[strike_index]), -4))
    intrinsic = max(_GOLD_COIN - strike, 0) if family.kind == "call" else max(strike - _GOLD_COIN, 0)
    time_value = _GOLD_COIN * 0.02 * (1 + 0.25 * expiry_index)
    return Contract(
        contract_id,
        f"{family.code}{year % 100:02d}{month:02d}-{strike // 1000}",
        family.market,
        family.kind,
        family.underlying,
        f"{family.description} {year}/{month:02d} @ {strike}",
        family.unit,
        family.contract_size,
        family.tick,
        round(intrinsic + time_value),
        expiry=f"{year}/{month:02d}/20",
        strike=strike,
        liquidity=liquidity / (1 + abs(strike_index - 2)),
        empty_side_odds=0.15,
    )


def build_catalogue(count: int) -> list[Contract]:
    """`count` contracts, deterministic: the same count always gives the same ids and names."""
    if count < 1:
        raise ValueError(f"a market needs at least one contract, got {count}")
    return [_make_contract(index) for index in range(count)]


@dataclass(frozen=True)
class Snapshot:
    """The full state of one contract at one instant: the content of one frame."""

    contract: Contract
    timestamp: datetime
    data: dict[str, Any]

    @property
    def contract_id(self) -> str:
        """The contract's id, the key the simulator routes frames by."""
        return self.contract.id

    @cached_property
    def tail(self) -> bytes:
        """The frame from the end of the timestamp value on; serialized once, on first use."""
        return frame_tail(self.data)


class FramePayload(Protocol):
    """What the simulator sends: a contract id and the frame's tail (see `FrameRenderer`)."""

    @property
    def contract_id(self) -> str: ...

    @property
    def tail(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PrerenderedFrame:
    """A snapshot serialized ahead of time, without its data dict (the benchmark holds many)."""

    contract_id: str
    tail: bytes


def frame_tail(data: dict[str, Any]) -> bytes:
    """`", "data": {...}}`: closes the timestamp string and carries the payload."""
    return b'", "data": ' + json.dumps(data).encode() + b"}"


class FrameRenderer:
    """Renders frames in one dialect: "ht" (`contractId`, UTC with `Z`) or "legacy" (`ContractId`,
    naive wall time in `naive_zone`). Both send `contractName` on the name endpoint."""

    def __init__(self, dialect: Dialect, naive_zone: tzinfo = UTC) -> None:
        if dialect not in ("ht", "legacy"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.dialect = dialect
        self.naive_zone = naive_zone

    def identifier_field(self, endpoint: Endpoint) -> str:
        """The envelope's identifier key on `endpoint`."""
        if endpoint is Endpoint.NAME:
            return "contractName"
        return "contractId" if self.dialect == "ht" else "ContractId"

    def head(self, contract: Contract, endpoint: Endpoint) -> bytes:
        """The frame up to the opening quote of the timestamp value."""
        value = contract.name if endpoint is Endpoint.NAME else contract.id
        key = self.identifier_field(endpoint)
        return (f'{{"channel": {json.dumps(CHANNEL)}, {json.dumps(key)}: {json.dumps(value)}, "timestamp": "').encode()

    def timestamp(self, when: datetime) -> str:
        """ISO-8601 with microseconds: `...Z` in the ht dialect, zone-less wall time in legacy."""
        if self.dialect == "ht":
            return when.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        return when.astimezone(self.naive_zone).replace(tzinfo=None).isoformat(timespec="microseconds")

    def render(self, snapshot: Snapshot, endpoint: Endpoint) -> str:
        """One whole frame as text (the simulator assembles the same bytes piecewise)."""
        parts = (self.head(snapshot.contract, endpoint), self.timestamp(snapshot.timestamp).encode(), snapshot.tail)
        return b"".join(parts).decode()


@dataclass(slots=True)
class _State:
    """The mutable market state of one contract. Prices are kept in ticks."""

    fair: int
    previous_close: int
    min_allowed: int
    max_allowed: int
    bids: list[tuple[int, int]]  # (quantity, price ticks), best first; (0, 0) is an empty level
    asks: list[tuple[int, int]]
    open_interest: int
    session_open_interest: int
    dormant: bool
    trade_count: int = 0
    total_volume: int = 0
    total_value: Price = 0
    open_price: int = 0
    high_price: int = 0
    low_price: int = 0
    last_price: int = 0
    date: str = ""
    time: str = ""


_EMPTY_LEVEL = (0, 0)


class MarketGenerator:
    """Seeded random walks over every contract's full payload.

    Each `step` changes one contract (chosen by liquidity) and returns its new full snapshot, so every
    snapshot differs from the previous one of the same contract. Same seed, same contracts and same
    `now` values give the same snapshots. Aggregate `date`/`time` are wall time in `zone`; they stay
    empty strings until a contract's first trade. A few contracts start dormant (all zeros, unlimited
    price range, as in the legacy document's example) until their first update.
    """

    def __init__(self, contracts: Sequence[Contract], *, seed: int = 1, zone: tzinfo = UTC) -> None:
        if not contracts:
            raise ValueError("a market needs at least one contract")
        self.zone = zone
        self._rng = random.Random(seed)
        self._contracts = list(contracts)
        self._by_id = {contract.id: index for index, contract in enumerate(self._contracts)}
        self._cumulative: list[float] = []
        total = 0.0
        for contract in self._contracts:
            total += contract.liquidity
            self._cumulative.append(total)
        self._states = [self._initial_state(contract) for contract in self._contracts]
        self._last = [
            self._data(contract, state) for contract, state in zip(self._contracts, self._states, strict=True)
        ]

    def step(self, now: datetime) -> Snapshot:
        """Change one contract, chosen by liquidity, and return its snapshot."""
        return self.steps(1, now)[0]

    def steps(self, count: int, now: datetime) -> list[Snapshot]:
        """`count` successive steps, all at `now` (one pacing wake-up of the simulator)."""
        chosen = self._rng.choices(range(len(self._contracts)), cum_weights=self._cumulative, k=count)
        return [self._advance(index, now) for index in chosen]

    def step_contract(self, contract_id: str, now: datetime) -> Snapshot:
        """Change the given contract and return its snapshot."""
        return self._advance(self._by_id[contract_id], now)

    def snapshot(self, contract_id: str, now: datetime) -> Snapshot:
        """The contract's current snapshot, without changing anything."""
        index = self._by_id[contract_id]
        return Snapshot(self._contracts[index], now, self._last[index])

    def _initial_state(self, contract: Contract) -> _State:
        rng = self._rng
        # At least 200 ticks, so that even the narrowest band leaves room for a three-level book.
        fair = max(round(contract.reference_price * (1 + rng.uniform(-0.02, 0.02)) / contract.tick), 200)
        if contract.kind == "future":
            open_interest = rng.randint(500, 20_000)
        elif contract.kind == "certificate":
            open_interest = 0
        else:
            open_interest = rng.randint(0, 3_000)
        state = _State(fair, fair, 0, 0, [], [], open_interest, open_interest, rng.random() < 0.08)
        if state.dormant:
            state.previous_close = state.open_interest = state.session_open_interest = 0
            state.bids = [_EMPTY_LEVEL] * BOOK_DEPTH
            state.asks = [_EMPTY_LEVEL] * BOOK_DEPTH
        else:
            self._set_price_limits(contract, state)
            self._rebuild_book(contract, state)
        return state

    def _set_price_limits(self, contract: Contract, state: _State) -> None:
        # Futures and certificates have a daily band around the previous close; options a wide one.
        band = 0.5 if contract.kind in ("call", "put") else 0.05
        state.min_allowed = max(1, round(state.previous_close * (1 - band)))
        state.max_allowed = round(state.previous_close * (1 + band))

    def _advance(self, index: int, now: datetime) -> Snapshot:
        contract, state = self._contracts[index], self._states[index]
        if state.dormant:
            state.dormant = False
            state.previous_close = state.fair
            state.open_interest = state.session_open_interest = (
                0 if contract.kind == "certificate" else self._rng.randint(10, 500)
            )
            self._set_price_limits(contract, state)
            self._rebuild_book(contract, state)
            data = self._data(contract, state)
            self._last[index] = data
            return Snapshot(contract, now, data)
        roll = self._rng.random()
        if roll < 0.35:
            self._walk(contract, state)
        elif roll < 0.6:
            self._requote(state)
        elif roll < 0.9 or contract.kind == "certificate":
            self._trade(contract, state, now)
        else:
            self._change_open_interest(state)
        data = self._data(contract, state)
        if data == self._last[index]:  # a walk pinned at a price limit can redraw the same book
            self._requote(state)
            data = self._data(contract, state)
        self._last[index] = data
        return Snapshot(contract, now, data)

    def _walk(self, contract: Contract, state: _State) -> None:
        """Move the fair price a little and requote the whole book around it."""
        step = self._rng.choice((-3, -2, -1, 1, 2, 3))
        state.fair = min(max(state.fair + step, state.min_allowed + 4), state.max_allowed - 4)
        self._rebuild_book(contract, state)

    def _rebuild_book(self, contract: Contract, state: _State) -> None:
        rng = self._rng
        bid = state.fair - rng.randint(1, 2)
        ask = state.fair + rng.randint(1, 2)
        state.bids = self._side(bid, -1, state, empty=rng.random() < contract.empty_side_odds)
        state.asks = self._side(ask, 1, state, empty=rng.random() < contract.empty_side_odds)

    def _side(self, best: int, direction: int, state: _State, *, empty: bool) -> list[tuple[int, int]]:
        """Up to three levels moving away from `best`; levels outside the allowed range are empty."""
        levels: list[tuple[int, int]] = []
        price = best
        for _ in range(BOOK_DEPTH):
            if empty or not state.min_allowed <= price <= state.max_allowed:
                break
            levels.append((self._rng.randint(1, 60) * 5, price))
            price += direction * self._rng.randint(1, 3)
        return levels + [_EMPTY_LEVEL] * (BOOK_DEPTH - len(levels))

    def _requote(self, state: _State) -> None:
        """Change the quantity of one level, or fill an empty side: always a change."""
        rng = self._rng
        side = state.bids if rng.random() < 0.5 else state.asks
        if side[0] == _EMPTY_LEVEL:
            # The fair price stays inside the allowed range, so the new best level always fits.
            direction = -1 if side is state.bids else 1
            side[:] = self._side(state.fair + direction, direction, state, empty=False)
            return
        filled = [i for i, level in enumerate(side) if level != _EMPTY_LEVEL]
        level = rng.choice(filled)
        quantity, price = side[level]
        side[level] = (max(5, quantity + rng.choice((-20, -10, -5, 5, 10, 20))), price)
        if side[level][0] == quantity:
            side[level] = (quantity + 5, price)

    def _trade(self, contract: Contract, state: _State, now: datetime) -> None:
        """Execute against the best level of one side (or at the fair price on an empty book)."""
        rng = self._rng
        side = state.asks if rng.random() < 0.5 else state.bids
        if side[0] == _EMPTY_LEVEL:
            side = state.bids if side is state.asks else state.asks
        if side[0] == _EMPTY_LEVEL:
            quantity, price = rng.randint(1, 20), state.fair
        else:
            available, price = side[0]
            quantity = min(available, rng.randint(1, 20))
            if quantity == available:
                self._consume_level(side, -1 if side is state.bids else 1, state)
            else:
                side[0] = (available - quantity, price)
        if state.trade_count == 0:
            state.open_price = state.high_price = state.low_price = price
        state.trade_count += 1
        state.total_volume += quantity
        state.total_value += quantity * _price(price, contract.tick)
        state.last_price = price
        state.high_price = max(state.high_price, price)
        state.low_price = min(state.low_price, price)
        local = now.astimezone(self.zone)
        state.date = local.strftime("%Y-%m-%d")
        state.time = local.strftime("%H:%M:%S")

    def _consume_level(self, side: list[tuple[int, int]], direction: int, state: _State) -> None:
        """Remove the best level; a new one appears behind the deepest, when the range allows."""
        remaining = [level for level in side[1:] if level != _EMPTY_LEVEL]
        if remaining:
            price = remaining[-1][1] + direction * self._rng.randint(1, 3)
            if state.min_allowed <= price <= state.max_allowed:
                remaining.append((self._rng.randint(1, 60) * 5, price))
        side[:] = remaining + [_EMPTY_LEVEL] * (BOOK_DEPTH - len(remaining))

    def _change_open_interest(self, state: _State) -> None:
        delta = self._rng.choice((-10, -5, -2, -1, 1, 2, 5, 10))
        state.open_interest += delta if state.open_interest + delta >= 0 else -delta

    def _data(self, contract: Contract, state: _State) -> dict[str, Any]:
        tick = contract.tick
        book = {
            str(level + 1): {
                "buy_quantity": bid[0],
                "buy_price": _price(bid[1], tick),
                "sell_quantity": ask[0],
                "sell_price": _price(ask[1], tick),
            }
            for level, (bid, ask) in enumerate(zip(state.bids, state.asks, strict=True))
        }
        # The session's closing (settlement) price is its volume-weighted average, on the tick grid.
        closing = round(state.total_value / state.total_volume / tick) if state.total_volume else 0
        price_range = (
            UNLIMITED_PRICE_RANGE
            if state.dormant
            else (_price(state.min_allowed, tick), _price(state.max_allowed, tick))
        )
        return {
            "BestLimit": book,
            "Aggregate": {
                "date": state.date,
                "time": state.time,
                "trade_count": state.trade_count,
                "total_volume": state.total_volume,
                "total_value": state.total_value,
                "closing_price": _price(closing, tick),
                "last_price": _price(state.last_price, tick),
                "low_price": _price(state.low_price, tick),
                "high_price": _price(state.high_price, tick),
                "open_price": _price(state.open_price, tick),
                "previous_close": _price(state.previous_close, tick),
            },
            "AllowedPriceRange": {
                "minAllowedPrice": price_range[0],
                "maxAllowedPrice": price_range[1],
            },
            "ContractInfo": {
                "open_interest": state.open_interest,
                "open_interest_changes": state.open_interest - state.session_open_interest,
            },
        }


def _price(ticks: int, tick: Price) -> Price:
    """Ticks to a price; zero stays the integer 0 (an empty level), whatever the tick."""
    return ticks * tick if ticks else 0


def prerender(
    generator: MarketGenerator, contracts: Sequence[Contract], variants: int, now: datetime
) -> list[PrerenderedFrame]:
    """`variants` successive snapshots of every contract, interleaved round-robin across contracts,
    for a sender that only cycles through them (the benchmark's simulator)."""
    rounds = [[generator.step_contract(contract.id, now) for contract in contracts] for _ in range(variants)]
    return [PrerenderedFrame(snapshot.contract_id, snapshot.tail) for round_ in rounds for snapshot in round_]
