"""The simulator's vocabulary: its configuration, counters, the connections and frames it reports, and why it
refuses a connection with 1008."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bridge.devtools.market import (
    Contract,
    Dialect,
)
from bridge.protocol import (
    Endpoint,
)

ADMIN_PREFIX = "/admin"
# The real service's 1008 does not say whether the token or a contract was at fault.
POLICY_CLOSE_MESSAGE = b"Policy Violation"
CLOSE_INTERNAL_ERROR = 1011
CLOSE_GOING_AWAY = 1001
# Pre-rendered frames kept in memory at most (about 800 bytes each): bounds the benchmark's footprint.
PRERENDER_BUDGET = 65_536
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
    # A capture file series (bridge/capture.py) played instead of the generated market (simulator/replay.py), at
    # its pace times replay_speed (0: as fast as clients read), once or in a loop.
    replay: Path | None = None
    replay_speed: float = 1.0
    replay_loop: bool = False
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


@dataclass(frozen=True)
class Catalogue:
    """The simulated market's contracts, and each by id and by name: what lookups and subscriptions resolve."""

    contracts: list[Contract]
    by_id: dict[str, Contract]
    by_name: dict[str, Contract]

    @classmethod
    def of(cls, contracts: list[Contract]) -> Catalogue:
        """The catalogue of `contracts`."""
        return cls(
            contracts,
            {contract.id: contract for contract in contracts},
            {contract.name: contract for contract in contracts},
        )

    def by(self, endpoint: Endpoint) -> dict[str, Contract]:
        """The contracts by the identifier `endpoint` subscribes with."""
        return self.by_id if endpoint is Endpoint.ID else self.by_name


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
    # Per contract: changes made while no connection was subscribed to it, after one had been (coverage gaps)
    unheard: Counter[str] = field(default_factory=Counter)


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


def retry_after_header(status: int, seconds: int | None) -> dict[str, str] | None:
    """The Retry-After header of a 429 or 503 answer; None for other statuses or when `seconds` is None."""
    return {"Retry-After": str(seconds)} if status in (429, 503) and seconds is not None else None
