"""Handovers, in memory: the taker holds a shard's updates until the giver's marker and drops what it repeats;
the markers, claims and plans read back whatever bytes the control topic holds."""

from __future__ import annotations

import asyncio
import json
import time

from hypothesis import given
from hypothesis import strategies as st

from bridge.buffer import DeliveryBuffer
from bridge.config import BufferSettings, CoordinationSettings
from bridge.coordination import ReleaseMarker, SubscribedMarker, read_marker
from bridge.encode import load_schema
from bridge.handover import ShardKeeper
from bridge.intake import Intake, snapshot_fingerprint
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory, ContractUpdate, Normalizer
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.publisher import Publisher
from bridge.records import MemorySink
from bridge.shards import MemberClaim, MemberPlan
from bridge.subscriptions import SubscriptionManager
from tests.support.harness import ime_settings
from tests.support.waiting import wait_for

TAKER = ConnectionInfo(Subscription("id-s3-0", Endpoint.ID, ("1001", "1002"), "s3"), attempt=1)


def snapshot(contract_id: str, second: int, open_interest: int = 7) -> str:
    return json.dumps(
        {
            "channel": "IME Stream",
            "contractId": contract_id,
            "timestamp": f"2026-05-29T12:00:{second:02d}Z",
            "data": {"ContractInfo": {"open_interest": open_interest, "open_interest_changes": 0}},
        }
    )


def make_intake() -> Intake:
    metrics = Metrics()
    settings = BufferSettings()
    return Intake(
        normalizer=Normalizer(session_id="taker", contracts=ContractDirectory()),
        buffer=DeliveryBuffer(settings, metrics=metrics),
        metrics=metrics,
        schema=load_schema(),
        max_frame_bytes=10_000,
        suppress_duplicates=False,
        dead_letter_raw_bytes=1024,
    )


def giver_last(second: int, open_interest: int = 7) -> tuple[int, int]:
    """What the giver's marker says of the snapshot of `second` it published last."""
    giver = make_intake()
    giver.on_frame(snapshot("1001", second, open_interest), 1, TAKER)
    return giver.last_published(["1001"])["1001"]


async def test_held_updates_wait_for_the_release_and_what_the_giver_published_is_dropped() -> None:
    intake = make_intake()
    intake.hold(["1001"])
    for second in (1, 2, 3, 4):
        intake.on_frame(snapshot("1001", second), second, TAKER)
    intake.on_frame(snapshot("1002", 1), 5, TAKER)  # not taken over: flows at once
    assert [record.key for record in (await intake.buffer.take(100)).records] == [b"1002"]

    queued, dropped = intake.release(["1001"], {"1001": giver_last(2)})

    assert (queued, dropped) == (2, 2)  # 1 is older than the giver's last, 2 is the giver's last
    taken = [entry.update for entry in (await intake.buffer.take(100)).entries]
    assert all(isinstance(update, ContractUpdate) for update in taken)
    assert [(u.exchange_time % 60_000_000 // 1_000_000, u.sequence, u.first_after_subscribe) for u in taken if u] == [
        (3, 1, True),  # the first published after the takeover carries the flag of the first received
        (4, 2, False),
    ]
    intake.on_frame(snapshot("1001", 5), 6, TAKER)
    assert len((await intake.buffer.take(100)).records) == 1, "released: no longer held"


async def test_a_different_snapshot_at_the_givers_last_time_is_kept_and_no_marker_keeps_everything() -> None:
    intake = make_intake()
    intake.hold(["1001", "1002"])
    intake.on_frame(snapshot("1001", 2, open_interest=8), 1, TAKER)
    intake.on_frame(snapshot("1002", 2), 2, TAKER)
    assert intake.release(["1001"], {"1001": giver_last(2, open_interest=7)}) == (1, 0)
    assert intake.release(["1002"], {}) == (1, 0), "a giver that wrote no marker (timeout): nothing dropped"


def test_snapshots_sharing_the_givers_last_time_are_told_apart_by_their_order() -> None:
    """Two changes in one tick share an exchange time: what came before the giver's last was published too
    (the CI failure of 2026-12-07: the first of two same-time snapshots went out again after the second)."""
    giver = make_intake()
    for open_interest in (7, 8):
        giver.on_frame(snapshot("1001", 2, open_interest), 1, TAKER)
    taker = make_intake()
    taker.hold(["1001"])
    for open_interest in (7, 8, 9):
        taker.on_frame(snapshot("1001", 2, open_interest), 1, TAKER)
    assert taker.release(["1001"], giver.last_published(["1001"])) == (1, 2)


@given(
    ticks=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=12),
    data=st.data(),
)
def test_the_taker_publishes_exactly_what_follows_the_givers_last(ticks: list[int], data: st.DataObject) -> None:
    """Whatever the exchange times (ticks of one to three changes), wherever the taker's subscription began
    (at most one past the giver's last: it subscribed before the giver stopped), and whatever the giver's last."""
    market = [(second, change) for second, changes in enumerate(ticks) for change in range(changes)]
    given_last = data.draw(st.integers(min_value=0, max_value=len(market) - 1), label="giver's last")
    subscribed = data.draw(st.integers(min_value=0, max_value=given_last + 1), label="taker's first")
    giver, taker = make_intake(), make_intake()
    taker.hold(["1001"])
    for position, (second, change) in enumerate(market):
        frame = snapshot("1001", second, open_interest=100 * second + change)
        if position <= given_last:
            giver.on_frame(frame, position, TAKER)
        if position >= subscribed:
            taker.on_frame(frame, position, TAKER)
    queued, dropped = taker.release(["1001"], giver.last_published(["1001"]))
    assert (queued, dropped) == (len(market) - given_last - 1, given_last + 1 - subscribed)


