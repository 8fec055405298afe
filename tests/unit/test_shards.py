"""Shards and the group leader's assignment (bridge/shards.py): pure, so tested by feeding it claims."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from bridge.shards import MemberClaim, MemberPlan, assign_shards, shard_of


def assign(shards: int, claims: dict[str, MemberClaim]) -> dict[str, MemberPlan]:
    counter = itertools.count()
    return assign_shards(shards, claims, lambda: f"t{next(counter)}")


def test_shard_of_is_stable_and_spreads() -> None:
    assert shard_of("1001", 64) == 1  # crc32: the same in every process and version (a change moves contracts)
    counts = [0] * 8
    for contract in range(1000, 1480):
        counts[shard_of(str(contract), 8)] += 1
    assert min(counts) > 30, counts


def test_a_fourth_member_takes_a_quarter_and_nothing_else_moves() -> None:
    three = assign(12, {m: MemberClaim() for m in "abc"})
    assert sorted(len(plan.shards) for plan in three.values()) == [4, 4, 4]
    assert all(not plan.acquire and not plan.release for plan in three.values()), "nobody owned anything: no handover"
    claims = {m: MemberClaim(plan.shards) for m, plan in three.items()} | {"d": MemberClaim()}
    four = assign(12, claims)
    assert sorted(len(plan.shards) for plan in four.values()) == [3, 3, 3, 3]
    for member in "abc":
        assert four[member].shards <= three[member].shards, "the old members only give"
        assert set(four[member].release) == three[member].shards - four[member].shards
    assert set(four["d"].acquire) == four["d"].shards
    given_tokens = {token for m in "abc" for token in four[m].release.values()}
    assert set(four["d"].acquire.values()) == given_tokens


def test_a_leaving_member_hands_everything_over_and_the_dead_hand_over_nothing() -> None:
    claims = {"a": MemberClaim(frozenset({0, 1, 2})), "b": MemberClaim(frozenset({3, 4, 5}), leaving=True)}
    plans = assign(6, claims)
    assert plans["b"].shards == frozenset()
    assert set(plans["b"].release) == {3, 4, 5}
    assert plans["a"].shards == frozenset(range(6))
    assert plans["a"].acquire == plans["b"].release
    # b was killed instead: its shards have no live claimant, a starts them without waiting
    alone = assign(6, {"a": MemberClaim(frozenset({0, 1, 2}))})
    assert alone["a"].shards == frozenset(range(6))
    assert not alone["a"].acquire


def test_an_expelled_member_that_rejoins_releases_what_went_on_without_it() -> None:
    # a was paused past the session timeout; b took shard 0 in epoch 5; a comes back claiming it from epoch 4
    plans = assign(2, {"a": MemberClaim(frozenset({0, 1}), epoch=4), "b": MemberClaim(frozenset({0}), epoch=5)})
    assert 0 in plans["b"].shards
    assert 0 not in plans["a"].shards
    assert 0 in plans["a"].release, "a stops"
    assert 0 not in plans["b"].acquire, "b goes on serving it without waiting"
    assert MemberPlan.decode(plans["a"].partitions, plans["a"].encode()) == plans["a"]
    assert plans["a"].superseded == frozenset({0}), "what a still holds of shard 0 is stale: dropped"
    # b took both while a was away: a is given one back, by handover from b, and drops what it held of both.
    plans = assign(2, {"a": MemberClaim(frozenset({0, 1}), epoch=4), "b": MemberClaim(frozenset({0, 1}), epoch=5)})
    (back,) = plans["a"].shards
    assert plans["a"].acquire == {back: plans["b"].release[back]}
    assert plans["a"].superseded == frozenset({0, 1})
    assert set(plans["a"].release) == {0, 1} - {back}
    assert {plan.epoch for plan in plans.values()} == {6}


def test_a_handover_between_members_that_confirm_is_confirmed_and_the_giver_reads_its_partition() -> None:
    new = {m: MemberClaim(frozenset(range(4 * n, 4 * n + 4)), confirms=True) for n, m in enumerate("ab")}
    plans = assign(8, new | {"c": MemberClaim(confirms=True)})
    for giver in "ab":
        assert plans[giver].confirmed == frozenset(plans[giver].release), "every handover to c is confirmed"
        assert plans[giver].partitions == sorted(plans[giver].shards | set(plans[giver].release))
        decoded = MemberPlan.decode(plans[giver].partitions, plans[giver].encode())
        assert decoded == plans[giver], "the partitions of confirmed releases are not shards"
    # A member of an earlier version takes over (or gives) without confirming: nobody waits for it.
    mixed = assign(8, new | {"c": MemberClaim()})
    assert all(not plan.confirmed for plan in mixed.values())
    assert all(plan.partitions == sorted(plan.shards) for plan in mixed.values())


def test_plans_and_claims_read_back_and_garbage_reads_as_nothing() -> None:
    plan = MemberPlan(frozenset({1, 2}), {1: "x"}, {7: "y"}, epoch=3)
    assert MemberPlan.decode({1, 2}, plan.encode()) == plan
    confirming = MemberPlan(frozenset({1, 2}), {}, {7: "y"}, epoch=3, confirmed=frozenset({7}))
    assert MemberPlan.decode({1, 2, 7}, confirming.encode()) == confirming
    claim = MemberClaim(frozenset({3}), leaving=True, epoch=9, confirms=True)
    assert MemberClaim.decode(claim.encode()) == claim
    assert MemberClaim.decode(b'{"owned": [3], "epoch": 9}').confirms is False, "an earlier version's claim"
    for garbage in (b"", b"\xff", b"[]", b'{"owned": "x"}', b'{"acquire": 3}', b"null"):
        assert MemberClaim.decode(garbage).owned == frozenset()
        assert MemberPlan.decode({0}, garbage) == MemberPlan(frozenset({0}))


@given(
    shards=st.integers(1, 40),
    claims=st.dictionaries(
        st.text("abcdef", min_size=1, max_size=3),
        st.builds(
            MemberClaim,
            st.frozensets(st.integers(-2, 45), max_size=12),
            st.booleans(),
            st.integers(0, 3),
            st.booleans(),
        ),
        max_size=6,
    ),
)
def test_every_shard_has_exactly_one_staying_owner_and_shares_differ_by_at_most_one(
    shards: int, claims: dict[str, MemberClaim]
) -> None:
    plans = assign(shards, claims)
    assert set(plans) == set(claims)
    staying = [m for m, claim in claims.items() if not claim.leaving]
    owned = [shard for m in staying for shard in plans[m].shards]
    if staying:
        assert sorted(owned) == list(range(shards))
        sizes = [len(plans[m].shards) for m in staying]
        assert max(sizes) - min(sizes) <= 1
    for member, claim in claims.items():
        if claim.leaving:
            assert not plans[member].shards
        for shard, token in plans[member].acquire.items():
            assert shard in plans[member].shards
            assert any(plans[giver].release.get(shard) == token for giver in claims if giver != member)
        assert plans[member].confirmed <= set(plans[member].release) - plans[member].shards
        assert not plans[member].confirmed & plans[member].superseded
        for shard in plans[member].superseded:
            assert shard in plans[member].acquire or shard in plans[member].release, "comes by handover, or goes"
        assert not set(plans[member].acquire) & set(plans[member].release)
        assert not plans[member].confirmed or claim.confirms
    # A member keeps the shards it wins (it claims them from the latest epoch) up to its share
    for member in staying:
        valid = {s for s in claims[member].owned if 0 <= s < shards}
        won = {
            s
            for s in valid
            if min((m for m in claims if s in claims[m].owned), key=lambda m: (-claims[m].epoch, m)) == member
        }
        assert len(plans[member].shards & won) == min(len(won), len(plans[member].shards))
    assert all(plan.epoch > claim.epoch for plan in plans.values() for claim in claims.values())
