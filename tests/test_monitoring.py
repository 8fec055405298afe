"""Alert rules (deploy/prometheus) and the Grafana dashboard (deploy/grafana) against the bridge's metrics.

Static: every expression parses as PromQL (promql-parser) and names only metrics bridge/metrics.py defines,
the process_* ones, `up`, or a recording rule of the rules file; every ime_bridge_* metric is charted.
Prometheus's own tools: `promtool check rules` and `promtool test rules` (a unit test firing and one not
firing for every alert). Live: a real Prometheus server scrapes the bridge's /metrics endpoint (its
HealthServer over a populated Metrics registry), evaluates the rules, and answers every dashboard query.
A missing tool fails the test under CI=true and skips it elsewhere, saying which.

The expression helpers (`alert_expressions`, `dashboard_expressions`, `substitute_dashboard_variables`)
are meant for reuse by the end-to-end scrape test.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.health import HealthServer
from bridge.metrics import Metrics
from tests.conftest import BrokerInfo
from tests.harness import bridge_settings, running_bridge

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.test.yaml"
TRADING_HOURS_TESTS = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.trading-hours.test.yaml"
SCRAPE_EXAMPLE = ROOT / "deploy" / "prometheus" / "scrape-config.example.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ime-bridge-dashboard.json"

# Metrics the issue's alerts and panels need that bridge/metrics.py does not define yet. When one lands,
# test_every_bridge_metric_is_charted fails until it has its panel (and alert).
AWAITED_METRICS: dict[str, str] = {}
# Bridge metrics deliberately on no panel, with why.
NOT_CHARTED: dict[str, str] = {}


# --- tools -------------------------------------------------------------------------------------------


def _missing(what: str) -> None:
    """Fail under CI (the tool must be installed there), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required tool missing under CI: {what}")
    pytest.skip(f"tool missing: {what}")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        _missing("promtool (Debian package prometheus; make test installs it when run as root)")
    assert found is not None
    return found


def _promql() -> ModuleType:
    try:
        return importlib.import_module("promql_parser")
    except ImportError:
        _missing("Python package promql-parser (pip install -e '.[dev]')")
        raise


# --- what the bridge exports -------------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def exported_metric_names(registry: CollectorRegistry | None = None) -> set[str]:
    """Every series name a bridge's registry can expose, labelled children or not."""
    metrics = Metrics(registry)
    return {family.name + suffix for family in metrics.registry.collect() for suffix in _SUFFIXES[family.type]}


def recording_rules() -> set[str]:
    """Names the rules file records."""
    return {rule["record"] for group in _rules()["groups"] for rule in group["rules"] if "record" in rule}


def allowed_metric_names() -> set[str]:
    """What an alert or a panel may query."""
    return exported_metric_names() | {"up"} | recording_rules()


# --- the expressions ---------------------------------------------------------------------------------


def _rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text("utf-8"))
    return rules


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text("utf-8"))
    return dashboard


def alert_expressions() -> list[tuple[str, str]]:
    """(alert or record name, PromQL) for every rule of deploy/prometheus/ime-bridge-rules.yaml."""
    return [
        (rule.get("alert") or rule["record"], rule["expr"]) for group in _rules()["groups"] for rule in group["rules"]
    ]


def panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, rows' nested panels included."""
    found = []
    for panel in _dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title/refId, PromQL with Grafana variables) for every panel target."""
    return [
        (f"{panel['title']}/{target['refId']}", target["expr"])
        for panel in panels()
        for target in panel.get("targets", [])
    ]


def substitute_dashboard_variables(expr: str, job: str = "ime-bridge", rate_interval: str = "1m") -> str:
    """A dashboard expression as Grafana would send it, for one job and every instance."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$job", job)
        .replace("$instance", ".+")
        .replace("${datasource}", "")
    )


def variable_queries() -> list[tuple[str, str]]:
    """(variable, selector) of each `label_values(selector, label)` template variable."""
    found = []
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            assert query.startswith("label_values("), query
            assert query.endswith(")"), query
            found.append((variable["name"], query.removeprefix("label_values(").rsplit(",", 1)[0]))
    return found


def metric_names(promql: ModuleType, expr: str) -> set[str]:
    """Metric names an expression selects, from its syntax tree."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)

    promql.walk(promql.parse(expr), visit)
    return names


# --- static checks -----------------------------------------------------------------------------------


def test_metric_name_extraction_sees_every_selector() -> None:
    """The extractor finds names in nested calls, binary operations and __name__ matchers."""
    promql = _promql()
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / on () b unless {__name__="c"} > bool 1'
    assert metric_names(promql, expr) == {"a_bucket", "b", "c"}


def test_registry_names_include_suffixed_series() -> None:
    """Counters, histograms and infos expose their suffixed series names."""
    names = exported_metric_names()
    assert {
        "ime_bridge_messages_received_total",
        "ime_bridge_exchange_lag_seconds_bucket",
        "ime_bridge_exchange_lag_seconds_count",
        "ime_bridge_build_info",
        "ime_bridge_ready",
        "process_cpu_seconds_total",
    } <= names
    assert "ime_bridge_messages_received" not in names


@pytest.mark.parametrize(
    ("source", "expressions"), [("rules", alert_expressions), ("dashboard", dashboard_expressions)]
)
def test_expressions_use_only_defined_metrics(source: str, expressions: Callable[[], list[tuple[str, str]]]) -> None:
    """Every rule and panel expression parses and uses only metrics the bridge defines."""
    promql = _promql()
    allowed = allowed_metric_names()
    found = expressions()
    assert found, f"no expressions in the {source}"
    for where, expr in found:
        names = metric_names(promql, substitute_dashboard_variables(expr))
        assert names or where in recording_rules(), f"{source} {where}: selects no metric"
        unknown = names - allowed
        assert not unknown, f"{source} {where}: not defined in bridge/metrics.py: {sorted(unknown)}"


def test_variable_queries_use_defined_metrics() -> None:
    """The dashboard's job/instance variables ask a metric the bridge exports."""
    promql = _promql()
    queries = variable_queries()
    assert {name for name, _ in queries} == {"job", "instance"}
    for name, selector in queries:
        assert metric_names(promql, substitute_dashboard_variables(selector)) <= allowed_metric_names(), name