async def test_the_last_published_fingerprint_is_that_of_the_snapshot() -> None:
    intake = make_intake()
    intake.on_frame(snapshot("1001", 9), 1, TAKER)
    (entry,) = (await intake.buffer.take(10)).entries
    assert entry.update is not None
    assert intake.last_published(["1001", "1002"]) == {
        "1001": (entry.update.exchange_time, snapshot_fingerprint(entry.update))
    }


def test_markers_read_back() -> None:
    marker = ReleaseMarker(5, "abc", {"1001": (1_700_000_000_000_000, 12345)})
    assert ReleaseMarker.decode(marker.encode()) == marker
    assert read_marker(marker.encode()) == marker
    subscribed = SubscribedMarker(5, "abc")
    assert read_marker(subscribed.encode()) == subscribed
    assert ReleaseMarker.decode(subscribed.encode()) is None, "an earlier version reads it as nothing"


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_on_the_control_topic_read_as_a_marker_a_claim_and_a_plan_or_as_nothing(value: bytes) -> None:
    marker = read_marker(value)
    assert marker is None or isinstance(marker, ReleaseMarker | SubscribedMarker)
    assert isinstance(MemberClaim.decode(value), MemberClaim)
    assert MemberPlan.decode({1}, value).shards == frozenset({1})


@given(
    st.dictionaries(
        st.sampled_from(
            ["shard", "token", "last", "subscribed", "owned", "leaving", "confirms", "acquire", "release", "confirmed"]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3)
        ),
    )
)
def test_json_of_the_wrong_shape_reads_as_nothing_rather_than_raising(document: dict[str, object]) -> None:
    value = json.dumps(document).encode()
    read_marker(value)
    MemberClaim.decode(value)
    MemberPlan.decode(set(), value)


