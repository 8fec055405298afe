"""Alert rules (deploy/prometheus) and the Grafana dashboard (deploy/grafana), read statically.

Every expression parses as PromQL (promql-parser) and names only metrics bridge/metrics.py defines, the
process_* ones, `up`, or a recording rule of the rules file; every ime_bridge_* metric is charted; every alert
links its runbook section and a panel, and has a firing and a quiet promtool case. The expression helpers
(`alert_expressions`, `dashboard_expressions`, `substitute_dashboard_variables`) serve the component and
integration layers' tests too.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from prometheus_client import CollectorRegistry

from bridge.app import Bridge
from bridge.config import Settings
from bridge.metrics import Metrics
from tests.support.harness import ime_settings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.test.yaml"
SESSION_TESTS = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.sessions.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE = "https://runbooks.example.com/ime-bridge/runbook.md#"
DASHBOARD_BASE = "https://grafana.example.com/d/ime-bridge/ime-bridge?"
DASHBOARD = ROOT / "deploy" / "grafana" / "ime-bridge-dashboard.json"

# Metrics the issue's alerts and panels need that bridge/metrics.py does not define yet. When one lands,
# test_every_bridge_metric_is_charted fails until it has its panel (and alert).
AWAITED_METRICS: dict[str, str] = {}
# Bridge metrics deliberately on no panel, with why.
NOT_CHARTED: dict[str, str] = {}
# Alerts about no single instance, whose dashboard link therefore names none: no target at all, or a group of
# coordinated replicas (summed over them).
NOT_PER_INSTANCE = {"ImeBridgeNotScraped", "ImeBridgeShardsUnowned"}


# --- tools -------------------------------------------------------------------------------------------


def _missing(what: str) -> None:
    """Fail under CI (the tool must be installed there), skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required tool missing under CI: {what}")
    pytest.skip(f"tool missing: {what}")


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
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url", "dashboard_url"}, rule["alert"]
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
        "ImeBridgeConnectionDown",
        "ImeBridgeConnectionSilent",
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


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the markdown's headings (lower case, spaces to dashes, punctuation dropped)."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add("".join(c for c in title.replace(" ", "-") if c.isalnum() or c in "-_"))
    return anchors


def test_every_alert_links_its_runbook_section_and_a_dashboard_panel() -> None:
    """runbook_url names a section of docs/runbook.md that says what it means, what to check and what to do;
    dashboard_url opens the dashboard on a panel that exists, for the alert's job and instance."""
    runbook = RUNBOOK.read_text("utf-8")
    anchors = _anchors(runbook)
    sections = {section.split("\n", 1)[0].strip(): section for section in runbook.split("\n## ")[1:]}
    panel_ids = {str(panel["id"]) for panel in panels()}
    for rule in (rule for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule):
        alert, annotations = rule["alert"], rule["annotations"]
        assert annotations["runbook_url"] == RUNBOOK_BASE + alert.lower(), alert
        assert alert.lower() in anchors, f"docs/runbook.md has no section {alert}"
        for part in ("**Means:**", "**Check:**", "**Do:**"):
            assert part in sections[alert], f"docs/runbook.md {alert}: no {part}"
        url = annotations["dashboard_url"]
        assert url.startswith(DASHBOARD_BASE + "var-job=ime-bridge"), alert
        assert url.rsplit("viewPanel=", 1)[1] in panel_ids, f"{alert}: {url} names no panel"
        assert ("var-instance={{ $labels.instance }}" in url) == (alert not in NOT_PER_INSTANCE), alert


def test_anchor_reader_follows_github() -> None:
    """The anchor check above reads headings as GitHub does, so a test of a missing section can fail."""
    assert _anchors("# Runbook\n## ImeBridgeDown\ntext\n### What it means, and why\n") == {
        "runbook",
        "imebridgedown",
        "what-it-means-and-why",
    }


