"""Frame → ContractUpdate | Rejected: the bridge's protocol logic, pure and synchronous.

Accepts every envelope variant of both reference documents: `contractId`, `ContractId` or
`contractName` as the identifier (a number is read as its decimal string), timestamps with or without
a zone (naive ones read in a configured zone), prices as ints or floats, empty `date`/`time` strings,
missing sections and unknown extra fields. Anything else becomes a `Rejected` with a bounded `reason`
(a metric label) and a precise `detail` (for the dead-letter record).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, tzinfo
from functools import lru_cache
from typing import Annotated, Literal, Protocol

import msgspec

from bridge.protocol import Endpoint

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE = date(1970, 1, 1)
_BY_ID = Endpoint.ID  # read per frame: an Enum class attribute is slow on Python 3.11 (see records.KIND_UPDATE)


class RejectReason(enum.StrEnum):
    """Why a frame was not accepted. Bounded: these are the values of the `reason` metric label."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    TOO_DEEP = "too_deep"  # nesting past what the decoder may recurse into
    INVALID_FRAME = "invalid_frame"
    MISSING_IDENTIFIER = "missing_identifier"
    UNKNOWN_CONTRACT = "unknown_contract"
    INVALID_TIMESTAMP = "invalid_timestamp"
    INVALID_VALUE = "invalid_value"
    OVERSIZED = "oversized"
    RECORD_TOO_LARGE = "record_too_large"  # Kafka refused the encoded record as too large
    UNKNOWN_SCHEMA = "unknown_schema"  # a spooled update written with a schema this version does not ship
    INTERNAL_ERROR = "internal_error"  # handling the frame raised unexpectedly: a bug, the stream goes on


# --- The normalized record. Field for field the Avro schema schemas/contract_update.avsc
# (tests/unit/test_encode.py keeps the two in step). Numbers stay as upstream sent them (int or float):
# the encoder packs both into Avro doubles, so no conversion is spent here. Every struct here and below is
# `gc=False`: they hold scalars, strings and lists of such structs, so they cannot form a reference cycle, and the
# collector need not track (nor count towards its next pass) the dozen of them each frame makes.


class BookLevel(msgspec.Struct, gc=False):
    """One top-of-book level; see the schema's BookLevel."""

    level: int
    buy_quantity: int
    buy_price: float
    sell_quantity: int
    sell_price: float


class Aggregate(msgspec.Struct, gc=False):
    """Session statistics; see the schema's Aggregate."""

    trade_date: int | None
    trade_time: int | None
    trade_count: int
    total_volume: int
    total_value: float
    closing_price: float
    last_price: float
    low_price: float
    high_price: float
    open_price: float
    previous_close: float


class AllowedPriceRange(msgspec.Struct, gc=False):
    """Daily price limits; see the schema's AllowedPriceRange."""

    min_price: float
    max_price: float


class ContractInfo(msgspec.Struct, gc=False):
    """Open interest; see the schema's ContractInfo."""

    open_interest: int
    open_interest_change: int


