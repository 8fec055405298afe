"""The IME (HT Data Engine) protocol as the bridge speaks it: paths, parameter spellings, close codes.

Pure: no I/O. Both the bridge and the simulator import these names, so the two can only disagree
where the reference documents disagree (see ../shared/ref and docs/protocol.md).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from urllib.parse import urlencode

TOKEN_PATH = "/auth/user/token/issue"
LIVE_PATH_PREFIX = "/data-engine/ime/live/data/websocket/contract"
# The earlier document serves the same endpoints without the /data-engine/ime prefix.
LEGACY_LIVE_PATH_PREFIX = "/live/data/websocket/contract"
STATIC_PATH_PREFIX = "/data-engine/ime/static/data/contract"
STATIC_SEARCH_PATH = f"{STATIC_PATH_PREFIX}/search"
STATIC_BY_NAME_PATH = f"{STATIC_PATH_PREFIX}/name"
STATIC_BY_ID_PATH = f"{STATIC_PATH_PREFIX}/id"

# Token request field spellings: the documented one, then the official SDK's.
USERNAME_FIELDS = ("username", "UserName_or_Email")
PASSWORD_FIELDS = ("password", "Password")

CHANNEL = "IME Stream"
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009  # sent by the bridge when a frame exceeds its WebSocket size limit
MARKETS = ("IMEFutures", "IMEOption", "IMEDepositCertificate")


class Endpoint(enum.StrEnum):
    """The two live endpoints: subscription by contract id or by contract name."""

    ID = "id"
    NAME = "name"

    @property
    def path(self) -> str:
        """The WebSocket path of this endpoint, relative to the service root."""
        return f"{LIVE_PATH_PREFIX}/{self.value}"

    @property
    def legacy_path(self) -> str:
        """The same endpoint as the earlier document serves it, without the /data-engine/ime prefix."""
        return f"{LEGACY_LIVE_PATH_PREFIX}/{self.value}"

    @property
    def query_params(self) -> tuple[str, ...]:
        """Accepted query-parameter spellings, the one the bridge sends first."""
        if self is Endpoint.ID:
            return ("contract_id",)
        return ("contract_name", "contract_names")

    @property
    def static_lookup_param(self) -> str:
        """Query parameter of the static lookup for this kind of identifier."""
        return "contract_ids" if self is Endpoint.ID else "contract_names"


def live_url(ws_base_url: str, endpoint: Endpoint, contracts: Iterable[str]) -> str:
    """Build the subscription URL: the service subscribes by query string, never by message."""
    query = urlencode([(endpoint.query_params[0], contract) for contract in contracts])
    return f"{ws_base_url.rstrip('/')}{endpoint.path}?{query}"


def authorization_header(token: str, *, bearer: bool = False) -> str:
    """The handshake's Authorization value: the raw JWT (documented) or `Bearer <JWT>` (some revisions)."""
    return f"Bearer {token}" if bearer else token


def strip_bearer(value: str) -> str:
    """Accept both Authorization spellings and return the bare token."""
    scheme, _, rest = value.partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest else value.strip()


# A Retry-After longer than this is taken as this: a server's typo must not silence a subscription for days.
MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header given in seconds (an HTTP date is not honoured: None)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds < float("inf"):
        return None
    return min(seconds, MAX_RETRY_AFTER)
