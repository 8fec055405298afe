"""Handovers, in memory: the taker holds a shard's updates until the giver's marker and drops what it repeats;
the markers, claims and plans read back whatever bytes the control topic holds."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from bridge.buffer import DeliveryBuffer
from bridge.config import BufferSettings
from bridge.coordination import ReleaseMarker
from bridge.encode import load_schema
from bridge.intake import Intake, snapshot_fingerprint
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory, ContractUpdate, Normalizer
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.shards import MemberClaim, MemberPlan

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


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_on_the_control_topic_read_as_a_marker_a_claim_and_a_plan_or_as_nothing(value: bytes) -> None:
    marker = ReleaseMarker.decode(value)
    assert marker is None or isinstance(marker, ReleaseMarker)
    assert isinstance(MemberClaim.decode(value), MemberClaim)
    assert MemberPlan.decode({1}, value).shards == frozenset({1})


@given(
    st.dictionaries(
        st.sampled_from(["shard", "token", "last", "owned", "leaving", "acquire", "release"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3)
        ),
    )
)
def test_json_of_the_wrong_shape_reads_as_nothing_rather_than_raising(document: dict[str, object]) -> None:
    value = json.dumps(document).encode()
    ReleaseMarker.decode(value)
    MemberClaim.decode(value)
    MemberPlan.decode(set(), value)
