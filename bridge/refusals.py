"""How a 1008 close is read: the service closes with 1008 for a bad token and for an invalid contract alike.

A 1008 blames a contract only when it is quick (no frame, within PROBE_WINDOW of opening) and comes on a token
other than the one refused before it, i.e. a token issued after that refusal. A connection that proved healthy
(a frame, or up past the window) clears the suspicion, so token expiries hours apart never add up to a
contract's fault. Pure: fed the facts of each ended connection.
"""

from __future__ import annotations

import enum


class PolicyCause(enum.StrEnum):
    """What a 1008 is taken for (the `reason` label of ime_bridge_policy_rejections_total)."""

    AUTH = "auth"  # re-issue the token and reconnect
    CONTRACT = "contract"  # a fresh token was refused at once too: search the list for invalid contracts


class PolicyRefusals:
    """The 1008 history of one subscription."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._refused_token: str | None = None

    def healthy(self, seconds_open: float, received: bool) -> bool:
        """Whether a connection proved that its token and contracts were accepted."""
        return received or seconds_open >= self.window

    def on_policy_close(self, token: str, seconds_open: float, received: bool) -> PolicyCause:
        """Classify a 1008 that ended a connection opened with `token`."""
        if not self.healthy(seconds_open, received) and self._refused_token not in (None, token):
            return PolicyCause.CONTRACT
        self._refused_token = token
        return PolicyCause.AUTH

    def on_other_end(self, seconds_open: float, received: bool) -> None:
        """A connection ended some other way: if it was healthy, earlier refusals no longer count."""
        if self.healthy(seconds_open, received):
            self._refused_token = None
