"""Against a real server's manners (the simulator's switches): close frames left unanswered while streaming,
short-lived tokens closed with 1008 at expiry, invalid contracts among many. Valid contracts stay live."""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.integration.test_resilience import FAST, flowing_after, report
from tests.support.broker import BrokerInfo, consume
from tests.support.harness import bridge_settings, decode_value, running_bridge
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def receive_times(records: list[Any]) -> dict[str, list[datetime]]:
    by_contract: dict[str, list[datetime]] = defaultdict(list)
    for record in records:
        value = decode_value(record)
        by_contract[value["contract_id"]].append(value["receive_time"])
    return {contract: sorted(times) for contract, times in by_contract.items()}


async def test_valid_contracts_stay_live_while_3_invalid_among_64_are_searched_on_a_server_ignoring_close_frames(
    kafka_broker: BrokerInfo,
) -> None:
    # Fast enough that even the least liquid contract changes several times a second: a gap is the bridge's.
    config = SimulatorConfig(contracts=64, rate=3000, ignore_close_frames=True)
    async with Simulator(config) as simulator:
        ids = [c.id for c in simulator.contracts]
        invalid = [ids[5], ids[30], ids[47]]
        valid = [contract for contract in ids if contract not in invalid]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids, **FAST})
        async with running_bridge(settings) as running:
            await flowing_after(kafka_broker, running, ids, time.time() + 3)  # 3 s of normal flow to compare with
            refused_at = time.time()
            await simulator.invalidate_contracts(invalid)  # the live connection is closed with 1008
            await wait_for(
                lambda: running.metric("ime_bridge_quarantined_contracts", reason="rejected") == 3,
                within=60,
                what="three contracts quarantined",
            )
            found_after = time.time() - refused_at
            probes = running.metric("ime_bridge_contract_probes_total", purpose="bisect")
            _, body = await running.get("/readyz")
            assert set(json.loads(body)["quarantined"]) == {f"id:{contract}" for contract in invalid}
            await flowing_after(kafka_broker, running, valid, time.time())
            ended = datetime.now(UTC)
        published = running.published()
        records = await consume(
            kafka_broker.bootstrap_servers, settings.kafka.topic, until=lambda got: len(got) >= published
        )
    times = receive_times(records)

    def largest_gaps(start: datetime, end: datetime) -> dict[str, float]:
        return {
            contract: max(
                (later - earlier).total_seconds()
                for earlier, later in itertools.pairwise([t for t in times[contract] if start <= t <= end])
            )
            for contract in valid
        }

    refused = datetime.fromtimestamp(refused_at, UTC)
    gaps = largest_gaps(datetime.fromtimestamp(refused_at - 1, UTC), ended)
    normal = max(largest_gaps(datetime.fromtimestamp(refused_at - 3, UTC), refused).values())
    worst = max(gaps.values())
    assert worst <= 5.0, f"a valid contract was dark for {worst:.1f}s: {sorted(gaps.items(), key=lambda g: -g[1])[:3]}"
    assert 1 <= probes <= 2 * 3 * 6, f"{probes} probes for 3 invalid among 64"
    report(
        "3 invalid among 64, close frames unanswered",
        found_after,
        probes=int(probes),
        worst_gap=f"{worst:.2f}s",
        worst_gap_before=f"{normal:.2f}s",
    )


async def test_8s_tokens_closed_at_expiry_and_2_invalid_among_16(kafka_broker: BrokerInfo) -> None:
    config = SimulatorConfig(contracts=16, rate=160, token_ttl=8.0, close_on_token_expiry=True)
    async with Simulator(config) as simulator:
        ids = [c.id for c in simulator.contracts]
        invalid = [ids[3], ids[12]]
        await simulator.invalidate_contracts(invalid)
        valid = [contract for contract in ids if contract not in invalid]
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": ids, **FAST})
        started = time.time()
        requests_before = simulator.counters.token_requests
        async with running_bridge(settings) as running:
            await wait_for(
                lambda: running.metric("ime_bridge_quarantined_contracts", reason="rejected") == 2,
                within=45,
                what="two contracts quarantined",
            )
            await wait_for(lambda: time.time() - started >= 45, within=60, interval=0.5, what="45 s of 8 s tokens")
            requests = simulator.counters.token_requests - requests_before
            expiries = simulator.counters.policy_closes
            took = await flowing_after(kafka_broker, running, valid, time.time() - 2)
            assert running.metric("ime_bridge_quarantined_contracts", reason="rejected") == 2, "nothing else blamed"
        elapsed = time.time() - started
    assert requests <= elapsed / 4, f"{requests} token requests in {elapsed:.0f}s"
    report("8 s tokens, 2 invalid among 16", took, token_requests=requests, policy_closes=dict(expiries))