class ContractUpdate(msgspec.Struct, gc=False):
    """One normalized snapshot of one contract: the value of a Kafka record."""

    contract_id: str
    contract_name: str | None
    endpoint: Literal["ID", "NAME"]
    channel: str
    exchange_time: int
    receive_time: int
    best_limit: list[BookLevel]
    aggregate: Aggregate | None
    allowed_price_range: AllowedPriceRange | None
    contract_info: ContractInfo | None
    sequence: int
    session_id: str
    skipped: int = 0
    first_after_subscribe: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame the bridge could not accept, kept whole for the dead-letter topic."""

    reason: RejectReason
    detail: str
    raw: bytes
    contract_id: str | None = None


# --- The wire format, as msgspec types. Unknown fields are ignored (forward compatibility);
# a present section must be complete. The types bound what a record can carry, checked by msgspec
# while decoding: a `float` is finite (an integer is converted; one past a double's range is refused),
# a whole number fits an Avro long.

_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
Whole = (
    Annotated[int, msgspec.Meta(ge=_LONG_MIN, le=_LONG_MAX)]
    | Annotated[float, msgspec.Meta(ge=float(_LONG_MIN), lt=float(2**63))]
)
Number = float


class _WireLevel(msgspec.Struct, gc=False):
    buy_quantity: Whole
    buy_price: Number
    sell_quantity: Whole
    sell_price: Number


class _WireAggregate(msgspec.Struct, gc=False):
    trade_count: Whole
    total_volume: Whole
    total_value: Number
    closing_price: Number
    last_price: Number
    low_price: Number
    high_price: Number
    open_price: Number
    previous_close: Number
    date: str = ""
    time: str = ""


class _WireAllowedPriceRange(msgspec.Struct, gc=False):
    minAllowedPrice: Number
    maxAllowedPrice: Number


class _WireContractInfo(msgspec.Struct, gc=False):
    open_interest: Whole
    open_interest_changes: Whole


class _WireData(msgspec.Struct, gc=False):
    BestLimit: dict[str, _WireLevel] | None = None
    Aggregate: _WireAggregate | None = None
    AllowedPriceRange: _WireAllowedPriceRange | None = None
    ContractInfo: _WireContractInfo | None = None


class _WireFrame(msgspec.Struct, gc=False):
    timestamp: str
    data: _WireData
    channel: str = ""
    contractId: str | int | None = None
    ContractId: str | int | None = None
    contractName: str | None = None


_decode_frame = msgspec.json.Decoder(_WireFrame).decode
# msgspec's words for a number of the right type that a record cannot carry (past a double, or an Avro long).
_VALUE_OUT_OF_RANGE = re.compile(r"Number out of range|Expected `(int|float)` [<>]=? ")


class _InvalidValue(ValueError):
    """A value that has the right JSON type but cannot be represented faithfully."""


def _whole(value: int | float, field: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _InvalidValue(f"{field} must be a whole number, got {value!r}")


@lru_cache(maxsize=1024)
def _days_since_epoch(text: str) -> int | None:
    if not text:
        return None
    try:
        return (date.fromisoformat(text) - _EPOCH_DATE).days
    except ValueError:
        raise _InvalidValue(f"Aggregate.date is not an ISO date: {text!r}") from None


@lru_cache(maxsize=4096)
def _micros_of_day(text: str) -> int | None:
    if not text:
        return None
    try:
        parsed = time.fromisoformat(text)
    except ValueError:
        raise _InvalidValue(f"Aggregate.time is not an ISO time of day: {text!r}") from None
    return ((parsed.hour * 60 + parsed.minute) * 60 + parsed.second) * 1_000_000 + parsed.microsecond


# The level keys upstream sends: a lookup, not a validation, for each.
_LEVEL_NUMBERS = {str(number): number for number in range(1, 100)}


def _level_key(key: str) -> int:
    if not (key.isascii() and key.isdigit()) or key[0] == "0" or len(key) > 9:
        raise _InvalidValue(f"BestLimit level key must be a positive integer below 10^9, got {key[:20]!r}")
    return int(key)


def _levels(book: dict[str, _WireLevel]) -> list[BookLevel]:
    levels = []
    previous = 0
    ordered = True
    numbers = _LEVEL_NUMBERS
    for key, wire in book.items():
        number = numbers.get(key) or _level_key(key)
        ordered = ordered and number > previous
        previous = number
        buy, sell = wire.buy_quantity, wire.sell_quantity
        levels.append(
            BookLevel(
                number,
                buy if type(buy) is int else _whole(buy, "buy_quantity"),
                wire.buy_price,
                sell if type(sell) is int else _whole(sell, "sell_quantity"),
                wire.sell_price,
            )
        )
    if not ordered:  # upstream sends "1", "2", "3" in order; sort only when it did not
        levels.sort(key=_level_number)
    return levels


def _level_number(level: BookLevel) -> int:
    return level.level


def _aggregate(wire: _WireAggregate) -> Aggregate:
    trades, volume = wire.trade_count, wire.total_volume
    return Aggregate(
        _days_since_epoch(wire.date),
        _micros_of_day(wire.time),
        trades if type(trades) is int else _whole(trades, "trade_count"),
        volume if type(volume) is int else _whole(volume, "total_volume"),
        wire.total_value,
        wire.closing_price,
        wire.last_price,
        wire.low_price,
        wire.high_price,
        wire.open_price,
        wire.previous_close,
    )


def _contract_info(wire: _WireContractInfo) -> ContractInfo:
    interest, change = wire.open_interest, wire.open_interest_changes
    return ContractInfo(
        interest if type(interest) is int else _whole(interest, "open_interest"),
        change if type(change) is int else _whole(change, "open_interest_changes"),
    )


class ContractNames(Protocol):
    """What the normalizer may ask of the contract directory: read-only lookups."""

    def name_of(self, contract_id: str) -> str | None:
        """The name of the contract with `contract_id`, if known."""
        ...

    def id_of(self, name: str) -> str | None:
        """The id of the contract named `name`, if known."""
        ...


class ContractDirectory:
    """Names and ids of the configured contracts, learned from the static lookups. The subscription manager
    owns it and is its only writer (`learn`); the normalizer reads it through `ContractNames`."""

    def __init__(self, names_by_id: Mapping[str, str] | None = None) -> None:
        self._names_by_id: dict[str, str] = {}
        self._ids_by_name: dict[str, str] = {}
        for contract_id, name in (names_by_id or {}).items():
            self.learn(contract_id, name)

    def learn(self, contract_id: str, name: str) -> None:
        """Record that `contract_id` is named `name`."""
        self._names_by_id[contract_id] = name
        self._ids_by_name[name] = contract_id

    def name_of(self, contract_id: str) -> str | None:
        """The name of the contract with `contract_id`, if known."""
        return self._names_by_id.get(contract_id)

    def id_of(self, name: str) -> str | None:
        """The id of the contract named `name`, if known."""
        return self._ids_by_name.get(name)


class Normalizer:
    """Turns raw frames into records. Holds only configuration and the contract directory (read-only).

    The directory's names and ids come from the static lookup; the key of a record is always the contract
    id, so a frame that names its contract by a name the lookup did not resolve is rejected rather than
    published under a guessed key.
    """

    def __init__(
        self,
        *,
        session_id: str,
        naive_timezone: tzinfo = UTC,
        contracts: ContractNames | None = None,
    ) -> None:
        self.session_id = session_id
        self.naive_timezone = naive_timezone
        self.contracts: ContractNames = contracts if contracts is not None else ContractDirectory()
        # Whether the last timestamp read had no zone (read in `naive_timezone`): the pipeline's zone check.
        self.timestamp_was_naive = False

    def __call__(self, raw: str | bytes, endpoint: Endpoint, receive_time: int) -> ContractUpdate | Rejected:
        """Normalize one frame received at `receive_time` (epoch µs). The record's sequence is 0."""
        try:
            frame = _decode_frame(raw)
        except msgspec.ValidationError as exc:
            detail = str(exc)
            out_of_range = _VALUE_OUT_OF_RANGE.match(detail) is not None
            return self._reject(RejectReason.INVALID_VALUE if out_of_range else RejectReason.INVALID_FRAME, detail, raw)
        except msgspec.DecodeError as exc:
            detail = str(exc)
            reason = RejectReason.INVALID_UTF8 if "UTF-8" in detail else RejectReason.INVALID_JSON
            return self._reject(reason, detail, raw)
        except RecursionError:
            return self._reject(RejectReason.TOO_DEEP, "JSON nested deeper than the decoder may follow", raw)

        contract_id, contract_name = self._identify(frame)
        if contract_id is None:
            if contract_name is None:
                detail = "frame has none of contractId, ContractId, contractName"
                return self._reject(RejectReason.MISSING_IDENTIFIER, detail, raw)
            detail = f"contract name {contract_name!r} is not resolved to a contract id"
            return self._reject(RejectReason.UNKNOWN_CONTRACT, detail, raw)

        try:
            exchange_time = self._epoch_micros(frame.timestamp)
        except (ValueError, OverflowError):
            detail = f"timestamp is not an ISO-8601 time the record can carry: {frame.timestamp[:60]!r}"
            return self._reject(RejectReason.INVALID_TIMESTAMP, detail, raw, contract_id)

        data = frame.data
        try:
            best_limit = _levels(data.BestLimit) if data.BestLimit else []
            aggregate = None if data.Aggregate is None else _aggregate(data.Aggregate)
            contract_info = None if data.ContractInfo is None else _contract_info(data.ContractInfo)
        except _InvalidValue as exc:
            return self._reject(RejectReason.INVALID_VALUE, str(exc), raw, contract_id)

        price_range = data.AllowedPriceRange
        return ContractUpdate(
            contract_id,
            contract_name,
            "ID" if endpoint is _BY_ID else "NAME",
            frame.channel,
            exchange_time,
            receive_time,
            best_limit,
            aggregate,
            None
            if price_range is None
            else AllowedPriceRange(price_range.minAllowedPrice, price_range.maxAllowedPrice),
            contract_info,
            0,
            self.session_id,
        )

    def _identify(self, frame: _WireFrame) -> tuple[str | None, str | None]:
        """(contract id, contract name) of a frame; the id is None when it cannot be known."""
        raw_id = frame.contractId if frame.contractId is not None else frame.ContractId
        if raw_id is not None and raw_id != "":
            contract_id = str(raw_id)
            return contract_id, frame.contractName or self.contracts.name_of(contract_id)
        name = frame.contractName
        if not name:
            return None, None
        return self.contracts.id_of(name), name

    def _epoch_micros(self, timestamp: str) -> int:
        parsed = datetime.fromisoformat(timestamp)
        self.timestamp_was_naive = naive = parsed.tzinfo is None
        if naive:
            parsed = parsed.replace(tzinfo=self.naive_timezone)
        since = parsed - _EPOCH  # summed from its parts: a third cheaper than `// timedelta(microseconds=1)`
        return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds

    @staticmethod
    def _reject(reason: RejectReason, detail: str, raw: str | bytes, contract_id: str | None = None) -> Rejected:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        return Rejected(reason, detail, data, contract_id)