def test_every_bridge_metric_is_charted() -> None:
    """Each ime_bridge_* metric appears on a panel; awaited metrics are still missing from the bridge."""
    promql = _promql()
    exported = exported_metric_names()
    families = {name for name in exported if name.startswith("ime_bridge_") and not name.endswith("_created")}
    charted: set[str] = set()
    for _, expr in dashboard_expressions():
        charted |= metric_names(promql, substitute_dashboard_variables(expr))
    histograms = {name.removesuffix("_bucket") for name in charted if name.endswith("_bucket")}
    uncharted = {
        name for name in families - charted - set(NOT_CHARTED) if not any(name.startswith(h) for h in histograms)
    }
    assert not uncharted, f"add a panel to {DASHBOARD.name} for {sorted(uncharted)}"
    landed = {name for name in AWAITED_METRICS if name in exported}
    assert not landed, f"now defined, add: {[AWAITED_METRICS[name] for name in landed]}"


def test_alerts_have_runbook_descriptions() -> None:
    """Each alert has a severity, a summary and a description that reads as a runbook."""
    alerts = [rule for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 15
    assert len({rule["alert"] for rule in alerts}) == len(alerts)
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        description = rule["annotations"]["description"]
        for section in ("Impact:", "Check:", "Fix:"):
            assert section in description, f"{rule['alert']}: no {section!r} in its description"
        assert 'job="ime-bridge"' in rule["expr"], f"{rule['alert']} does not select job ime-bridge"


def test_issue_alerts_are_all_there() -> None:
    """The alerts the deploy issue asks for (quarantine waits for its metric: AWAITED_METRICS)."""
    names = {rule.get("alert") for group in _rules()["groups"] for rule in group["rules"]}
    assert {
        "ImeBridgeDown",
        "ImeBridgeNotScraped",
        "ImeBridgeNoDataDuringTradingHours",
        "ImeBridgeReconnectStorm",
        "ImeBridgeAuthRejected",
        "ImeBridgeContractRejected",
        "ImeBridgeExchangeLagHigh",
        "ImeBridgePublishLatencyHigh",
        "ImeBridgeProduceErrors",
        "ImeBridgeDeadLettersRising",
        "ImeBridgeBufferNearCapacity",
        "ImeBridgeSpoolGrowing",
        "ImeBridgeTokenRefreshFailing",
        "ImeBridgeStaticTokenExpiresSoon",
    } <= names


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """ime-bridge-rules.test.yaml has, for each alert, a case where it fires and one where it does not."""
    cases = [
        check
        for path in (RULE_TESTS, TRADING_HOURS_TESTS)
        for test in yaml.safe_load(path.read_text("utf-8"))["tests"]
        for check in test.get("alert_rule_test", [])
    ]
    alerts = {rule["alert"] for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule}
    fires = {check["alertname"] for check in cases if check.get("exp_alerts")}
    quiet = {check["alertname"] for check in cases if not check.get("exp_alerts")}
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_dashboard_structure() -> None:
    """Datasource variable on every panel and query, units set, unique ids, no overlapping panels."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
        assert panel.get("description"), f"{panel['title']} has no description"
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert "$job" in target["expr"], panel["title"]
            assert "$instance" in target["expr"], panel["title"]


def test_dashboard_shows_the_issue_topics() -> None:
    """Throughput in and out, rejections, lag and latency quantiles, 1008s by reason, token expiry..."""
    by_title = {panel["title"]: [t["expr"] for t in panel.get("targets", [])] for panel in panels()}
    text = json.dumps(by_title)
    for metric in ("ime_bridge_messages_received_total", "ime_bridge_messages_published_total"):
        assert metric in " ".join(by_title["Throughput: frames in, records out"])
    for title in ("Exchange lag quantiles", "Publish latency quantiles"):
        assert [expr.split(",")[0] for expr in by_title[title]] == [
            "histogram_quantile(0.5",
            "histogram_quantile(0.9",
            "histogram_quantile(0.99",
        ]
    assert "by (endpoint, reason)" in " ".join(by_title["1008 closes by reason"])
    assert "by (reason)" in " ".join(by_title["Rejections by reason"])
    for metric in (
        "ime_bridge_token_expiry_timestamp_seconds",
        "ime_bridge_spool_bytes",
        "ime_bridge_produce_errors_total",
    ):
        assert metric in text


# --- promtool ----------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the rules file."""
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules`: every alert fires and stays quiet where its unit tests say."""
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name, TRADING_HOURS_TESTS.name],
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


# --- a real Prometheus server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def populate(metrics: Metrics) -> None:
    """Give every metric a series, as a bridge in spool mode that has seen some traffic would."""
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
    metrics.undelivered_at_shutdown.set(0)


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
            trading = await query("ime_bridge:trading_hours")
            assert trading["data"]["result"][0]["value"][1] in {"0", "1"}
    finally:
        server.stop()
    assert server.process.returncode is not None


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
