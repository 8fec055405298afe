"""The shard keeper: applies the group's plans to the subscriptions, handing shards over without disorder.

For every new plan (bridge/coordination.py), the keeper changes the connections once (the manager's reconcile:
the lost shards' connections close, the gained ones' open), then, for each shard at once:
- lost: waits until nothing of its contracts is left unacknowledged (memory, a round in flight, the spool),
  at most `coordination.handover_timeout_seconds` (what is left is counted in
  ime_bridge_handover_undelivered_records), then writes the release marker with the plan's token and the
  last snapshot it published per contract;
- gained from a live member: its contracts' updates are held from the first frame until that member's
  marker arrives (or the timeout runs out), then queued, minus what the marker says was already published.
  So the giver's last record of a contract precedes the taker's first, and the frames in between are
  neither lost (the taker subscribed before the giver stopped) nor repeated;
- gained from nobody (its owner died): served at once.
A plan is applied whole before the next one; the claim a member joins with is always its latest plan's shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from bridge.buffer import DeliveryBuffer
from bridge.config import CoordinationSettings
from bridge.coordination import CoordinationUnavailable, ReleaseMarker, ShardGroup
from bridge.intake import Intake
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.protocol import Endpoint
from bridge.publisher import Publisher
from bridge.retry import Backoff
from bridge.shards import MemberClaim, MemberPlan, shard_of
from bridge.subscriptions import SubscriptionManager

logger = logging.getLogger(__name__)

# How often a release looks whether its contracts' records are all acknowledged.
_DRAIN_POLL_SECONDS = 0.02


@dataclass
class ShardKeeper:
    """See the module docstring. `owned` starts with every shard when coordination is off (a group of one)."""

    settings: CoordinationSettings
    group: ShardGroup
    manager: SubscriptionManager
    intake: Intake
    buffer: DeliveryBuffer
    publisher: Publisher
    metrics: Metrics
    owned: frozenset[int] = frozenset()
    epoch: int = 0  # of the plan that gave `owned`
    joined: bool = False  # a plan of the group was applied
    _handed_over: asyncio.Event = field(default_factory=asyncio.Event)  # owns nothing, and no release is running

    def __post_init__(self) -> None:
        self.manager.owns = self.owns
        if self.settings.enabled:
            self.manager.group_of = self.connection_group
        self.metrics.owned_shards.set(len(self.owned))
        self.metrics.coordination_shards.set(self.settings.shards if self.settings.enabled else 0)

    def claim(self) -> MemberClaim:
        """What this member says when it joins: the shards of its latest plan, and that plan's epoch."""
        return MemberClaim(self.owned, epoch=self.epoch)

    def shard(self, endpoint: Endpoint, identifier: str) -> int:
        """A configured contract's shard (a name's by its resolved id; an unresolved name's by itself)."""
        contract_id = (
            identifier if endpoint is Endpoint.ID else (self.manager.contracts.id_of(identifier) or identifier)
        )
        return shard_of(contract_id, self.settings.shards)

    def owns(self, endpoint: Endpoint, identifier: str) -> bool:
        """Whether a configured contract is in an owned shard."""
        return self.shard(endpoint, identifier) in self.owned

    def connection_group(self, endpoint: Endpoint, identifier: str) -> str:
        """`s<shard>`: a shard's contracts get connections of their own, so that it moves alone."""
        return f"s{self.shard(endpoint, identifier)}"

    def _contracts_of(self, shards: Collection[int]) -> set[str]:
        return self.manager.contract_ids(lambda contract_id: shard_of(contract_id, self.settings.shards) in shards)

    async def run(self) -> None:
        """Join the group (retrying while Kafka does not answer), then apply its plans as they come."""
        backoff = Backoff(1.0, 30.0)
        while True:
            try:
                await self.group.start()
                break
            except CoordinationUnavailable as exc:
                delay = backoff.next_delay()
                log_event(logger, logging.ERROR, "coordination_unavailable", error=str(exc), retry_seconds=delay)
                await asyncio.sleep(delay)
        while True:
            plan = await self.group.plans.get()
            self._handed_over.clear()
            try:
                await self.apply(plan)
                self.joined = True
            finally:
                if not self.owned and self.group.plans.empty():
                    self._handed_over.set()

    async def apply(self, plan: MemberPlan) -> None:
        """Change the connections to `plan`'s shards and take part in its handovers."""
        lost = self.owned - plan.shards
        gained = plan.shards - self.owned
        if self.settings.enabled:
            self.metrics.rebalances.inc()
        self.epoch = plan.epoch
        if not lost and not gained:
            return
        taken_over = {shard: token for shard, token in plan.acquire.items() if shard in gained}
        self.intake.hold(self._contracts_of(set(taken_over)))
        self.owned = plan.shards
        self.metrics.owned_shards.set(len(plan.shards))
        await self.manager.reconcile()
        log_event(
            logger,
            logging.INFO,
            "shards_changed",
            owned=len(plan.shards),
            released=len(lost),
            taken_over=len(taken_over),
            started=len(gained) - len(taken_over),
        )
        await asyncio.gather(
            *(self._release(shard, plan.release.get(shard)) for shard in sorted(lost)),
            *(self._acquire(shard, token) for shard, token in sorted(taken_over.items())),
        )

    async def _release(self, shard: int, token: str | None) -> None:
        """Deliver what is held for `shard`'s contracts (within the timeout), then say so with the marker."""
        started = time.monotonic()
        contracts = self._contracts_of({shard})
        keys = {contract_id.encode() for contract_id in contracts}
        deadline = started + self.settings.handover_timeout_seconds
        left = self.buffer.pending(keys, self.publisher.in_flight)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
            left = self.buffer.pending(keys, self.publisher.in_flight)
        self.metrics.handover_undelivered_records.set(left)
        if left:
            log_event(logger, logging.ERROR, "handover_undelivered", shard=shard, records=left)
        if token is not None:
            try:
                await self.group.publish_release(ReleaseMarker(shard, token, self.intake.last_published(contracts)))
            except CoordinationUnavailable as exc:  # the taker starts after its timeout instead
                log_event(logger, logging.ERROR, "release_marker_failed", shard=shard, error=str(exc))
        self.metrics.handover_seconds.labels("release").observe(time.monotonic() - started)

    async def _acquire(self, shard: int, token: str) -> None:
        """Hold `shard`'s contracts until the giver's marker (or the timeout), then queue what it did not publish."""
        started = time.monotonic()
        marker = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.handover_timeout_seconds):
                marker = await self.group.wait_release(shard, token)
        if marker is None:
            log_event(logger, logging.WARNING, "release_marker_missing", shard=shard)
        queued, dropped = self.intake.release(self._contracts_of({shard}), marker.last if marker else {})
        self.metrics.handover_duplicates_dropped.inc(dropped)
        self.metrics.handover_seconds.labels("acquire").observe(time.monotonic() - started)
        log_event(logger, logging.DEBUG, "shard_taken_over", shard=shard, queued=queued, dropped=dropped)

    def serves_nothing(self) -> bool:
        """A member of a group that owns no configured contract (others serve them all)."""
        if not self.settings.enabled or not self.joined:
            return False
        ids, names = self.manager.wanted()
        return not ids and not names

    def status(self) -> dict[str, object]:
        """For /readyz: the shards owned, and whether this replica serves nothing now."""
        return {
            "coordinated": self.settings.enabled,
            "owned": len(self.owned),
            "of": self.settings.shards,
            "serves_nothing": self.serves_nothing(),
        }

    async def leave(self) -> None:
        """Hand every shard over to the others before a stop; returns once this replica owns none and its
        releases are done (the caller bounds the wait)."""
        if not self.settings.enabled or not self.owned:
            return
        await self.group.leave()
        await self._handed_over.wait()
