"""The shard keeper: applies the group's plans to the subscriptions, handing shards over without disorder.

For every new plan (bridge/coordination.py), the keeper changes the connections (the manager's reconcile: the
gained shards' connections open, the lost ones' close), then, for each shard at once:
- gained from a live member: its contracts' updates are held from the first frame; once the shard's
  connections are open the keeper says so (a subscribed marker), then waits for the giver's release marker
  (or the timeout), and queues what was held, minus what the marker says was already published;
- lost to a member that confirms (`MemberPlan.confirmed`): served on until the taker's subscribed marker (at
  most `coordination.handover_timeout_seconds`), so that no change of the exchange falls between the giver's
  last frame and the taker's first; then its connections close;
- lost: waits until nothing of its contracts is left unacknowledged (memory, a round in flight, the spool),
  at most the timeout again (what is left is counted in ime_bridge_handover_undelivered_records), then writes
  the release marker with the plan's token and the last snapshot it published per contract;
- gained from nobody (its owner died): served at once.
So the giver's last record of a contract precedes the taker's first, and the frames in between are neither
lost (the taker subscribed before the giver stopped) nor repeated. A plan is applied whole before the next;
the claim a member joins with is always its latest plan's shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from bridge.buffer import DeliveryBuffer
from bridge.config import CoordinationSettings
from bridge.coordination import CoordinationUnavailable, ReleaseMarker, ShardGroup, SubscribedMarker
from bridge.intake import Intake
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.protocol import Endpoint
from bridge.publisher import Publisher
from bridge.retry import Backoff
from bridge.shards import MemberClaim, MemberPlan, shard_of
from bridge.subscriptions import SubscriptionManager

logger = logging.getLogger(__name__)

# How often a release looks whether its contracts' records are all acknowledged, and a takeover whether its
# connections are open.
_POLL_SECONDS = 0.02


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
    _serving_on: set[int] = field(default_factory=set)  # released, served until the taker has subscribed

    def __post_init__(self) -> None:
        self.manager.owns = self.owns
        if self.settings.enabled:
            self.manager.group_of = self.connection_group
        self.metrics.owned_shards.set(len(self.owned))
        self.metrics.coordination_shards.set(self.settings.shards if self.settings.enabled else 0)

    def claim(self) -> MemberClaim:
        """What this member says when it joins: the shards of its latest plan, and that plan's epoch."""
        return MemberClaim(self.owned, epoch=self.epoch, confirms=True)

    def shard(self, endpoint: Endpoint, identifier: str) -> int:
        """A configured contract's shard (a name's by its resolved id; an unresolved name's by itself)."""
        contract_id = (
            identifier if endpoint is Endpoint.ID else (self.manager.contracts.id_of(identifier) or identifier)
        )
        return shard_of(contract_id, self.settings.shards)

    def owns(self, endpoint: Endpoint, identifier: str) -> bool:
        """Whether a configured contract is in an owned shard (or one released and served until its taker
        has subscribed)."""
        shard = self.shard(endpoint, identifier)
        return shard in self.owned or shard in self._serving_on

    def connection_group(self, endpoint: Endpoint, identifier: str) -> str:
        """`s<shard>`: a shard's contracts get connections of their own, so that it moves alone."""
        return _group_name(self.shard(endpoint, identifier))

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
        self._serving_on = {shard for shard in lost if shard in plan.confirmed and shard in plan.release}
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
        """Serve `shard` until its taker has subscribed (a confirmed handover), then deliver what is held for its
        contracts (within the timeout each), then say so with the marker."""
        started = time.monotonic()
        timeout = self.settings.handover_timeout_seconds
        if shard in self._serving_on and token is not None:
            try:
                async with asyncio.timeout(timeout):
                    await self.group.wait_subscribed(shard, token)
            except TimeoutError:
                self.metrics.handover_markers_missing.labels("subscribed").inc()
                log_event(logger, logging.WARNING, "subscribed_marker_missing", shard=shard)
            self._serving_on.discard(shard)
            await self.manager.reconcile()
        contracts = self._contracts_of({shard})
        keys = {contract_id.encode() for contract_id in contracts}
        await _poll_until(lambda: not self.buffer.pending(keys, self.publisher.in_flight), timeout)
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
        """Say when `shard`'s connections are open, hold its contracts until the giver's marker (or the
        timeout), then queue what the giver did not publish."""
        started = time.monotonic()
        timeout = self.settings.handover_timeout_seconds
        # A server refusing or not answering: said after the timeout, the giver stops then anyway.
        await _poll_until(lambda: self.manager.source.streaming(_group_name(shard)), timeout)
        try:
            await self.group.publish_subscribed(SubscribedMarker(shard, token))
        except CoordinationUnavailable as exc:  # the giver stops after its timeout instead
            log_event(logger, logging.ERROR, "subscribed_marker_failed", shard=shard, error=str(exc))
        marker = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                marker = await self.group.wait_release(shard, token)
        if marker is None:
            self.metrics.handover_markers_missing.labels("release").inc()
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


def _group_name(shard: int) -> str:
    return f"s{shard}"


async def _poll_until(condition: Callable[[], bool], within: float) -> None:
    """Return once `condition()` holds or `within` seconds have passed, looking every _POLL_SECONDS (the buffer
    and the source signal neither, and handovers are rare)."""
    deadline = time.monotonic() + within
    met = condition()
    while not met and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_SECONDS)
        met = condition()
