"""Which connections to open: contracts split into subscriptions, pure arithmetic.

The service subscribes by query string, so a connection carries a bounded number of contracts and a
bounded URL length. Each subscription is named `<endpoint>-<n>`; that name is the `connection`
label of the metrics and a header of every record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bridge.protocol import Endpoint, live_url


@dataclass(frozen=True, slots=True)
class Subscription:
    """One connection's worth of contracts on one endpoint."""

    name: str
    endpoint: Endpoint
    contracts: tuple[str, ...]

    def url(self, ws_base_url: str) -> str:
        """The subscription URL of this connection."""
        return live_url(ws_base_url, self.endpoint, self.contracts)


def plan_subscriptions(
    ws_base_url: str,
    contract_ids: Sequence[str],
    contract_names: Sequence[str],
    *,
    max_contracts: int,
    max_url_length: int,
) -> list[Subscription]:
    """Split ids and names into subscriptions of at most `max_contracts` and `max_url_length` each."""
    plan: list[Subscription] = []
    for endpoint, contracts in ((Endpoint.ID, contract_ids), (Endpoint.NAME, contract_names)):
        bare_length = len(live_url(ws_base_url, endpoint, []))
        chunks: list[list[str]] = []
        length = bare_length
        for contract in contracts:
            # Each contract adds "param=value" plus a "&" separator after the first.
            added = len(live_url("", endpoint, [contract])) - len(live_url("", endpoint, []))
            if bare_length + added > max_url_length:
                raise ValueError(f"contract {contract!r} alone makes a URL longer than {max_url_length}")
            if not chunks or len(chunks[-1]) >= max_contracts or length + 1 + added > max_url_length:
                chunks.append([])
                length = bare_length - 1  # no "&" before the first parameter
            chunks[-1].append(contract)
            length += 1 + added
        plan.extend(
            Subscription(f"{endpoint.value}-{number}", endpoint, tuple(chunk)) for number, chunk in enumerate(chunks)
        )
    return plan
