"""The IME simulator: the pure market (catalogue, generator, rendering) and the server over real sockets."""

from __future__ import annotations

import argparse
import itertools
import json
import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from bridge.devtools.market import (
    UNLIMITED_PRICE_RANGE,
    FrameRenderer,
    MarketGenerator,
    Snapshot,
    build_catalogue,
    prerender,
)
from bridge.devtools.simulator import (
    Simulator,
    SimulatorConfig,
    add_arguments,
    config_from_args,
)
from bridge.protocol import (
    MARKETS,
    Endpoint,
)

NOW = datetime(2026, 5, 29, 12, 0, 0, 123456, tzinfo=UTC)


def test_catalogue_is_unique_deterministic_and_covers_every_family() -> None:
    contracts = build_catalogue(5000)
    assert len({c.id for c in contracts}) == len({c.name for c in contracts}) == 5000
    assert [c.id for c in contracts[:3]] == ["1001", "1002", "1003"]
    assert build_catalogue(64) == contracts[:64]
    assert {c.market for c in contracts[:7]} == set(MARKETS)
    patterns = {
        "future": r"(GC|SAF)\d{4}",
        "call": r"GCC\d{4}-\d+",
        "put": r"GCP\d{4}-\d+",
        "certificate": r"(GB|SAF|CM)DC\d{4}",
    }
    for contract in contracts:
        assert re.fullmatch(patterns[contract.kind], contract.name), contract
    assert contracts[0].name == "GC0504"  # Persian 1405, month 4


def test_catalogue_needs_a_contract() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_catalogue(0)


def test_static_item_describes_the_contract() -> None:
    option = build_catalogue(3)[2]
    item = option.static_item()
    assert item["contractId"] == "1003"
    assert item["contractName"] == option.name
    assert item["market"] == "IMEOption"
    assert item["optionType"] == "call"
    assert item["strikePrice"] == option.strike


def snapshots(count: int, *, contracts: int = 32, seed: int = 1) -> list[Snapshot]:
    return MarketGenerator(build_catalogue(contracts), seed=seed).steps(count, NOW)


def test_generator_is_deterministic_per_seed() -> None:
    assert [s.data for s in snapshots(200)] == [s.data for s in snapshots(200)]
    assert [s.data for s in snapshots(200)] != [s.data for s in snapshots(200, seed=2)]


def test_generator_keeps_the_book_and_aggregates_consistent() -> None:
    last: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots(5000):
        data = snapshot.data
        assert list(data) == ["BestLimit", "Aggregate", "AllowedPriceRange", "ContractInfo"]
        book = data["BestLimit"]
        assert list(book) == ["1", "2", "3"]
        low, high = data["AllowedPriceRange"]["minAllowedPrice"], data["AllowedPriceRange"]["maxAllowedPrice"]
        for side, better in (("buy", float.__gt__), ("sell", float.__lt__)):
            levels = [(book[k][f"{side}_quantity"], book[k][f"{side}_price"]) for k in book]
            filled = [level for level in levels if level != (0, 0)]
            assert levels[: len(filled)] == filled, "empty levels come after filled ones"
            assert all(type(quantity) is int and quantity > 0 for quantity, _ in filled)
            assert all(low <= price <= high for _, price in filled)
            prices = [float(price) for _, price in filled]
            assert all(better(a, b) for a, b in itertools.pairwise(prices))
        if book["1"]["buy_quantity"] and book["1"]["sell_quantity"]:
            assert book["1"]["buy_price"] < book["1"]["sell_price"]
        aggregate = data["Aggregate"]
        if aggregate["trade_count"] == 0:
            assert aggregate["date"] == aggregate["time"] == ""
        else:
            assert (aggregate["date"], aggregate["time"]) == ("2026-05-29", "12:00:00")
            assert aggregate["low_price"] <= aggregate["last_price"] <= aggregate["high_price"]
        assert data != last.get(snapshot.contract_id), "a snapshot is sent only when its contract changed"
        last[snapshot.contract_id] = data


