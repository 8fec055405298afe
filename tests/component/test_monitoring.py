"""The alert rules under Prometheus's own tools, and a real Prometheus over the bridge's /metrics.

`promtool check rules` and `promtool test rules` (each alert firing and quiet, and mutations that the tests
must catch), also on the chart's rules tuned from values; a real Prometheus server scrapes a HealthServer over
a populated Metrics registry, evaluates the rules and answers every dashboard query. A missing tool fails the
test under CI=true and skips it elsewhere, saying which.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bridge.health import HealthServer
from bridge.metrics import Metrics
from tests.unit.test_helm import _module, render_files
from tests.unit.test_monitoring import (
    ROOT,
    RULE_TESTS,
    RULES,
    SESSION_TESTS,
    _missing,
    alert_expressions,
    dashboard_expressions,
    substitute_dashboard_variables,
)

SCRAPE_EXAMPLE = ROOT / "deploy" / "prometheus" / "scrape-config.example.yaml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        _missing("promtool (Debian package prometheus; make test installs it when run as root)")
    assert found is not None
    return found


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the rules file."""
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules`: every alert fires and stays quiet where its unit tests say."""
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name, SESSION_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == 2, result.stdout


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: with a threshold moved, promtool reports the alert that no longer fires."""
    rules = RULES.read_text("utf-8")
    broken = rules.replace(
        'increase(ime_bridge_reconnects_total{job="ime-bridge"}[15m])) > 10',
        'increase(ime_bridge_reconnects_total{job="ime-bridge"}[15m])) > 1000',
    )
    assert broken != rules
    (tmp_path / RULES.name).write_text(broken, "utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "ImeBridgeReconnectStorm" in result.stdout + result.stderr


def test_session_unit_tests_catch_an_alert_that_ignores_the_calendar(tmp_path: Path) -> None:
    """Without its session guard the per-connection silence alert pages on a holiday, and promtool says so."""
    rules = RULES.read_text("utf-8")
    guard = (
        'ime_bridge_last_message_timestamp_seconds{job="ime-bridge"} > 120)  # threshold\n'
        '          and on (job, instance) (ime_bridge_trading_session_open{job="ime-bridge"} == 1)\n'
    )
    assert guard in rules
    broken = rules.replace(guard, 'ime_bridge_last_message_timestamp_seconds{job="ime-bridge"} > 120)\n')
    (tmp_path / RULES.name).write_text(broken, "utf-8")
    shutil.copy(SESSION_TESTS, tmp_path / SESSION_TESTS.name)
    result = subprocess.run(
        [_promtool(), "test", "rules", SESSION_TESTS.name], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "quiet on a holiday" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("original", "mutation", "failing_case"),
    [
        (
            "sum by (job, namespace, service) (ime_bridge_owned_shards",
            "sum by (job) (ime_bridge_owned_shards",
            "fires when a replica vanished",
        ),
        (
            "< max by (job, namespace, service) (ime_bridge_coordination_shards",
            "<= max by (job, namespace, service) (ime_bridge_coordination_shards",
            "silent while the owned shards add up",
        ),
        (
            'ime_bridge_coordination_shards{job="ime-bridge"} > 0)',
            'ime_bridge_coordination_shards{job="ime-bridge"} + 1)',
            "silent when coordination is off",
        ),
        (
            '(increase(ime_bridge_rebalances_total{job="ime-bridge"}[1h]) > 0)',
            '(ime_bridge_rebalances_total{job="ime-bridge"} > 0)',
            "clears an hour after the rebalance",
        ),
    ],
    ids=["sums-across-groups", "fires-when-equal", "ignores-coordination-off", "never-clears"],
)
def test_coordination_unit_tests_catch_a_broken_rule(
    tmp_path: Path, original: str, mutation: str, failing_case: str
) -> None:
    """The promtool cases of ImeBridgeShardsUnowned and ImeBridgeHandoverUndelivered fail for a rule that sums
    several groups together, fires when every shard is owned, ignores coordination being off or never clears."""
    rules = RULES.read_text("utf-8")
    assert rules.count(original) == 1, original
    (tmp_path / RULES.name).write_text(rules.replace(original, mutation), "utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert failing_case in result.stdout + result.stderr


def test_chart_rules_tuned_from_values_pass_promtool(tmp_path: Path) -> None:
    """The chart's PrometheusRule with every marked threshold, `for`, the job and the links changed is still
    valid for Prometheus."""
    helm = _module("helm_python", "helm-python-sdk")
    helm.disable_logging()
    plain = [rule for group in yaml.safe_load(RULES.read_text("utf-8"))["groups"] for rule in group["rules"]]
    tuning = {
        rule["alert"]: {"for": "7m", **({"threshold": 3.5} if "# threshold" in rule["expr"] else {})} for rule in plain
    }
    values = {"prometheusRule": {"enabled": True, "job": "md", "grafanaUrl": "https://g.example.org", "alerts": tuning}}
    manifest = yaml.safe_load(render_files(helm, values)["ime-bridge/templates/prometheusrule.yaml"])
    path = tmp_path / "tuned-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": manifest["spec"]["groups"]}), "utf-8")
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(plain)} rules found" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def populate(metrics: Metrics) -> None:
    """Give every metric a series, as a bridge in spool mode that has seen some traffic would (one of two
    coordinated replicas, past a rebalance)."""
    now = time.time()
    metrics.build_info.info({"version": "0.1.0", "session_id": "test"})
    for endpoint in ("id", "name"):
        metrics.messages_received.labels(endpoint).inc(100)
        metrics.reconnects.labels(endpoint, "timeout").inc()
        for reason in ("auth", "contract"):
            metrics.policy_rejections.labels(endpoint, reason).inc()
        metrics.connection_up.labels(endpoint, f"{endpoint}-0").set(1)
        metrics.last_message_timestamp.labels(f"{endpoint}-0").set(now)
    metrics.messages_published.labels("ime.contract.updates").inc(98)
    metrics.messages_rejected.labels("invalid_json").inc(2)
    metrics.dead_letters.labels("invalid_json").inc(2)
    metrics.dead_letters_dropped.labels("invalid_json").inc(1)
    metrics.produce_errors.labels("KafkaTimeoutError").inc()
    metrics.connections.set(2)
    metrics.subscribed_contracts.set(3)
    for seconds in (0.05, 0.2, 1.5):
        metrics.exchange_lag.observe(seconds)
        metrics.publish_latency.observe(seconds / 10)
    metrics.buffer_records.set(10)
    metrics.buffer_capacity.set(100_000)
    metrics.conflated.inc(5)
    metrics.duplicates_suppressed.inc(7)
    metrics.spool_bytes.set(4096)
    metrics.spool_records.set(4)
    metrics.spool_full.set(0)
    metrics.spool_damaged_entries.inc(0)
    metrics.spooling.set(1)
    metrics.spool_possible_duplicates.inc(0)
    metrics.task_failures.labels("spool-maintenance").inc(0)
    metrics.producer_restarts.inc()
    metrics.quarantined_contracts.labels("rejected").set(1)
    metrics.contract_probes.labels("bisect").inc(7)
    metrics.token_refreshes.labels("ok").inc()
    metrics.token_requests_held_back.inc()
    metrics.token_expiry.set(now + 3600)
    metrics.ready.set(1)
    metrics.trading_session_open.set(1)
    metrics.undelivered_at_shutdown.set(0)
    metrics.owned_shards.set(32)
    metrics.coordination_shards.set(64)
    metrics.rebalances.inc(2)
    for direction, seconds in (("release", 0.3), ("acquire", 0.4)):
        metrics.handover_seconds.labels(direction).observe(seconds)
    metrics.handover_undelivered_records.set(0)
    metrics.handover_duplicates_dropped.inc(3)


class PrometheusServer:
    """A Prometheus server on a loopback port, scraping one target every second, stopped by its PID."""

    def __init__(self, binary: str, directory: Path, target: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(SCRAPE_EXAMPLE.read_text("utf-8"))
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "ime-bridge", "the rules select job ime-bridge"
        job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}])
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config), "utf-8")
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        """Terminate (then kill) this process only."""
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.log.close()


async def prometheus_query(http: aiohttp.ClientSession, url: str, expr: str) -> dict[str, Any]:
    """The Prometheus HTTP API's answer to an instant query."""
    async with http.get(f"{url}/api/v1/query", params={"query": expr}) as response:
        body: dict[str, Any] = await response.json()
        return body


async def evaluated_rules(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]] | None:
    """Every loaded rule once each has been evaluated at least once, else None."""
    async with http.get(f"{url}/api/v1/rules") as response:
        groups = (await response.json())["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    done = rules and all(not rule.get("lastEvaluation", "0").startswith("0") for rule in rules)
    return rules if done else None


async def _until(condition: Callable[[], Any], what: str, within: float = 60.0) -> Any:
    """Poll an async condition until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + within
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def bridge_endpoint() -> AsyncIterator[str]:
    """The bridge's own /metrics endpoint (HealthServer) on a free loopback port, over populated metrics."""
    metrics = Metrics()
    populate(metrics)
    server = HealthServer(metrics.registry, lambda: (True, {}), "127.0.0.1", 0)
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


@pytest.fixture
def prometheus_binary() -> str:
    """The prometheus server binary (Debian package prometheus)."""
    found = shutil.which("prometheus")
    if found is None:
        _missing("prometheus server (Debian package prometheus; make test installs it when run as root)")
    assert found is not None
    return found


async def test_rules_and_dashboard_run_on_a_real_prometheus(
    bridge_endpoint: str, prometheus_binary: str, tmp_path: Path
) -> None:
    """Prometheus scrapes the bridge, evaluates every rule without error, and every panel query returns data."""
    server = PrometheusServer(prometheus_binary, tmp_path, bridge_endpoint)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def query(expr: str) -> dict[str, Any]:
                return await prometheus_query(http, server.url, expr)

            async def ready() -> bool:
                if server.process.poll() is not None:
                    raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
                try:
                    async with http.get(f"{server.url}/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            async def scraped_twice() -> bool:
                body = await query('count_over_time(up{job="ime-bridge"}[1m]) >= 3 and up{job="ime-bridge"} == 1')
                return bool(body["data"]["result"])

            async def rules_evaluated() -> list[dict[str, Any]] | None:
                return await evaluated_rules(http, server.url)

            await _until(ready, "prometheus to be ready")
            await _until(scraped_twice, "three scrapes of the bridge")
            rules = await _until(rules_evaluated, "every rule to be evaluated")
            assert {rule["name"] for rule in rules} == {name for name, _ in alert_expressions()}
            unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
            assert not unhealthy, unhealthy

            for where, expr in alert_expressions():
                body = await query(expr)
                assert body["status"] == "success", f"{where}: {body}"

            empty = []
            for where, expr in dashboard_expressions():
                body = await query(substitute_dashboard_variables(expr))
                assert body["status"] == "success", f"{where}: {body}"
                if not body["data"]["result"]:
                    empty.append(where)
            assert not empty, f"panels without data: {empty}"
    finally:
        server.stop()
    assert server.process.returncode is not None
