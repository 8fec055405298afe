"""The rules and the dashboard against a running bridge, and `ime_bridge_ready` read from /metrics alone.

A real Prometheus scrapes a bridge that publishes through the broker; the ready gauge follows Kafka coming and
going with nothing polling /readyz.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.devtools.simulator import Simulator, SimulatorConfig
from tests.component.test_monitoring import (
    PrometheusServer,
    _until,
    evaluated_rules,
    prometheus_binary,  # noqa: F401 (a fixture the test here takes)
    prometheus_query,
)
from tests.integration.test_delivery import (
    ProxiedBroker,
    fast_failing_kafka,
    proxied_broker,  # noqa: F401 (a fixture the test here takes)
)
from tests.support.broker import BrokerInfo
from tests.support.harness import bridge_settings, running_bridge
from tests.support.waiting import assert_holds, wait_for
from tests.unit.test_monitoring import (
    alert_expressions,
    dashboard_expressions,
    substitute_dashboard_variables,
)


async def test_rules_and_dashboard_are_valid_against_a_running_bridge(
    kafka_broker: BrokerInfo, prometheus_binary: str, tmp_path: Path
) -> None:
    """A real bridge (simulator + broker) scraped by a real Prometheus: every rule healthy, every query valid,
    and the panels an on-call person looks at first return data."""
    async with Simulator(SimulatorConfig(contracts=4, rate=100)) as simulator:
        settings = bridge_settings(simulator, kafka_broker, ime={"contract_ids": [c.id for c in simulator.contracts]})
        async with running_bridge(settings) as running:
            server = PrometheusServer(prometheus_binary, tmp_path, f"127.0.0.1:{settings.metrics.port}")
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

                    async def query(expr: str) -> dict[str, Any]:
                        return await prometheus_query(http, server.url, expr)

                    async def has_rates() -> bool:
                        try:  # Prometheus refuses connections until it listens
                            body = await query('rate(ime_bridge_messages_published_total{job="ime-bridge"}[1m]) > 0')
                        except aiohttp.ClientError:
                            return False
                        return bool(body.get("data", {}).get("result"))

                    async def rules_healthy() -> list[dict[str, Any]] | None:
                        return await evaluated_rules(http, server.url)

                    await _until(has_rates, "Prometheus to see records published", within=90)
                    rules = await _until(rules_healthy, "every rule to be evaluated")
                    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
                    assert not unhealthy, unhealthy
                    for where, expr in alert_expressions():
                        assert (await query(expr))["status"] == "success", where
                    with_data = set()
                    for where, expr in dashboard_expressions():
                        body = await query(substitute_dashboard_variables(expr))
                        assert body["status"] == "success", f"{where}: {body}"
                        if body["data"]["result"]:
                            with_data.add(where)
            finally:
                server.stop()
    assert running.published() > 0
    core = [where for where, _ in dashboard_expressions() if any(word in where.lower() for word in CORE_PANELS)]
    assert core, "the dashboard has throughput, latency and connection panels"
    missing = [where for where in core if where not in with_data]
    assert not missing, f"core panels without data from a running bridge: {missing}"


CORE_PANELS = ("throughput", "publish latency", "connections")


async def scraped(http: aiohttp.ClientSession, metrics_url: str, name: str) -> float | None:
    """One sample of `name` from a scrape of /metrics, as Prometheus would take it (None: not exported)."""
    async with http.get(f"{metrics_url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


async def test_ready_on_metrics_follows_kafka_with_nobody_polling_readyz(proxied_broker: ProxiedBroker) -> None:
    """Only /metrics is scraped, never /readyz: ime_bridge_ready reads 0 while Kafka is unreachable, 1 once
    it answers and the feed is subscribed, and 0 again when Kafka goes away (the bridge's own tick, not a
    probe, keeps it current; before, it changed only when /readyz was asked)."""
    proxy = proxied_broker.proxy
    proxy.cut()  # Kafka unreachable from the start
    async with Simulator(SimulatorConfig(contracts=4, rate=20)) as simulator:
        settings = bridge_settings(
            simulator,
            proxied_broker.info,
            ime={"contract_ids": [c.id for c in simulator.contracts]},
            kafka=fast_failing_kafka(),
        )
        async with running_bridge(settings) as running, aiohttp.ClientSession() as http:
            url = running.metrics_url

            async def ready_is(value: float) -> bool:
                try:
                    return await scraped(http, url, "ime_bridge_ready") == value
                except aiohttp.ClientConnectionError:  # the endpoint is not bound yet
                    return False

            await wait_for(lambda: ready_is(0), within=30, what="/metrics to answer, not ready")
            await assert_holds(lambda: ready_is(0), seconds=3, interval=0.5, what="not ready while Kafka is cut")
            assert await scraped(http, url, "ime_bridge_trading_session_open") in {0.0, 1.0}

            proxy.restore()
            await wait_for(lambda: ready_is(1), within=90, interval=0.5, what="ready once Kafka answers")

            proxy.cut()
            await wait_for(lambda: ready_is(0), within=90, interval=0.5, what="not ready once Kafka is gone")
            proxy.restore()  # let the stop drain what waited