def test_generator_prices_are_ints_except_option_premia() -> None:
    kinds_with_floats = {
        s.contract.kind for s in snapshots(3000) if isinstance(s.data["BestLimit"]["1"]["sell_price"], float)
    }
    assert kinds_with_floats <= {"call", "put"}
    assert kinds_with_floats


def test_generator_starts_some_contracts_dormant() -> None:
    generator = MarketGenerator(build_catalogue(64), seed=1)
    dormant = [
        c.id
        for c in build_catalogue(64)
        if (generator.snapshot(c.id, NOW).data["AllowedPriceRange"]["minAllowedPrice"], 0)
        == (UNLIMITED_PRICE_RANGE[0], 0)
    ]
    assert dormant
    data = generator.snapshot(dormant[0], NOW).data
    assert data["BestLimit"]["1"] == {"buy_quantity": 0, "buy_price": 0, "sell_quantity": 0, "sell_price": 0}
    assert data["Aggregate"]["previous_close"] == 0
    woken = generator.step_contract(dormant[0], NOW).data
    assert woken["AllowedPriceRange"]["maxAllowedPrice"] < UNLIMITED_PRICE_RANGE[1]


def test_aggregate_time_is_wall_time_in_the_market_zone() -> None:
    generator = MarketGenerator(build_catalogue(1), seed=1, zone=ZoneInfo("Asia/Tehran"))
    traded = next(s for s in generator.steps(100, NOW) if s.data["Aggregate"]["trade_count"])
    assert traded.data["Aggregate"]["time"] == "15:30:00"


@pytest.mark.parametrize(
    ("dialect", "endpoint", "key", "value", "timestamp"),
    [
        ("ht", Endpoint.ID, "contractId", "1001", "2026-05-29T12:00:00.123456Z"),
        ("ht", Endpoint.NAME, "contractName", "GC0504", "2026-05-29T12:00:00.123456Z"),
        ("legacy", Endpoint.ID, "ContractId", "1001", "2026-05-29T12:00:00.123456"),
        ("legacy", Endpoint.NAME, "contractName", "GC0504", "2026-05-29T12:00:00.123456"),
    ],
)
def test_render_matches_the_documents(dialect: str, endpoint: Endpoint, key: str, value: str, timestamp: str) -> None:
    snapshot = MarketGenerator(build_catalogue(1)).step(NOW)
    frame = FrameRenderer(dialect).render(snapshot, endpoint)  # type: ignore[arg-type]
    expected = {"channel": "IME Stream", key: value, "timestamp": timestamp, "data": snapshot.data}
    assert frame == json.dumps(expected)  # same keys, same order, same separators


def test_legacy_timestamps_are_wall_time_in_the_naive_zone() -> None:
    renderer = FrameRenderer("legacy", ZoneInfo("Asia/Tehran"))
    assert renderer.timestamp(NOW) == "2026-05-29T15:30:00.123456"


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(ValueError, match="dialect"):
        FrameRenderer("v3")  # type: ignore[arg-type]


def test_prerender_interleaves_every_contract() -> None:
    contracts = build_catalogue(5)
    frames = prerender(MarketGenerator(contracts), contracts, 3, NOW)
    assert [f.contract_id for f in frames] == [c.id for c in contracts] * 3
    assert len({f.tail for f in frames}) == 15
    assert all(json.loads(b'{"t": "' + f.tail)["data"]["BestLimit"] for f in frames)


async def test_bad_frame_ratio_needs_prerender_and_a_share() -> None:
    for config in (SimulatorConfig(bad_frame_ratio=0.1), SimulatorConfig(prerender=True, bad_frame_ratio=1.5)):
        with pytest.raises(ValueError, match="bad_frame_ratio"):
            await Simulator(config).start()


def test_bad_frame_ratio_option() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--prerender", "--bad-frame-ratio", "0.1"])
    assert config_from_args(args).bad_frame_ratio == 0.1
    assert config_from_args(parser.parse_args([])).bad_frame_ratio == 0.0
