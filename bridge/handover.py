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

A member whose event loop stalls past the group's session timeout may have been expelled meanwhile: when it
resumes, the keeper publishes nothing until it has rejoined, and the publisher drops what was received of the
shards another member served meanwhile (`MemberPlan.superseded`): before that plan, and of those the other member
keeps, also after it, until their connections have closed.
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
from bridge.records import OutgoingRecord, RecordKind
from bridge.retry import Backoff
from bridge.shards import MemberClaim, MemberPlan, shard_of
from bridge.subscriptions import SubscriptionManager

logger = logging.getLogger(__name__)

# How often a release looks whether its contracts' records are all acknowledged, and a takeover whether its
# connections are open.
_POLL_SECONDS = 0.02
# How often the event loop's progress is looked at, for stalls that may have outlasted the session timeout.
_STALL_TICK_SECONDS = 0.1


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
    # Shards another member served while this one was expelled: what was received of them before the plan that
    # said so is stale.
    _superseded: frozenset[int] = frozenset()
    _superseded_before: float = 0.0
    # Set while this member's shards are its own; cleared by a stall of the event loop that may have outlasted
    # the session timeout, until the next plan says what is still owned.
    _ownership: asyncio.Event = field(default_factory=asyncio.Event)
    _last_tick: float = field(default_factory=time.monotonic)
    _stall_limit: float | None = None
    _watching: bool = False  # from the start of `run`: before it, time since construction is no stall
    _rejoin: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._ownership.set()
        if self.settings.enabled:
            # The group may have expelled a member silent for this long: a heartbeat may have been due just before.
            self._stall_limit = (self.settings.session_timeout_ms - self.settings.heartbeat_interval_ms) / 1000
            self.publisher.gate, self.publisher.stale = self.ownership_confirmed, self.stale
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
        """Join the group (retrying while Kafka does not answer), then apply its plans as they come, watching
        the event loop for a stall meanwhile."""
        watcher = None
        if self._stall_limit is not None:
            self._last_tick, self._watching = time.monotonic(), True
            watcher = asyncio.create_task(self._watch_stalls())
        try:
            await self._join_and_apply()
        finally:
            self._watching = False
            if watcher is not None:
                watcher.cancel()

    async def _join_and_apply(self) -> None:
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
        # A shard this member kept while it was expelled comes back by handover from the one that served it; its
        # connections may still hold frames from before the stall: they close, to open afresh once it is held.
        reacquired = self.owned & plan.shards & set(plan.acquire)
        gained = (plan.shards - self.owned) | reacquired
        if reacquired:
            self.owned -= reacquired
            await self.manager.reconcile()
        if self.settings.enabled:
            self.metrics.rebalances.inc()
        self.epoch = plan.epoch
        self._superseded = plan.superseded
        self._superseded_before = time.time()
        self._ownership.set()
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

    async def ownership_confirmed(self) -> None:
        """Return at once, unless the event loop stalled long enough for the group to have expelled this member:
        then rejoin, and return once the next plan says which shards are still this member's (the publisher's
        gate: records of a shard another member served meanwhile must not follow that member's)."""
        self._check_stall()
        await self._ownership.wait()

    def stale(self) -> Callable[[OutgoingRecord], bool] | None:
        """Whether a record is stale: its shard was served by another member while this one was expelled, and it
        was received before the plan that said so, or the shard stays with that member (what its connections
        deliver until they have closed). None when no shard is (the usual case: nothing to look at)."""
        if not self._superseded:
            return None
        superseded, before, shards, owned = self._superseded, self._superseded_before, self.settings.shards, self.owned

        def stale(record: OutgoingRecord) -> bool:
            if record.kind is not RecordKind.UPDATE or record.key is None:
                return False
            shard = shard_of(record.key.decode(), shards)
            return shard in superseded and (record.received < before or shard not in owned)

        return stale

    async def _watch_stalls(self) -> None:
        while True:
            await asyncio.sleep(_STALL_TICK_SECONDS)
            self._check_stall()

    def _check_stall(self) -> None:
        now = time.monotonic()
        stalled = now - self._last_tick
        self._last_tick = now
        if not self._watching or self._stall_limit is None or stalled <= self._stall_limit:
            return
        if not self._ownership.is_set():  # already rejoining
            return
        self._ownership.clear()
        self.metrics.event_loop_stalls.inc()
        log_event(logger, logging.WARNING, "event_loop_stalled", seconds=round(stalled, 1), action="rejoin")
        self._rejoin = asyncio.create_task(self.group.rejoin())

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