def test_coordination_alerts_and_panels() -> None:
    """Issue 14: unowned shards page (summed per group of replicas, only with coordination on), undelivered
    handover records warn, and the dashboard charts shards per replica and against the configured count,
    rebalances, the p99 handover time by direction, undelivered records and dropped duplicates."""
    rules = {rule["alert"]: rule for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule}
    unowned = rules["ImeBridgeShardsUnowned"]
    assert (unowned["labels"]["severity"], unowned["for"]) == ("critical", "1m")
    assert "sum by (job, namespace, service) (ime_bridge_owned_shards" in unowned["expr"]
    assert 'ime_bridge_coordination_shards{job="ime-bridge"} > 0' in unowned["expr"]
    assert "instance" not in unowned["expr"]
    undelivered = rules["ImeBridgeHandoverUndelivered"]
    assert undelivered["labels"]["severity"] == "warning"
    assert "ime_bridge_handover_undelivered_records" in undelivered["expr"]
    by_title = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", [])) for panel in panels()}
    assert "sum by (instance) (ime_bridge_owned_shards" in by_title["Owned shards by replica"]
    against = by_title["Owned shards against configured"]
    assert "sum(ime_bridge_owned_shards" in against
    assert "max(ime_bridge_coordination_shards" in against
    assert "ime_bridge_rebalances_total" in by_title["Rebalances"]
    assert by_title["Handover time p99 by direction"].startswith(
        "histogram_quantile(0.99, sum by (le, direction) (rate(ime_bridge_handover_seconds_bucket"
    )
    assert "ime_bridge_handover_undelivered_records" in by_title["Undelivered records at handover"]
    assert "ime_bridge_handover_duplicates_dropped_total" in by_title["Handover duplicates dropped"]
    panel_ids = {panel["title"]: str(panel["id"]) for panel in panels()}
    assert unowned["annotations"]["dashboard_url"].endswith(f"viewPanel={panel_ids['Owned shards against configured']}")


def test_session_alerts_ask_the_bridge_calendar_not_the_clock() -> None:
    """No clock arithmetic in PromQL: session-bound alerts use ime_bridge_trading_session_open."""
    for where, expr in alert_expressions():
        for clock in ("hour()", "minute()", "day_of_week()"):
            assert clock not in expr, f"{where} computes trading hours itself"
    by_name = {rule["alert"]: rule["expr"] for group in _rules()["groups"] for rule in group["rules"]}
    for alert in ("ImeBridgeNoDataDuringTradingHours", "ImeBridgeConnectionSilent"):
        assert "ime_bridge_trading_session_open" in by_name[alert], alert
    assert "ime_bridge_connection_up" in by_name["ImeBridgeConnectionDown"]
    assert "ime_bridge_last_message_timestamp_seconds" in by_name["ImeBridgeConnectionSilent"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """ime-bridge-rules.test.yaml has, for each alert, a case where it fires and one where it does not."""
    cases = [
        check
        for path in (RULE_TESTS, SESSION_TESTS)
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
    quantiles = ["histogram_quantile(0.5", "histogram_quantile(0.9", "histogram_quantile(0.99"]
    # Beside the latency, Kafka's share of it: the publish rounds' p99.
    for title, extra in (("Exchange lag quantiles", []), ("Publish latency quantiles", ["histogram_quantile(0.99"])):
        assert [expr.split(",")[0] for expr in by_title[title]] == quantiles + extra
    assert "ime_bridge_publish_round_seconds_bucket" in by_title["Publish latency quantiles"][3]
    assert "by (endpoint, reason)" in " ".join(by_title["1008 closes by reason"])
    assert "by (reason)" in " ".join(by_title["Rejections by reason"])
    for metric in (
        "ime_bridge_token_expiry_timestamp_seconds",
        "ime_bridge_spool_bytes",
        "ime_bridge_produce_errors_total",
    ):
        assert metric in text


# --- gauges the bridge keeps current by itself ------------------------------------------------------------


def _bridge(**ime: Any) -> Bridge:
    return Bridge(Settings(ime=ime_settings("http://127.0.0.1:9", holiday_calendar=None, **ime)))


def test_bridge_sets_ready_and_session_gauges_without_anyone_asking_readyz() -> None:
    """The bridge's own tick (Bridge._refresh_gauges, every second) sets ime_bridge_ready and
    ime_bridge_trading_session_open; before Kafka answers, not ready."""
    bridge = _bridge(trading_sessions=["sat-fri 00:00-24:00"])
    registry = bridge.metrics.registry
    bridge.metrics.ready.set(1)  # a stale value the tick must overwrite
    bridge._refresh_gauges()
    assert registry.get_sample_value("ime_bridge_ready") == 0
    assert registry.get_sample_value("ime_bridge_trading_session_open") == 1


def test_session_gauge_is_zero_on_a_holiday() -> None:
    """A holiday closes the calendar the gauge follows, even on a day whose session spans it all."""
    today = datetime.now(UTC).astimezone(ZoneInfo("Asia/Tehran")).date()
    tomorrow = today + timedelta(days=1)  # in case the day turns between the two lines
    bridge = _bridge(trading_sessions=["sat-fri 00:00-24:00"], holidays=[today, tomorrow])
    bridge._refresh_gauges()
    assert bridge.metrics.registry.get_sample_value("ime_bridge_trading_session_open") == 0
