"""The replicas' group: which shards this process owns, decided by a Kafka consumer group, and the markers
of handovers, on the control topic (one partition per shard).

Membership, failure detection and rebalancing are the group coordinator's (aiokafka's consumer); the only
thing of ours in it is the assignor, `ShardAssignor`, which runs bridge/shards.py's `assign_shards` when this
member leads: members say in their join which shards they serve (and whether they are leaving), and each
gets its shards with the handovers it takes part in. A taker writes a `SubscribedMarker` to the shard's
partition once its connections are open; a giver writes a `ReleaseMarker` there once it has delivered what it
held for the shard. Every member reads the partitions it is assigned: its shards', so the taker sees the
release, and a giver those of the shards it serves until its taker has subscribed. `SoleOwner` is the group
of one used when `coordination.group_id` is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError

from bridge.config import CoordinationSettings, KafkaSettings
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.records import SinkUnavailable
from bridge.shards import MemberClaim, MemberPlan, assign_shards
from bridge.sink import client_options, create_topics
from bridge.supervise import supervised

logger = logging.getLogger(__name__)

# Markers matter only during a handover: an hour of them is plenty.
CONTROL_TOPIC_CONFIG = {"retention.ms": "3600000", "cleanup.policy": "delete"}
# Markers read before anyone waits for them (the giver can be faster than the taker's assignment).
_EARLY_MARKERS = 4096


class CoordinationUnavailable(Exception):
    """The group or its control topic cannot be used (Kafka unreachable, a topic with the wrong partitions)."""


@dataclass(frozen=True)
class ReleaseMarker:
    """A giver's word that it delivered everything it held of `shard`'s contracts: per contract, the exchange
    time (µs) and fingerprint of the last snapshot it published, so that the taker drops what it repeats."""

    shard: int
    token: str
    last: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The marker as a control-topic record value."""
        last = {contract: list(seen) for contract, seen in self.last.items()}
        return json.dumps({"shard": self.shard, "token": self.token, "last": last}, sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> ReleaseMarker | None:
        """A marker, or None for a value that is not one (the control topic is ours, but bytes are bytes)."""
        try:
            document = json.loads(value or b"")
            last = {str(contract): (int(seen[0]), int(seen[1])) for contract, seen in document["last"].items()}
            return cls(int(document["shard"]), str(document["token"]), last)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None


@dataclass(frozen=True)
class SubscribedMarker:
    """A taker's word that its connections for `shard` are open: the giver may stop serving the shard.
    (Not a ReleaseMarker: it has no `last`, so members that do not confirm ignore it.)"""

    shard: int
    token: str

    def encode(self) -> bytes:
        """The marker as a control-topic record value."""
        return json.dumps({"shard": self.shard, "token": self.token, "subscribed": True}, sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> SubscribedMarker | None:
        """A marker, or None for a value that is not one."""
        try:
            document = json.loads(value or b"")
            if document["subscribed"] is not True:
                return None
            return cls(int(document["shard"]), str(document["token"]))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None


Marker = ReleaseMarker | SubscribedMarker
_Kind = TypeVar("_Kind", ReleaseMarker, SubscribedMarker)


def read_marker(value: bytes | None) -> Marker | None:
    """Whichever marker a control-topic record holds, or None."""
    return SubscribedMarker.decode(value) or ReleaseMarker.decode(value)


async def control_topic_partitions(admin: AIOKafkaAdminClient, settings: CoordinationSettings) -> int | None:
    """The partitions of the control topic, or None when it does not exist yet."""
    if settings.topic not in set(await admin.list_topics()):
        return None
    described = await admin.describe_topics([settings.topic])
    return len(described[0]["partitions"]) if described else 0


def partitions_problem(settings: CoordinationSettings, partitions: int | None) -> str | None:
    """Why a control topic with `partitions` cannot serve `coordination.shards` shards, or None."""
    if partitions is None or partitions == settings.shards:
        return None
    return (
        f"coordination.topic {settings.topic!r} has {partitions} partitions, coordination.shards is "
        f"{settings.shards}: they must be equal (a new topic, or the same shards)"
    )


class ShardGroup(Protocol):
    """Which shards this process owns, as a stream of plans, and the handover markers."""

    plans: asyncio.Queue[MemberPlan]

    async def start(self) -> None:
        """Join (raises CoordinationUnavailable when the group cannot be used)."""

    async def leave(self) -> None:
        """Rejoin as leaving, so that the others take the shards through handovers (a SIGTERM's first step)."""

    async def rejoin(self) -> None:
        """Rejoin, so that a fresh plan says which shards are this member's (after a stall of the event loop)."""

    async def stop(self) -> None:
        """Leave the group."""

    async def publish_release(self, marker: ReleaseMarker) -> None:
        """Write a release marker (raises CoordinationUnavailable when Kafka does not take it)."""

    async def wait_release(self, shard: int, token: str) -> ReleaseMarker:
        """The giver's marker with `token` (the caller bounds the wait)."""

    async def publish_subscribed(self, marker: SubscribedMarker) -> None:
        """Write a subscribed marker (raises CoordinationUnavailable when Kafka does not take it)."""

    async def wait_subscribed(self, shard: int, token: str) -> SubscribedMarker:
        """The taker's marker with `token` (the caller bounds the wait)."""


@dataclass
class SoleOwner:
    """The group of one: this process owns every shard from the start, and hands nothing over."""

    shards: int
    plans: asyncio.Queue[MemberPlan] = field(default_factory=asyncio.Queue)

    async def start(self) -> None:
        """Own everything."""
        self.plans.put_nowait(MemberPlan(frozenset(range(self.shards))))

    async def leave(self) -> None:
        """Nobody to hand over to."""

    async def stop(self) -> None:
        """Nothing to leave."""

    async def rejoin(self) -> None:
        """A group of one: its plan stands."""
        self.plans.put_nowait(MemberPlan(frozenset(range(self.shards))))

    async def publish_release(self, marker: ReleaseMarker) -> None:
        """Nobody reads it."""

    async def wait_release(self, shard: int, token: str) -> ReleaseMarker:
        """There are no handovers in a group of one: nothing ever comes."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def publish_subscribed(self, marker: SubscribedMarker) -> None:
        """Nobody reads it."""

    async def wait_subscribed(self, shard: int, token: str) -> SubscribedMarker:
        """There are no handovers in a group of one: nothing ever comes."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class ShardAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """The group protocol's assignor: claims from `claim()` in the join, bridge/shards.py's plan as the leader."""

    name = "ime-bridge-shards"
    version = 0

    def __init__(self, topic: str, shards: int, claim: Callable[[], MemberClaim]) -> None:
        self.topic = topic
        self.shards = shards
        self.claim = claim
        self.plan = MemberPlan(frozenset())

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        """This member's join: its topics and its claim."""
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), self.claim().encode())

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """As the leader: every member's shards and handovers."""
        claims = {member: MemberClaim.decode(metadata.user_data) for member, metadata in members.items()}
        plans = assign_shards(self.shards, claims, lambda: uuid.uuid4().hex[:16])
        log_event(
            logger,
            logging.INFO,
            "shards_assigned",
            members=len(plans),
            handovers=sum(len(plan.acquire) for plan in plans.values()),
        )
        return {
            member: ConsumerProtocolMemberAssignment(self.version, [(self.topic, plan.partitions)], plan.encode())
            for member, plan in plans.items()
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        """This member's plan, read before the listener hears of the partitions."""
        assigned = [shard for topic, partitions in assignment.assignment for shard in partitions if topic == self.topic]
        self.plan = MemberPlan.decode(assigned, assignment.user_data)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assigned: Callable[[], None]) -> None:
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Eager rebalancing revokes everything every time: the plan that follows says what really moves.
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._on_assigned()


