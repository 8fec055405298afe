"""Which contracts the bridge subscribes to, kept true while the world changes.

The SubscriptionManager owns the wanted contracts (from the configuration, reloaded on SIGHUP), resolves
names to ids (at start and every `name_refresh_seconds`; a name that does not resolve is quarantined,
never published under a guessed key), keeps a quarantine of contracts the service refuses, and turns all
of it into a plan that changes as few connections as possible (planner.replan).

A 1008 that a fresh token does not cure means an invalid contract in that connection's list: its contracts
become suspects (left out of the plan), and the manager searches them with short-lived probe connections, at
most MAX_CONCURRENT_PROBES at once. Each half a probe finds valid is subscribed again at once, so valid
contracts are dark for about one probe window; only contracts refused when probed alone are quarantined.
Quarantined contracts are probed again every `quarantine_reprobe_seconds` (a new listing becomes valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bridge.catalog import CatalogUnavailable, ContractCatalog
from bridge.config import ImeSettings
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory
from bridge.planner import Subscription, find_invalid, replan
from bridge.protocol import Endpoint
from bridge.source import SourceUnavailable, WebSocketSource
from bridge.supervise import every, supervised

logger = logging.getLogger(__name__)

# Probe connections open at once during a search: enough to search both halves of every refused group at a
# level of a few invalid contracts, few enough not to look like a flood to the service.
MAX_CONCURRENT_PROBES = 4


class QuarantineReason(enum.StrEnum):
    """Why a contract is not subscribed (the `reason` label of ime_bridge_quarantined_contracts)."""

    REJECTED = "rejected"  # the service closed its subscription with 1008
    UNRESOLVED = "unresolved"  # a name the static lookup does not know


@dataclass(frozen=True)
class Quarantined:
    """A contract left out of the subscriptions, and why."""

    endpoint: Endpoint
    identifier: str
    reason: QuarantineReason
    since: float


@dataclass
class SubscriptionManager:
    """See the module docstring. The manager is the only writer of `contracts`, which the normalizer reads."""

    settings: ImeSettings
    catalog: ContractCatalog
    source: WebSocketSource
    metrics: Metrics
    contracts: ContractDirectory = field(default_factory=ContractDirectory)
    quarantine: dict[tuple[Endpoint, str], Quarantined] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    # Whether this replica serves a configured contract (bridge/handover.py); a lone bridge serves them all.
    owns: Callable[[Endpoint, str], bool] = lambda endpoint, identifier: True
    # The connection group of a contract: contracts of different groups never share a connection, so a group
    # (a replica's shard) changes hands without reopening the connections of the others.
    group_of: Callable[[Endpoint, str], str] = lambda endpoint, identifier: ""
    _bisecting: set[str] = field(default_factory=set)
    # Contracts of a refused subscription not yet known valid or invalid: out of the plan until found.
    _suspects: set[tuple[Endpoint, str]] = field(default_factory=set)
    _probe_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_PROBES))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> None:
        """Resolve names, subscribe, and start the re-probe and name-refresh schedules."""
        refusals = supervised("refusals", self._search_refused, metrics=self.metrics)
        self._tasks.append(asyncio.create_task(refusals, name="refusals"))
        await self.resolve_names(retry_until_answered=True)
        await self.reconcile()
        reprobe = every(self.settings.quarantine_reprobe_seconds, self.reprobe, task="reprobe", metrics=self.metrics)
        names = every(
            self.settings.name_refresh_seconds, self._refresh_names, task="name-refresh", metrics=self.metrics
        )
        self._tasks += [asyncio.create_task(reprobe, name="reprobe"), asyncio.create_task(names, name="names")]

    async def stop(self) -> None:
        """Stop the schedules (the source is stopped by its owner)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self, settings: ImeSettings) -> set[str]:
        """Apply new contract lists (SIGHUP); returns the connections opened or reopened."""
        async with self._lock:
            self.settings = settings
        await self.resolve_names(retry_until_answered=False)
        return await self.reconcile()

    def wanted(self) -> tuple[list[str], list[str]]:
        """(ids, names) to subscribe to now: configured, owned (a replica's shards), resolved, neither quarantined
        nor suspect."""
        left_out = self.quarantine.keys() | self._suspects
        owns = self.owns
        ids = [c for c in self.settings.contract_ids if (Endpoint.ID, c) not in left_out and owns(Endpoint.ID, c)]
        names = [
            n for n in self.settings.contract_names if (Endpoint.NAME, n) not in left_out and owns(Endpoint.NAME, n)
        ]
        return ids, names

    def contract_ids(self, owned: Callable[[str], bool]) -> set[str]:
        """The ids of the configured contracts for which `owned(contract id)` holds (names by their resolved id)."""
        ids = {contract_id for contract_id in self.settings.contract_ids if owned(contract_id)}
        for name in self.settings.contract_names:
            contract_id = self.contracts.id_of(name)
            if contract_id is not None and owned(contract_id):
                ids.add(contract_id)
        return ids

    async def reconcile(self) -> set[str]:
        """Bring the connections in line with what is wanted; only changed connections reopen."""
        async with self._lock:
            ids, names = self.wanted()
            groups: dict[str, tuple[list[str], list[str]]] = {}
            group_of = self.group_of
            for contract_id in ids:
                groups.setdefault(group_of(Endpoint.ID, contract_id), ([], []))[0].append(contract_id)
            for name in names:
                groups.setdefault(group_of(Endpoint.NAME, name), ([], []))[1].append(name)
            plan = [
                subscription
                for group, (group_ids, group_names) in sorted(groups.items())
                for subscription in replan(
                    self.source.subscriptions,
                    str(self.settings.ws_url),
                    group_ids,
                    group_names,
                    max_contracts=self.settings.max_contracts_per_connection,
                    max_url_length=self.settings.max_url_length,
                    group=group,
                )
            ]
            opened = await self.source.apply(plan)
            self._export()
        if opened:
            log_event(logger, logging.INFO, "subscriptions_applied", connections=len(plan), opened=sorted(opened))
        return opened

    async def resolve_names(self, *, retry_until_answered: bool) -> None:
        """Resolve configured names to ids (the records' keys); describe configured ids with their names."""
        names = list(self.settings.contract_names)
        delay = self.settings.reconnect_min_seconds
        while names:
            try:
                refs = await self.catalog.by_names(names)
                break
            except CatalogUnavailable as exc:
                log_event(logger, logging.WARNING, "name_lookup_failed", error=str(exc))
                if not retry_until_answered:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_seconds)
        else:
            refs = {}
        now = self.clock()
        for name in names:
            key = (Endpoint.NAME, name)
            ref = refs.get(name)
            if ref is None:
                if key not in self.quarantine:
                    log_event(logger, logging.ERROR, "contract_name_unresolved", contract_name=name)
                    self.quarantine[key] = Quarantined(Endpoint.NAME, name, QuarantineReason.UNRESOLVED, now)
                continue
            self.contracts.learn(ref.contract_id, name)
            if key in self.quarantine and self.quarantine[key].reason is QuarantineReason.UNRESOLVED:
                del self.quarantine[key]
                log_event(
                    logger, logging.INFO, "contract_name_resolved", contract_name=name, contract_id=ref.contract_id
                )
        if self.settings.contract_ids:
            try:
                described = await self.catalog.by_ids(self.settings.contract_ids)
            except CatalogUnavailable as exc:
                log_event(logger, logging.WARNING, "id_lookup_failed", error=str(exc))
                return
            for contract_id, ref in described.items():
                self.contracts.learn(contract_id, ref.contract_name)

    async def _refresh_names(self) -> None:
        before = set(self.quarantine)
        await self.resolve_names(retry_until_answered=False)
        if set(self.quarantine) != before:
            await self.reconcile()

    async def _search_refused(self) -> None:
        """Search every subscription the source hands over as refused even on a fresh token."""
        while True:
            self._on_invalid_contract(await self.source.refused.get())

    def _on_invalid_contract(self, subscription: Subscription) -> None:
        """This subscription is refused even on a fresh token: find its invalid contracts."""
        if subscription.name in self._bisecting:
            return
        self._bisecting.add(subscription.name)
        self._suspects.update((subscription.endpoint, contract) for contract in subscription.contracts)
        self._tasks = [task for task in self._tasks if not task.done()]
        isolate = supervised("bisection", functools.partial(self._isolate, subscription), metrics=self.metrics)
        self._tasks.append(asyncio.create_task(isolate, name=f"bisect-{subscription.name}"))

    async def _isolate(self, subscription: Subscription) -> None:
        """Find the invalid contracts of `subscription` by bisection, quarantine them, resubscribe the rest."""
        started = time.monotonic()
        await self.reconcile()  # the suspects leave the plan, and the refused connection with them
        # Suspects stay out of re-plans until found: a failed search is restarted by its supervisor, still excluded.
        invalid, probes = await self._bisect(subscription)
        self._bisecting.discard(subscription.name)
        now = self.clock()
        for identifier in invalid:
            self.quarantine[(subscription.endpoint, identifier)] = Quarantined(
                subscription.endpoint, identifier, QuarantineReason.REJECTED, now
            )
        self._suspects.difference_update((subscription.endpoint, contract) for contract in subscription.contracts)
        log_event(
            logger,
            logging.ERROR if invalid else logging.WARNING,
            "contracts_quarantined" if invalid else "refusal_not_explained",
            connection=subscription.name,
            contracts=",".join(invalid),
            probes=probes,
            seconds=round(time.monotonic() - started, 2),
        )
        await self.reconcile()

    async def _bisect(self, subscription: Subscription) -> tuple[list[str], int]:
        """(invalid contracts, probe connections used)."""
        delay = self.settings.reconnect_min_seconds
        probes = 0

        endpoint = subscription.endpoint

        async def probe(subset: Sequence[str]) -> bool:
            nonlocal probes
            async with self._probe_slots:
                probes += 1
                return await self.source.probe(endpoint, subset, "bisect")

        async def release(valid: Sequence[str]) -> None:
            self._suspects.difference_update((endpoint, contract) for contract in valid)
            await self.reconcile()

        resumed = False
        while True:
            suspects = [contract for contract in subscription.contracts if (endpoint, contract) in self._suspects]
            if not suspects:
                return [], probes
            try:
                return await find_invalid(suspects, probe, release, known_refused=not resumed), probes
            except SourceUnavailable as exc:  # the service is unreachable: try the search again later
                log_event(logger, logging.WARNING, "probe_failed", connection=subscription.name, error=str(exc))
                resumed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_seconds)

    async def reprobe(self) -> None:
        """Probe each refused contract alone; those the service now accepts are subscribed again."""
        released = []
        for key, entry in list(self.quarantine.items()):
            if entry.reason is not QuarantineReason.REJECTED:
                continue
            with contextlib.suppress(SourceUnavailable):
                if await self.source.probe(entry.endpoint, [entry.identifier], "reprobe"):
                    del self.quarantine[key]
                    released.append(entry.identifier)
        if released:
            log_event(logger, logging.INFO, "contracts_released", contracts=",".join(released))
            await self.reconcile()
        self._export()

    def _export(self) -> None:
        for reason in QuarantineReason:
            count = sum(1 for entry in self.quarantine.values() if entry.reason is reason)
            self.metrics.quarantined_contracts.labels(reason.value).set(count)

    def status(self) -> dict[str, dict[str, str]]:
        """What is quarantined and why, for /readyz."""
        return {
            f"{entry.endpoint.value}:{entry.identifier}": {"reason": entry.reason.value, "since": f"{entry.since:.0f}"}
            for entry in self.quarantine.values()
        }
