"""Resilient subscriptions: one test per fault, each asserting recovery and data continuity in Kafka.

Every test ends by checking that records of every valid contract keep arriving in Kafka after the fault,
and prints how long the recovery took (the figures quoted in the README).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from bridge.config import Settings
from bridge.devtools.broker import free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.support.broker import BrokerInfo, consume
from tests.support.faultproxy import FaultProxy
from tests.support.harness import RunningBridge, bridge_config, bridge_settings, decode_value, running_bridge
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

FAST = {"reconnect_min_seconds": 0.1, "reconnect_max_seconds": 1.0, "healthy_after_seconds": 5}


@pytest.fixture(params=[False, True], ids=["close-answered", "close-ignored"])
def ignore_close_frames(request: pytest.FixtureRequest) -> bool:
    """Every fault twice: against a server that answers close frames, and one that ignores them while it streams."""
    return bool(request.param)


async def flowing_after(
    broker: BrokerInfo, running: RunningBridge, contracts: list[str], since: float, within: float = 60
) -> float:
    """Wait until every contract has a record received after `since` (epoch s); returns when that happened."""
    topic = running.settings.kafka.topic
    since_moment = datetime.fromtimestamp(since, UTC)
    fresh: set[str] = set()
    seen = 0

    def all_fresh(records: list[Any]) -> bool:
        nonlocal seen
        for record in records[seen:]:
            value = decode_value(record)
            if value["receive_time"] > since_moment:
                fresh.add(value["contract_id"])
        seen = len(records)
        return set(contracts) <= fresh

    await consume(broker.bootstrap_servers, topic, until=all_fresh, within=within)
    return time.time() - since


def report(name: str, seconds: float, **extra: object) -> None:
    details = " ".join(f"{key}={value}" for key, value in extra.items())
    print(f"\nrecovery {name}: {seconds:.2f}s {details}")


async def test_drop_of_all_connections(kafka_broker: BrokerInfo, ignore_close_frames: bool) -> None:
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=8, rate=200)) as simulator:
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": ids, "max_contracts_per_connection": 4, **FAST}
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.metric("ime_bridge_connections") == 2)
            fault = time.time()
            assert await simulator.drop_connections() == 2
            took = await flowing_after(kafka_broker, running, ids, fault)
            assert running.metric_total("ime_bridge_reconnects_total") >= 2
    report("drop all connections", took)


async def test_half_open_connection_is_detected_within_ping_interval_plus_timeout(
    kafka_broker: BrokerInfo, ignore_close_frames: bool
) -> None:
    async with (
        Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=4, rate=100)) as simulator,
        FaultProxy("127.0.0.1", simulator.port) as proxy,
    ):
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={
                "contract_ids": ids,
                "ws_url": f"ws://{proxy.address}",
                "ping_interval_seconds": 1,
                "ping_timeout_seconds": 1,
                "open_timeout_seconds": 2,
                **FAST,
            },
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 10)
            fault = time.monotonic()
            proxy.blackhole()
            await wait_for(lambda: running.metric("ime_bridge_connections") == 0, within=10, what="detection")
            detected = time.monotonic() - fault
            # ping interval + ping timeout, then the 1 s close timeout and the watchdog's scheduling.
            assert detected <= 1 + 1 + 1.5, f"half-open path detected after {detected:.2f}s"
            restored = time.time()
            proxy.restore()
            took = await flowing_after(kafka_broker, running, ids, restored)
    report("half-open (black-holed) connection", detected, flowing_again_after_restore=f"{took:.2f}s")


async def test_accept_then_close_storm_stays_within_the_backoff(
    kafka_broker: BrokerInfo, ignore_close_frames: bool
) -> None:
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=2, rate=100)) as simulator:
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids, **FAST})
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 5)
            simulator.accept_then_close(True, code=1011)
            await simulator.drop_connections()
            before = simulator.counters.handshakes
            storm_seconds = 8.0
            await asyncio.sleep(storm_seconds)  # the measurement window itself, not a wait for a condition
            attempts = simulator.counters.handshakes - before
            # Full jitter under a 1 s cap: about 20 attempts in 8 s; a backoff reset per handshake would be thousands.
            assert 3 <= attempts <= 60, attempts
            simulator.accept_then_close(False)
            fault_over = time.time()
            took = await flowing_after(kafka_broker, running, ids, fault_over)
    report("accept-then-close storm", took, attempts_in_8s=attempts)


async def test_close_1011_recovers(kafka_broker: BrokerInfo, ignore_close_frames: bool) -> None:
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=4, rate=200)) as simulator:
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids, **FAST})
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 5)
            fault = time.time()
            assert await simulator.close_connections(1011) == 1
            took = await flowing_after(kafka_broker, running, ids, fault)
            assert running.metric("ime_bridge_reconnects_total", endpoint="id", reason="server_error") == 1
    report("close 1011", took)


async def test_server_down_at_start_then_back(kafka_broker: BrokerInfo, ignore_close_frames: bool) -> None:
    port = free_port()
    config = SimulatorConfig(ignore_close_frames=ignore_close_frames, port=port, contracts=4, rate=200)
    nobody = {"base_url": f"http://127.0.0.1:{port}", "ws_url": f"ws://127.0.0.1:{port}"}
    settings = bridge_settings(
        Simulator(config), kafka_broker, ime={"contract_ids": ["1001", "1002"], **nobody, **FAST}
    )
    async with running_bridge(settings) as running:
        await wait_for(lambda: running.metric_total("ime_bridge_reconnects_total") >= 2, what="failed attempts")
        assert running.metric("ime_bridge_ready") == 0
        started = time.time()
        async with Simulator(config):
            took = await flowing_after(kafka_broker, running, ["1001", "1002"], started)
            await wait_for(lambda: running.bridge.readiness()[0])
    report("server down at start, then back", took)


async def test_token_expiry_mid_stream_is_refreshed_ahead_without_a_1008(
    kafka_broker: BrokerInfo, ignore_close_frames: bool
) -> None:
    async with Simulator(
        SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=2, rate=100, token_ttl=4.0)
    ) as simulator:
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": ids, "token_refresh_margin_seconds": 2, **FAST}
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.metric("ime_bridge_token_refreshes_total", outcome="ok") >= 3, within=20)
            for _ in range(3):  # reconnects keep finding a valid token
                await simulator.drop_connections()
                await wait_for(lambda: running.metric("ime_bridge_connections") == 1, within=10)
            fault = time.time()
            took = await flowing_after(kafka_broker, running, ids, fault)
            assert running.metric_total("ime_bridge_policy_rejections_total") == 0
            assert running.metric("ime_bridge_token_expiry_timestamp_seconds") > time.time()
    report("token expiry mid-stream (refreshed ahead)", took)


async def test_token_revocation_is_recovered_by_one_reissue(
    kafka_broker: BrokerInfo, ignore_close_frames: bool
) -> None:
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=6, rate=200)) as simulator:
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": ids, "max_contracts_per_connection": 3, **FAST}
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.metric("ime_bridge_connections") == 2)
            fault = time.time()
            simulator.revoke_tokens()
            await simulator.drop_connections()
            took = await flowing_after(kafka_broker, running, ids, fault)
            auth = running.metric_total("ime_bridge_policy_rejections_total")
            assert 1 <= auth <= 2, "one 1008 per connection at most, then a fresh token: no storm"
            assert running.metric("ime_bridge_policy_rejections_total", endpoint="id", reason="contract") == 0
    report("token revocation", took, policy_rejections=auth)


async def test_wrong_credentials_keep_the_bridge_unready_without_a_hot_loop(
    kafka_broker: BrokerInfo, ignore_close_frames: bool
) -> None:
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=4, rate=100)) as simulator:
        ids = [c.id for c in simulator.contracts]
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": ids, "password": "wrong", "max_contracts_per_connection": 1, **FAST},
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.metric("ime_bridge_token_refreshes_total", outcome="rejected") >= 1)
            window = 5.0
            requests_before = simulator.counters.token_requests
            await asyncio.sleep(window)  # the measurement window: nothing may happen in it
            requests = simulator.counters.token_requests - requests_before
            status, body = await running.get("/readyz")
    assert status == 503
    assert json.loads(body)["connections_up"] == 0
    assert requests == 0, f"{requests} token requests in {window}s with 4 connections: a hot loop"
    assert running.metric("ime_bridge_reconnects_total", endpoint="id", reason="auth_rejected") >= 1


async def test_two_invalid_contracts_among_64_are_found_by_bisection_and_quarantined(
    kafka_broker: BrokerInfo, ignore_close_frames: bool
) -> None:
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=64, rate=400)) as simulator:
        ids = [c.id for c in simulator.contracts]
        invalid = [ids[9], ids[41]]
        await simulator.invalidate_contracts(invalid)
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": ids, "quarantine_reprobe_seconds": 2, **FAST}
        )
        started = time.time()
        async with running_bridge(settings) as running:
            await wait_for(
                lambda: running.metric("ime_bridge_quarantined_contracts", reason="rejected") == 2,
                within=60,
                what="two contracts quarantined",
            )
            found_after = time.time() - started
            probes = running.metric("ime_bridge_contract_probes_total", purpose="bisect")
            assert probes <= 2 * 2 * 6, f"{probes} probe connections for 2 invalid among 64 (bound 2·k·log2 n)"
            _, body = await running.get("/readyz")
            quarantined = json.loads(body)["quarantined"]
            assert set(quarantined) == {f"id:{contract}" for contract in invalid}
            valid = [contract for contract in ids if contract not in invalid]
            await flowing_after(kafka_broker, running, valid, started, within=60)

            simulator.revalidate_contracts([invalid[0]])
            listed = time.time()
            await wait_for(
                lambda: running.metric("ime_bridge_quarantined_contracts", reason="rejected") == 1,
                within=30,
                what="the re-probe to release the contract that became valid",
            )
            took = await flowing_after(kafka_broker, running, [invalid[0]], listed)
    report("2 invalid among 64", found_after, probes=int(probes), newly_valid_flowing_after=f"{took:.2f}s")


@pytest.mark.parametrize("inside", [True, False], ids=["inside-trading-hours", "outside-trading-hours"])
async def test_silence_reconnects_only_inside_the_trading_calendar(
    kafka_broker: BrokerInfo, ignore_close_frames: bool, inside: bool
) -> None:
    today_in_tehran = datetime.now(ZoneInfo("Asia/Tehran")).date().isoformat()
    calendar = {
        "trading_sessions": ["sat-fri 00:00-24:00"],
        "holiday_calendar": None,  # Iran's public holidays would close "inside" on some dates
        "holidays": [] if inside else [today_in_tehran],
    }
    # A market that changes about once a minute: silence, but pings are answered.
    async with Simulator(SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=1, rate=0.01)) as simulator:
        settings = bridge_settings(
            simulator,
            kafka_broker,
            ime={"contract_ids": [simulator.contracts[0].id], "stale_after_seconds": 2, **calendar, **FAST},
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.metric("ime_bridge_connections") == 1)
            opened = time.monotonic()
            if inside:
                await wait_for(
                    lambda: running.metric("ime_bridge_reconnects_total", endpoint="id", reason="stale") >= 1,
                    within=15,
                    what="the watchdog to reconnect a silent connection",
                )
                report("silence inside trading hours", time.monotonic() - opened)
            else:
                await asyncio.sleep(3 * 2)  # the measurement window: three watchdog periods of silence
                assert running.metric("ime_bridge_reconnects_total", endpoint="id", reason="stale") == 0
                assert running.metric("ime_bridge_connections") == 1


async def test_500_contracts_sharded_under_a_url_limit_and_sighup_reopens_only_affected_connections(
    kafka_broker: BrokerInfo, ignore_close_frames: bool, tmp_path: Path
) -> None:
    async with Simulator(
        SimulatorConfig(ignore_close_frames=ignore_close_frames, contracts=520, rate=500)
    ) as simulator:
        ids = [c.id for c in simulator.contracts]
        limits = {"max_url_length": 1200, "max_contracts_per_connection": 100}
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": ids[:500], **limits, **FAST})
        config_path = tmp_path / "bridge.yaml"
        config_path.write_text(yaml.safe_dump(config))
        async with running_bridge(Settings(**config)) as running:
            running.bridge.config_path = config_path
            await wait_for(lambda: running.bridge.readiness()[0], what="the bridge to subscribe")
            assert running.bridge._running is not None
            source = running.bridge._running.source
            before = {s.name: s for s in source.subscriptions}
            assert len(before) >= 5
            assert all(len(s.url(config["ime"]["ws_url"])) <= 1200 for s in before.values())
            assert sorted(c for s in before.values() for c in s.contracts) == sorted(ids[:500])
            await wait_for(lambda: running.metric("ime_bridge_connections") == len(before), within=30)
            open_before = {info.id for info in simulator.connections}

            # the removed ones all sit in connection id-0; the added ones are the liquid among the spare, so
            # each trades within seconds (a quiet contract of this market can go a minute without a change)
            removed = ids[3:6]
            spare = sorted(simulator.contracts[500:], key=lambda contract: contract.liquidity, reverse=True)
            added = [contract.id for contract in spare[:5]]
            config["ime"]["contract_ids"] = [c for c in ids[:500] if c not in removed] + added
            config_path.write_text(yaml.safe_dump(config))
            changed = time.time()
            running.bridge.request_reload()  # what SIGHUP does
            await wait_for(lambda: any(added[0] in s.contracts for s in source.subscriptions), what="the reload")
            await wait_for(lambda: running.metric("ime_bridge_connections") == len(source.subscriptions), within=30)
            after = {s.name: s for s in source.subscriptions}
            reopened = sorted(name for name in before if after.get(name) != before[name])
            assert reopened == ["id-0"], reopened
            assert not set(removed) & {c for s in after.values() for c in s.contracts}

            def old_ones_still_open() -> int:
                return len(open_before & {info.id for info in simulator.connections})

            # a server ignoring close frames holds the replaced connection until the bridge drops TCP
            await wait_for(lambda: old_ones_still_open() <= len(before) - 1, within=10, what="id-0 to close")
            assert old_ones_still_open() == len(before) - 1, "every connection but the changed one stayed open"
            took = await flowing_after(kafka_broker, running, added, changed)
    report("SIGHUP reconcile (500 contracts)", took, connections=len(before), reopened=reopened)
