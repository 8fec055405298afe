"""Raw capture: every frame as received, before parsing, as a record for `kafka.raw_topic` or a capture file.

A raw record's value is the frame's bytes exactly as the WebSocket delivered them; its key is the contract
id when one can be read cheaply (a `contractId`/`ContractId` field, or a `contractName` the directory
knows), else none; its headers say when (`receive-time-us`), on which connection and endpoint it came.

A replay must also know what each connection had subscribed (the bridge dead-letters a contract nobody
subscribed on that connection, and marks the first snapshot after each subscription), and the names the
static lookups resolved. So when a connection opens, a *subscription marker* goes first: a raw record with
the header `raw-event: subscribed` whose value is JSON (`subscription`, `attempt`, `endpoint`, `contracts`,
`names`). `CapturedFrame.of` reads either back from a record's key, value and headers, and refuses what is
not one with `NotCaptured` (a replay counts and skips those). Pure and synchronous; docs/consumers.md
documents the format, and capture files store the same records as JSON lines (`to_json_line`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.normalize import ContractNames
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.records import (
    HEADER_CONNECTION,
    HEADER_ENDPOINT,
    HEADER_RAW_EVENT,
    HEADER_RECEIVE_TIME,
    Headers,
    OutgoingRecord,
    raw_frame,
)

SUBSCRIBED = "subscribed"
# `"contractId": "123"`, `"ContractId":123` or `"contractName": "…"` (no escapes: anything else is not cheap).
_IDENTIFIER = re.compile(rb'"(contractId|ContractId|contractName)"\s*:\s*(?:"([^"\\]{1,200})"|(\d{1,30})[,}\s])')


class NotCaptured(ValueError):
    """A record (or a capture file's line) that is not a raw frame nor a subscription marker."""


def frame_key(frame: bytes, names: ContractNames) -> bytes | None:
    """The contract id of `frame` when it can be read without parsing it, else None (the key of raw records)."""
    match = _IDENTIFIER.search(frame)
    if match is None:
        return None
    field, text, number = match.groups()
    value = (text if text is not None else number).decode("utf-8", "replace")
    if field == b"contractName":
        contract_id = names.id_of(value)
        return contract_id.encode() if contract_id is not None else None
    return value.encode()


def connection_headers(connection: ConnectionInfo) -> Headers:
    """The headers every raw record of `connection` carries, before its receive time."""
    return [
        (HEADER_ENDPOINT, connection.subscription.endpoint.value.encode()),
        (HEADER_CONNECTION, connection.label.encode()),
    ]


def subscription_marker(connection: ConnectionInfo, names: ContractNames, receive_time: int) -> OutgoingRecord:
    """The marker a connection's raw frames follow: what it subscribed, and the names known of its contracts."""
    subscription = connection.subscription
    known: dict[str, str] = {}
    for contract in subscription.contracts:
        if subscription.endpoint is Endpoint.ID:
            name = names.name_of(contract)
            if name is not None:
                known[contract] = name
        else:
            contract_id = names.id_of(contract)
            if contract_id is not None:
                known[contract_id] = contract
    value = {
        "subscription": subscription.name,
        "attempt": connection.attempt,
        "endpoint": subscription.endpoint.value,
        "contracts": list(subscription.contracts),
        "names": known,
    }
    headers = [*connection_headers(connection), (HEADER_RAW_EVENT, SUBSCRIBED.encode())]
    return raw_frame(json.dumps(value, separators=(",", ":")).encode(), receive_time, headers, None)


@dataclass(frozen=True, slots=True)
class Marker:
    """A subscription marker, read back: the connection it opened and the names it knew (id → name)."""

    connection: ConnectionInfo
    names: dict[str, str]


@dataclass(frozen=True, slots=True)
class CapturedFrame:
    """A raw record read back: the frame (or marker) with what the bridge knew when it arrived."""

    key: bytes | None
    value: bytes
    receive_time: int  # µs since the epoch
    endpoint: Endpoint
    subscription: str  # the subscription's name, e.g. "id-0"
    attempt: int
    marker: Marker | None  # set for a subscription marker, None for a frame

    @classmethod
    def of(cls, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]) -> CapturedFrame:
        """Read a raw record; NotCaptured naming what is missing or wrong."""
        found = dict(headers)
        try:
            endpoint = Endpoint(found[HEADER_ENDPOINT].decode())
            subscription, _, attempt = found[HEADER_CONNECTION].decode().rpartition("/")
            receive_time = int(found[HEADER_RECEIVE_TIME].decode())
            attempt_number = int(attempt)
        except KeyError as exc:
            raise NotCaptured(f"no {exc.args[0]} header") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise NotCaptured(f"bad raw headers: {exc}") from None
        if not subscription or not attempt.isdigit() or not 0 <= receive_time < 1 << 63:
            raise NotCaptured("bad raw headers: connection or receive time out of range")
        marker = None
        event = found.get(HEADER_RAW_EVENT)
        if event is not None:
            if event != SUBSCRIBED.encode():
                raise NotCaptured(f"unknown raw event {event[:40]!r}")
            marker = _marker(value, endpoint, subscription, attempt_number)
        return cls(key, value, receive_time, endpoint, subscription, attempt_number, marker)


def _marker(value: bytes, endpoint: Endpoint, subscription: str, attempt: int) -> Marker:
    try:
        fields = json.loads(value)
        contracts = fields["contracts"]
        names = fields["names"]
    except (ValueError, RecursionError, TypeError, KeyError) as exc:
        raise NotCaptured(f"bad subscription marker: {type(exc).__name__}") from None
    if not (
        isinstance(contracts, list)
        and all(isinstance(contract, str) for contract in contracts)
        and isinstance(names, dict)
        and all(isinstance(name, str) for name in names.values())
    ):
        raise NotCaptured("bad subscription marker: contracts and names must be strings")
    connection = ConnectionInfo(Subscription(subscription, endpoint, tuple(contracts)), attempt)
    return Marker(connection, names)


def to_json_line(record: OutgoingRecord) -> bytes:
    """A raw record as one line of a capture file: key, headers, and the frame as text (UTF-8) or base64."""
    line: dict[str, object] = {
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
        "headers": {name: value.decode("utf-8", "replace") for name, value in record.headers},
    }
    try:
        line["frame"] = record.value.decode("utf-8")
    except UnicodeDecodeError:
        line["frame_base64"] = base64.b64encode(record.value).decode()
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def from_json_line(line: bytes) -> CapturedFrame:
    """A capture file's line read back; NotCaptured when it is not one `to_json_line` wrote."""
    try:
        fields = json.loads(line)
        headers = [(name, value.encode()) for name, value in fields["headers"].items()]
        key = fields["key"].encode() if fields["key"] is not None else None
        if "frame" in fields:
            value = fields["frame"].encode("utf-8")
        else:
            value = base64.b64decode(fields["frame_base64"], validate=True)
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        raise NotCaptured(f"not a capture line: {type(exc).__name__}") from None
    return CapturedFrame.of(key, value, headers)