class FakeSource:
    """What the manager and the keeper ask of the source: the subscriptions kept, a new plan to keep, whether a
    shard's connections are open (all are, unless `connecting` names the shard's group)."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []
        self.connecting: set[str] = set()
        self.opened: list[str] = []

    def streaming(self, group: str) -> bool:
        return group not in self.connecting

    async def apply(self, plan: list[Subscription]) -> set[str]:
        opened = {s.name for s in plan} - {s.name for s in self.subscriptions}
        self.subscriptions = list(plan)
        self.opened += sorted(opened)
        return opened


class FakeGroup:
    """A ShardGroup whose plans and markers the test hands over."""

    def __init__(self) -> None:
        self.plans: asyncio.Queue[MemberPlan] = asyncio.Queue()
        self.released: list[ReleaseMarker] = []
        self.subscribed: list[SubscribedMarker] = []
        self.markers: dict[str, asyncio.Future[ReleaseMarker]] = {}
        self.subscriptions: dict[str, asyncio.Future[SubscribedMarker]] = {}
        self.rejoined = 0

    async def start(self) -> None:
        pass

    async def leave(self) -> None:
        self.plans.put_nowait(MemberPlan(frozenset(), release=dict.fromkeys(range(SHARDS), "bye")))

    async def stop(self) -> None:
        pass

    async def publish_release(self, marker: ReleaseMarker) -> None:
        self.released.append(marker)

    async def wait_release(self, shard: int, token: str) -> ReleaseMarker:
        return await self.markers.setdefault(token, asyncio.get_running_loop().create_future())

    async def publish_subscribed(self, marker: SubscribedMarker) -> None:
        self.subscribed.append(marker)

    async def rejoin(self) -> None:
        self.rejoined += 1

    async def wait_subscribed(self, shard: int, token: str) -> SubscribedMarker:
        return await self.subscriptions.setdefault(token, asyncio.get_running_loop().create_future())


SHARDS = 4  # with 4 shards: 1005 → 0, 1001 → 1, 1004 → 2, 1002 → 3


def make_keeper(contract_ids: list[str], timeout: float = 5) -> tuple[ShardKeeper, FakeGroup, FakeSource]:
    intake = make_intake()
    metrics = intake.metrics
    source = FakeSource()
    manager = SubscriptionManager(
        ime_settings("http://127.0.0.1:9", contract_ids=contract_ids),
        None,
        source,
        metrics,
    )
    group = FakeGroup()
    keeper = ShardKeeper(
        CoordinationSettings(group_id="g", shards=SHARDS, handover_timeout_seconds=timeout),
        group,
        manager,
        intake,
        intake.buffer,
        Publisher(intake.buffer, MemorySink(), metrics, max_batch_records=100),
        metrics,
    )
    return keeper, group, source


async def test_the_keeper_subscribes_its_shards_releases_after_delivery_and_takes_over_after_the_marker() -> None:
    keeper, group, source = make_keeper(["1001", "1002", "1004", "1005"])
    keeper.joined = True
    await keeper.apply(MemberPlan(frozenset({0, 1})))
    assert sorted((s.name, s.contracts) for s in source.subscriptions) == [
        ("id-s0-0", ("1005",)),
        ("id-s1-0", ("1001",)),
    ]
    assert keeper.metrics.registry.get_sample_value("ime_bridge_owned_shards") == 2

    # Shard 1 goes (token "t1") and shard 3 comes from a live member (token "t3"); a record of 1001 is pending.
    keeper.intake.on_frame(snapshot("1001", 1), 1, ConnectionInfo(source.subscriptions[1], 1))
    handover = asyncio.create_task(keeper.apply(MemberPlan(frozenset({0, 3}), {3: "t3"}, {1: "t1"})))
    await wait_for(
        lambda: sorted(s.name for s in source.subscriptions) == ["id-s0-0", "id-s3-0"], what="1001's connection closed"
    )
    assert not group.released, "not before 1001's record is acknowledged"
    taken = await keeper.intake.buffer.take(10)
    keeper.intake.buffer.settle(taken, [True])
    await wait_for(lambda: bool(group.released), within=5, what="the release marker")
    assert [(m.shard, m.token, list(m.last)) for m in group.released] == [(1, "t1", ["1001"])]

    keeper.intake.on_frame(snapshot("1002", 4), 2, ConnectionInfo(source.subscriptions[1], 1))
    assert len(keeper.intake.buffer) == 0, "held until the giver's marker"
    group.markers["t3"].set_result(ReleaseMarker(3, "t3", {}))
    await handover
    assert len(keeper.intake.buffer) == 1
    assert not keeper.serves_nothing()


async def test_a_confirmed_handover_serves_on_until_the_taker_has_subscribed() -> None:
    keeper, group, source = make_keeper(["1001", "1002", "1004", "1005"])
    await keeper.apply(MemberPlan(frozenset({0, 1})))
    # Shard 1 goes to a member that confirms; shard 3 comes from one, its connection not open yet.
    source.connecting.add("s3")
    plan = MemberPlan(frozenset({0, 3}), {3: "t3"}, {1: "t1"}, confirmed=frozenset({1}))
    handover = asyncio.create_task(keeper.apply(plan))
    await wait_for(lambda: "id-s3-0" in {s.name for s in source.subscriptions}, what="shard 3's connection")
    await asyncio.sleep(0.1)
    assert "id-s1-0" in {s.name for s in source.subscriptions}, "shard 1 served until its taker subscribed"
    assert keeper.claim().owned == frozenset({0, 3}), "the claim is the plan's shards"
    assert not group.subscribed, "shard 3's connection is not open yet"
    keeper.intake.on_frame(snapshot("1001", 1), 1, ConnectionInfo(source.subscriptions[1], 1))
    assert len(keeper.intake.buffer) == 1, "still published by this member"

    source.connecting.clear()
    await wait_for(lambda: bool(group.subscribed), what="the subscribed marker of shard 3")
    assert group.subscribed == [SubscribedMarker(3, "t3")]
    group.subscriptions["t1"].set_result(SubscribedMarker(1, "t1"))
    missing = keeper.metrics.registry.get_sample_value
    assert missing("ime_bridge_handover_markers_missing_total", {"marker": "subscribed"}) == 0
    await wait_for(lambda: "id-s1-0" not in {s.name for s in source.subscriptions}, what="shard 1's connection closed")
    keeper.intake.buffer.settle(await keeper.intake.buffer.take(10), [True])
    await wait_for(lambda: bool(group.released), within=5, what="the release marker")
    assert [(m.shard, m.token, list(m.last)) for m in group.released] == [(1, "t1", ["1001"])]
    group.markers["t3"].set_result(ReleaseMarker(3, "t3", {}))
    await handover


async def test_markers_that_never_come_end_each_step_at_the_timeout_and_are_counted() -> None:
    keeper, group, source = make_keeper(["1001", "1002", "1004", "1005"], timeout=0.2)
    await keeper.apply(MemberPlan(frozenset({0, 1})))
    plan = MemberPlan(frozenset({0, 3}), {3: "t3"}, {1: "t1"}, confirmed=frozenset({1}))
    await asyncio.wait_for(keeper.apply(plan), 5)  # neither the taker of 1 nor the giver of 3 says anything
    assert sorted(s.name for s in source.subscriptions) == ["id-s0-0", "id-s3-0"]
    assert [(m.shard, m.token) for m in group.released] == [(1, "t1")], "released after the timeout anyway"
    missing = keeper.metrics.registry.get_sample_value
    assert missing("ime_bridge_handover_markers_missing_total", {"marker": "subscribed"}) == 1
    assert missing("ime_bridge_handover_markers_missing_total", {"marker": "release"}) == 1


async def test_after_a_stall_publishing_waits_for_a_plan_and_what_another_member_served_meanwhile_is_dropped() -> None:
    """A stall longer than the session timeout (less a heartbeat) may have got this member expelled, and its
    shards served by another: its records of them must not follow that member's (A, B, A)."""
    keeper, group, source = make_keeper(["1001", "1002", "1004", "1005"])
    sink = MemorySink()
    publisher = Publisher(keeper.intake.buffer, sink, keeper.metrics, max_batch_records=100)
    keeper.publisher = publisher
    publisher.gate, publisher.stale = keeper.ownership_confirmed, keeper.stale
    await keeper.apply(MemberPlan(frozenset({0, 1})))
    running = asyncio.create_task(publisher.run())
    try:
        keeper._watching, keeper._last_tick = True, keeper._last_tick - 60  # the loop did not run for a minute
        keeper.intake.on_frame(snapshot("1001", 1), 1, ConnectionInfo(source.subscriptions[1], 1))  # shard 1
        keeper.intake.on_frame(snapshot("1005", 1), 2, ConnectionInfo(source.subscriptions[0], 1))  # shard 0
        await wait_for(lambda: group.rejoined == 1, what="a rejoin")
        await asyncio.sleep(0.1)
        assert not sink.records, "nothing published before the group answers"
        # The fresh plan: shard 1 was served by another member meanwhile, and stays with it.
        await keeper.apply(MemberPlan(frozenset({0}), release={1: "t1"}, superseded=frozenset({1})))
        await wait_for(lambda: len(sink.records) == 1, what="the record of shard 0")
        assert [record.key for record in sink.records] == [b"1005"]
        assert keeper.metrics.registry.get_sample_value("ime_bridge_stale_records_dropped_total") == 1
        assert keeper.metrics.registry.get_sample_value("ime_bridge_event_loop_stalls_total") == 1
        assert len(keeper.intake.buffer) == 0, "the stale record is settled, not sent again"
    finally:
        running.cancel()


