"""Which connections to open: contracts split into subscriptions, pure arithmetic.

The service subscribes by query string, so a connection carries a bounded number of contracts and a
bounded URL length. Each subscription is named `<endpoint>-<n>`; that name is the `connection`
label of the metrics and a header of every record.
"""

from __future__ import annotations

import asyncio
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
    group: str = ""  # the contracts' shard when replicas share them: a shard's connections change alone

    def url(self, ws_base_url: str) -> str:
        """The subscription URL of this connection."""
        return live_url(ws_base_url, self.endpoint, self.contracts)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Identifies one physical connection: the subscription and which attempt of it this is."""

    subscription: Subscription
    attempt: int

    @property
    def label(self) -> str:
        """`<subscription>/<attempt>`, the `connection` header of records."""
        return f"{self.subscription.name}/{self.attempt}"


def plan_subscriptions(
    ws_base_url: str,
    contract_ids: Sequence[str],
    contract_names: Sequence[str],
    *,
    max_contracts: int,
    max_url_length: int,
    group: str = "",
) -> list[Subscription]:
    """Split ids and names into subscriptions of at most `max_contracts` and `max_url_length` each, named
    `<endpoint>-<n>` (`<endpoint>-<group>-<n>` in a group)."""
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
            Subscription(_name(endpoint, group, number), endpoint, tuple(chunk), group)
            for number, chunk in enumerate(chunks)
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
    group: str = "",
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
            if subscription.endpoint is not endpoint or subscription.group != group:
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
        plan.extend(Subscription(name, endpoint, tuple(contracts), group) for name, contracts, _ in kept)
        used = {name for name, _, _ in kept}
        numbers = (n for n in itertools.count() if _name(endpoint, group, n) not in used)
        for chunk in plan_subscriptions(
            ws_base_url,
            new if endpoint is Endpoint.ID else [],
            new if endpoint is Endpoint.NAME else [],
            max_contracts=max_contracts,
            max_url_length=max_url_length,
        ):
            plan.append(Subscription(_name(endpoint, group, next(numbers)), endpoint, chunk.contracts, group))
    return plan


def _name(endpoint: Endpoint, group: str, number: int) -> str:
    return f"{endpoint.value}-{group}-{number}" if group else f"{endpoint.value}-{number}"


async def find_invalid(
    contracts: Sequence[str],
    probe: Callable[[Sequence[str]], Awaitable[bool]],
    on_valid: Callable[[Sequence[str]], Awaitable[None]] | None = None,
    *,
    known_refused: bool = True,
) -> list[str]:
    """The contracts of a refused list that the service refuses alone, in at most 2·k·⌈log2 n⌉ probes.

    `probe(subset)` answers whether the service accepts a subscription to `subset`. Both halves of a refused
    group are probed at once (the caller bounds how many probes run together); an accepted half is valid and
    `on_valid` hears of it at once, so its contracts can be subscribed while the search goes on over the
    suspects; a refused half is split again. A contract is returned only once it was refused when probed
    alone: when both halves of a refused group are accepted, the refusal was not a contract's (a token, a
    limit) and nothing in the group is blamed. With `known_refused=False` (a search resumed over what is still
    suspect) the whole list is probed first.
    """

    async def search(group: Sequence[str]) -> list[str]:
        if len(group) == 1:  # searched only once refused: this contract was refused alone
            return [group[0]]
        halves = (group[: len(group) // 2], group[len(group) // 2 :])
        accepted = await asyncio.gather(*(probe(half) for half in halves))
        refused = [half for half, ok in zip(halves, accepted, strict=True) if not ok]
        if on_valid is not None:
            for half, ok in zip(halves, accepted, strict=True):
                if ok:
                    await on_valid(half)
        found = await asyncio.gather(*(search(half) for half in refused))
        return [contract for contracts in found for contract in contracts]

    if not known_refused and await probe(contracts):
        if on_valid is not None:
            await on_valid(contracts)
        return []
    return await search(list(contracts))
