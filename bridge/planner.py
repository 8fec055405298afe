"""Which connections to open: contracts split into subscriptions, pure arithmetic.

The service subscribes by query string, so a connection carries a bounded number of contracts and a
bounded URL length. Each subscription is named `<endpoint>-<n>`; that name is the `connection`
label of the metrics and a header of every record.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
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


def replan(
    current: Sequence[Subscription],
    ws_base_url: str,
    contract_ids: Sequence[str],
    contract_names: Sequence[str],
    *,
    max_contracts: int,
    max_url_length: int,
) -> list[Subscription]:
    """A plan for the wanted contracts that changes as few connections of `current` as possible.

    A subscription keeps its name; it changes only when contracts leave it or are added to it. New
    contracts first fill subscriptions that change anyway (they reopen regardless), then go to new ones,
    so adding contracts never reopens a connection that was otherwise untouched.
    """
    plan: list[Subscription] = []
    for endpoint, wanted in ((Endpoint.ID, contract_ids), (Endpoint.NAME, contract_names)):
        wanted_set = set(wanted)
        kept: list[tuple[str, list[str], bool]] = []
        placed: set[str] = set()
        for subscription in current:
            if subscription.endpoint is not endpoint:
                continue
            contracts = [contract for contract in subscription.contracts if contract in wanted_set]
            placed.update(contracts)
            if contracts:
                kept.append((subscription.name, contracts, len(contracts) != len(subscription.contracts)))
        new = [contract for contract in wanted if contract not in placed]

        for _, contracts, changed in kept:
            while changed and new and len(contracts) < max_contracts:
                if len(live_url(ws_base_url, endpoint, [*contracts, new[0]])) > max_url_length:
                    break
                contracts.append(new.pop(0))
        plan.extend(Subscription(name, endpoint, tuple(contracts)) for name, contracts, _ in kept)
        used = {name for name, _, _ in kept}
        numbers = (n for n in itertools.count() if f"{endpoint.value}-{n}" not in used)
        for chunk in plan_subscriptions(
            ws_base_url,
            new if endpoint is Endpoint.ID else [],
            new if endpoint is Endpoint.NAME else [],
            max_contracts=max_contracts,
            max_url_length=max_url_length,
        ):
            plan.append(Subscription(f"{endpoint.value}-{next(numbers)}", endpoint, chunk.contracts))
    return plan


async def find_invalid(contracts: Sequence[str], probe: Callable[[Sequence[str]], Awaitable[bool]]) -> list[str]:
    """The invalid contracts of a list known to hold at least one, in at most k·(⌈log2 n⌉ + 1) probes.

    `probe(subset)` answers whether the service accepts a subscription to `subset`. Each round finds one
    invalid contract by binary search (a half that is refused holds one; otherwise the other half does),
    then probes what is still unknown: accepted means done. Halves found valid are not searched again.
    """
    invalid: list[str] = []
    known_valid: set[str] = set()
    unknown = list(contracts)
    while True:
        suspects = unknown
        while len(suspects) > 1:
            first, second = suspects[: len(suspects) // 2], suspects[len(suspects) // 2 :]
            if await probe(first):
                known_valid.update(first)
                suspects = second
            else:
                suspects = first
        invalid.append(suspects[0])
        unknown = [c for c in unknown if c != suspects[0] and c not in known_valid]
        if not unknown or await probe(unknown):
            return invalid
