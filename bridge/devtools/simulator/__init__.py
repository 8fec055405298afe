"""The IME simulator, a faithful fake of the HT Data Engine service on one aiohttp port: `Simulator` (server.py:
lifecycle, fault API, app wiring), its token part (tokens.py), static lookups (static.py), live WebSockets and
their connections (live.py), admin endpoints (admin.py), the market feed that makes and queues the frames
(feed.py; a capture as the market: replay.py), its vocabulary (model.py); `ime-bridge simulate` (cli.py).

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

from bridge.devtools.simulator.cli import add_arguments, config_from_args, run_from_args
from bridge.devtools.simulator.model import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    GARBAGE_KINDS,
    GarbageKind,
    PolicyCause,
    SentFrame,
    ServerConnection,
    SimulatorConfig,
    SimulatorCounters,
)
from bridge.devtools.simulator.server import Simulator

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "GARBAGE_KINDS",
    "GarbageKind",
    "PolicyCause",
    "SentFrame",
    "ServerConnection",
    "Simulator",
    "SimulatorConfig",
    "SimulatorCounters",
    "add_arguments",
    "config_from_args",
    "run_from_args",
]