class KafkaShardGroup:
    """A member of `coordination.group_id`; see the module docstring."""

    def __init__(
        self,
        settings: CoordinationSettings,
        kafka: KafkaSettings,
        metrics: Metrics,
        claim: Callable[[], MemberClaim],
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._kafka = kafka
        self._claim = claim
        self._leaving = False
        self.assignor = ShardAssignor(settings.topic, settings.shards, self._current_claim)
        self.plans: asyncio.Queue[MemberPlan] = asyncio.Queue()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._waiting: dict[tuple[type[Marker], str], asyncio.Future[Marker]] = {}
        self._early: OrderedDict[tuple[type[Marker], str], Marker] = OrderedDict()
        self._reader: asyncio.Task[None] | None = None

    def _current_claim(self) -> MemberClaim:
        claim = self._claim()
        return MemberClaim(claim.owned, leaving=self._leaving, epoch=claim.epoch, confirms=claim.confirms)

    async def start(self) -> None:
        """Make sure the control topic exists with one partition per shard, then join. Once joined, a no-op:
        the keeper's task, restarted by its supervisor after a failure, calls it again."""
        if self._consumer is not None:
            return
        settings = self._settings
        try:
            await self._ensure_topic()
            options = client_options(self._kafka)
            self._producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=False)
            await self._producer.start()
            # A member must rejoin within this: ours do at once (the listener only queues the plan).
            rebalance_timeout_ms = max(settings.session_timeout_ms, int(settings.handover_timeout_seconds * 1000))
            # A JoinGroup answer can take the whole rebalance: no request may time out before it.
            options["request_timeout_ms"] = max(options["request_timeout_ms"], rebalance_timeout_ms + 5000)
            self._consumer = AIOKafkaConsumer(
                **options,
                group_id=settings.group_id,
                partition_assignment_strategy=(self.assignor,),
                session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                rebalance_timeout_ms=rebalance_timeout_ms,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await self._consumer.start()
        except KafkaError as exc:
            await self.stop()
            raise CoordinationUnavailable(f"cannot join group {settings.group_id!r}: {exc!r}") from exc
        self._consumer.subscribe([settings.topic], listener=_Listener(self._assigned))
        reader = supervised("coordination", self._read_markers, metrics=self._metrics)
        self._reader = asyncio.create_task(reader, name="coordination")

    async def _ensure_topic(self) -> None:
        settings = self._settings
        admin = AIOKafkaAdminClient(**client_options(self._kafka))
        try:
            await admin.start()
            partitions = await control_topic_partitions(admin, settings)
            if partitions is None:
                topic = NewTopic(
                    settings.topic, settings.shards, self._kafka.replication_factor, topic_configs=CONTROL_TOPIC_CONFIG
                )
                try:
                    await create_topics(admin, [topic])
                except SinkUnavailable as exc:
                    raise CoordinationUnavailable(str(exc)) from exc
                partitions = await control_topic_partitions(admin, settings)  # ours, or a faster replica's
            problem = partitions_problem(settings, partitions)
            if problem is not None:
                raise CoordinationUnavailable(problem)
        finally:
            await admin.close()

    def _assigned(self) -> None:
        self.plans.put_nowait(self.assignor.plan)

    async def _read_markers(self) -> None:
        """Read the assigned partitions (this also keeps the member polling); hand markers to their waiters."""
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:
                log_event(logger, logging.WARNING, "coordination_read_failed", error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    marker = read_marker(record.value)
                    if marker is not None:
                        self._arrived(marker)

    def _arrived(self, marker: Marker) -> None:
        key = (type(marker), marker.token)
        waiter = self._waiting.pop(key, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(marker)
            return
        self._early[key] = marker
        while len(self._early) > _EARLY_MARKERS:
            self._early.popitem(last=False)

    async def _wait_marker(self, kind: type[_Kind], token: str) -> _Kind:
        """The marker of `kind` with `token`: one read already, else the next one read."""
        key = (kind, token)
        marker = self._early.pop(key, None)
        if marker is None:
            waiter: asyncio.Future[Marker] = asyncio.get_running_loop().create_future()
            self._waiting[key] = waiter
            try:
                marker = await waiter
            finally:
                self._waiting.pop(key, None)
        assert isinstance(marker, kind)  # stored under its own kind
        return marker

    async def _publish_marker(self, marker: Marker) -> None:
        """Write `marker` to its shard's partition, acknowledged by all in-sync replicas."""
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                self._settings.topic, marker.encode(), key=str(marker.shard).encode(), partition=marker.shard
            )
        except KafkaError as exc:
            what = "release" if isinstance(marker, ReleaseMarker) else "subscription"
            raise CoordinationUnavailable(f"cannot write the {what} of shard {marker.shard}: {exc!r}") from exc

    async def wait_release(self, shard: int, token: str) -> ReleaseMarker:
        """The giver's marker with `token` (the caller bounds the wait)."""
        return await self._wait_marker(ReleaseMarker, token)

    async def publish_release(self, marker: ReleaseMarker) -> None:
        """Write `marker` (the taker reads its shard's partition)."""
        await self._publish_marker(marker)

    async def wait_subscribed(self, shard: int, token: str) -> SubscribedMarker:
        """The taker's marker with `token` (the caller bounds the wait)."""
        return await self._wait_marker(SubscribedMarker, token)

    async def publish_subscribed(self, marker: SubscribedMarker) -> None:
        """Write `marker` (the giver is assigned the shard's partition until its release)."""
        await self._publish_marker(marker)

    async def leave(self) -> None:
        """Rejoin as leaving: the leader gives this member nothing, and the others take its shards by handover."""
        self._leaving = True
        await self.rejoin()

    async def rejoin(self) -> None:
        """Rejoin with the claim read afresh (an expelled member joins anew): a fresh plan follows."""
        if self._consumer is None:
            return
        # A new subscription (to the same topic) makes the member rejoin.
        self._consumer.subscribe([self._settings.topic], listener=_Listener(self._assigned))

    async def stop(self) -> None:
        """Leave the group and close the clients."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(KafkaError, OSError):
                    await client.stop()
        self._consumer = self._producer = None