async def test_what_a_superseded_shard_delivers_after_the_plan_until_its_connection_closes_is_stale() -> None:
    """The plan that says another member served a shard meanwhile, and keeps it, comes before this member's
    connection of that shard has closed: a frame received in between must not follow that member's records."""
    keeper, _, source = make_keeper(["1001", "1002", "1004", "1005"])
    await keeper.apply(MemberPlan(frozenset({0, 1})))
    shard_1 = ConnectionInfo(source.subscriptions[1], 1)
    await keeper.apply(MemberPlan(frozenset({0}), release={1: "t1"}, superseded=frozenset({1})))
    now_us = time.time_ns() // 1000
    keeper.intake.on_frame(snapshot("1001", 7), now_us, shard_1)  # received after the plan
    keeper.intake.on_frame(snapshot("1005", 7), now_us, ConnectionInfo(source.subscriptions[0], 1))
    stale = keeper.stale()
    assert stale is not None
    taken = (await keeper.intake.buffer.take(10)).records
    assert [(record.key, stale(record)) for record in taken] == [(b"1001", True), (b"1005", False)]


async def test_a_shard_kept_while_expelled_and_given_back_comes_by_handover() -> None:
    keeper, group, source = make_keeper(["1001", "1002", "1004", "1005"])
    await keeper.apply(MemberPlan(frozenset({0, 1})))
    plan = MemberPlan(frozenset({0, 1}), acquire={1: "t1"}, superseded=frozenset({1}))
    handover = asyncio.create_task(keeper.apply(plan))
    await wait_for(lambda: bool(group.subscribed), what="the subscribed marker of shard 1")
    assert source.opened.count("id-s1-0") == 2, "reopened: its frames from before the stall stay behind"
    now_us = time.time_ns() // 1000
    keeper.intake.on_frame(snapshot("1001", 5), now_us, ConnectionInfo(source.subscriptions[1], 1))
    assert len(keeper.intake.buffer) == 0, "held until the member that served it meanwhile releases it"
    group.markers["t1"].set_result(ReleaseMarker(1, "t1", {}))
    await handover
    assert len(keeper.intake.buffer) == 1
    stale = keeper.stale()
    assert stale is not None
    assert not any(stale(record) for record in (await keeper.intake.buffer.take(10)).records), "received after"


async def test_a_replica_owning_no_configured_contract_serves_nothing_and_leaving_hands_everything_over() -> None:
    keeper, group, source = make_keeper(["1005"])  # shard 0 only
    assert not keeper.serves_nothing(), "not before it joined"
    keeper.joined = True
    await keeper.apply(MemberPlan(frozenset({2, 3})))
    assert keeper.serves_nothing()
    assert keeper.status()["serves_nothing"] is True
    await keeper.apply(MemberPlan(frozenset({0})))
    assert source.subscriptions
    runner = asyncio.create_task(keeper.run())
    await asyncio.wait_for(keeper.leave(), 5)
    runner.cancel()
    assert not source.subscriptions
    assert [(m.shard, m.token) for m in group.released] == [(0, "bye")]
