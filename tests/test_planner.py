"""planner: contracts split into connections by count and URL length."""

from __future__ import annotations

import pytest

from bridge.planner import plan_subscriptions
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
