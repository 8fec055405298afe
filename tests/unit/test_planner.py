"""planner: contracts split into connections by count and URL length."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import pytest

from bridge.planner import find_invalid, plan_subscriptions, replan
from bridge.protocol import Endpoint

WS = "wss://core.hedgetech.ir"


def test_ids_and_names_get_their_own_connections() -> None:
    plan = plan_subscriptions(WS, ["1", "2", "3"], ["GC1405"], max_contracts=2, max_url_length=4000)
    assert [(s.name, s.endpoint, s.contracts) for s in plan] == [
        ("id-0", Endpoint.ID, ("1", "2")),
        ("id-1", Endpoint.ID, ("3",)),
        ("name-0", Endpoint.NAME, ("GC1405",)),
    ]


def test_every_url_respects_the_limit_and_every_contract_is_planned_once() -> None:
    ids = [str(100_000 + n) for n in range(500)]
    plan = plan_subscriptions(WS, ids, [], max_contracts=100, max_url_length=600)
    assert all(len(s.url(WS)) <= 600 for s in plan)
    assert [c for s in plan for c in s.contracts] == ids
    # Connections are filled: all but the last are within one contract of the limit.
    assert all(len(s.url(WS)) > 600 - len("&contract_id=100000") for s in plan[:-1])


def test_url_carries_repeated_query_parameters() -> None:
    (subscription,) = plan_subscriptions(WS, [], ["GOLD APR", "SAF"], max_contracts=10, max_url_length=4000)
    assert subscription.url(WS) == (
        f"{WS}/data-engine/ime/live/data/websocket/contract/name?contract_name=GOLD+APR&contract_name=SAF"
    )


def test_a_contract_too_long_for_any_url_is_refused() -> None:
    with pytest.raises(ValueError, match="alone makes a URL longer"):
        plan_subscriptions(WS, ["x" * 400], [], max_contracts=10, max_url_length=300)


def test_replan_keeps_unchanged_subscriptions_and_reopens_only_changed_ones() -> None:
    current = plan_subscriptions(WS, [str(n) for n in range(10)], [], max_contracts=4, max_url_length=4000)
    assert [s.contracts for s in current] == [("0", "1", "2", "3"), ("4", "5", "6", "7"), ("8", "9")]
    wanted = [c for c in (str(n) for n in range(10)) if c != "5"] + ["10", "11", "12"]
    plan = replan(current, WS, wanted, [], max_contracts=4, max_url_length=4000)
    by_name = {s.name: s.contracts for s in plan}
    assert by_name["id-0"] == ("0", "1", "2", "3"), "untouched"
    assert by_name["id-2"] == ("8", "9"), "untouched: additions never reopen an unchanged connection"
    assert by_name["id-1"] == ("4", "6", "7", "10"), "changed anyway, so it takes a new contract"
    assert by_name["id-3"] == ("11", "12")
    assert sorted(c for s in plan for c in s.contracts) == sorted(wanted)


def test_a_groups_connections_are_named_by_it_and_a_replan_of_one_group_leaves_the_others_alone() -> None:
    current = [
        *plan_subscriptions(WS, ["1", "2", "3"], [], max_contracts=2, max_url_length=4000, group="s0"),
        *plan_subscriptions(WS, ["4", "5"], [], max_contracts=2, max_url_length=4000, group="s1"),
    ]
    assert [(s.name, s.contracts) for s in current] == [
        ("id-s0-0", ("1", "2")),
        ("id-s0-1", ("3",)),
        ("id-s1-0", ("4", "5")),
    ]
    plan = replan(current, WS, ["1", "2", "3", "6"], [], max_contracts=2, max_url_length=4000, group="s0")
    assert [(s.name, s.contracts, s.group) for s in plan] == [
        ("id-s0-0", ("1", "2"), "s0"),
        ("id-s0-1", ("3",), "s0"),
        ("id-s0-2", ("6",), "s0"),
    ], "only s0's connections are planned; id-s1-0 is not touched (nor taken over)"


def test_replan_drops_emptied_subscriptions() -> None:
    current = plan_subscriptions(WS, ["1", "2", "3"], [], max_contracts=2, max_url_length=4000)
    assert [s.name for s in replan(current, WS, ["1", "2"], [], max_contracts=2, max_url_length=4000)] == ["id-0"]


@pytest.mark.parametrize("invalid_count", [1, 2, 3])
def test_find_invalid_stays_within_2k_log2_n_probes_and_reports_every_valid_contract(invalid_count: int) -> None:
    contracts = [str(1001 + n) for n in range(64)]
    worst = 0
    for bad in itertools.combinations(range(0, 64, 1 if invalid_count < 3 else 7), invalid_count):
        invalid = {contracts[i] for i in bad}
        probes = 0
        valid: list[str] = []

        async def probe(subset: Sequence[str], invalid: set[str] = invalid) -> bool:
            nonlocal probes
            probes += 1
            return not set(subset) & invalid

        async def on_valid(subset: Sequence[str], valid: list[str] = valid) -> None:
            valid.extend(subset)

        assert set(asyncio.run(find_invalid(contracts, probe, on_valid))) == invalid
        assert sorted(valid) == sorted(set(contracts) - invalid), "every valid contract released during the search"
        worst = max(worst, probes)
    assert worst <= 2 * invalid_count * 6


def test_find_invalid_probes_both_halves_at_once() -> None:
    in_flight = peak = 0

    async def probe(subset: Sequence[str]) -> bool:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return "13" not in subset and "50" not in subset

    assert sorted(asyncio.run(find_invalid([str(n) for n in range(64)], probe))) == ["13", "50"]
    assert peak >= 2


def test_find_invalid_blames_nothing_when_the_refusal_was_not_a_contracts() -> None:
    async def probe(subset: Sequence[str]) -> bool:
        return True  # every part is accepted: the list was refused for another reason (a token expiring, say)

    assert asyncio.run(find_invalid([str(n) for n in range(16)], probe)) == []
