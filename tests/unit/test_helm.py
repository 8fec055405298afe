"""The Helm chart helm/ime-bridge, rendered and linted by the Helm engine of the `helm-python-sdk` wheel.

Every rendered manifest, the `helm test` pod included, is validated offline by `kubernetes-validate --strict`
against Kubernetes 1.30 (tests/component/test_helm.py), except the Prometheus Operator's custom resources
(ServiceMonitor, PrometheusRule), for which it has no schema: those are checked structurally here, and the
PrometheusRule's groups with `promtool check rules`. The chart is also packaged by the same engine (`helm
package`) and rendered from the archive; the README's install example is rendered as written.
A missing tool fails the test under CI=true and skips it elsewhere, saying which.
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import hashlib
import importlib
import json
import math
import os
import re
import shlex
import shutil
import tarfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from bridge.config import (
    BufferSettings,
    ConfigError,
    CoordinationSettings,
    ImeSettings,
    KafkaSettings,
    LogSettings,
    MetricsSettings,
    Settings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ime-bridge"
ALL_ENABLED = CHART / "ci" / "all-enabled-values.yaml"
RULES = ROOT / "deploy" / "prometheus" / "ime-bridge-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ime-bridge-dashboard.json"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "md", "market-data"
FULLNAME = "md-ime-bridge"
SECRET_ENV = (
    "IME_BRIDGE_IME__PASSWORD",
    "IME_BRIDGE_IME__TOKEN",
    "IME_BRIDGE_KAFKA__SASL_PASSWORD",
    "IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD",
    "IME_BRIDGE_KAFKA__SASL_OAUTH_CLIENT_SECRET",
    "IME_BRIDGE_KAFKA__SSL_KEY_PASSWORD",
)
Manifest = dict[str, Any]


# --- tools -------------------------------------------------------------------------------------------


def _missing(what: str) -> None:
    """Fail under CI (the tool must be installed there), skip elsewhere."""
    message = f"{what} (make test installs it: pip install -e '.[dev]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"required tool missing under CI: {message}")
    pytest.skip(f"tool missing: {message}")


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"Python package {package}")
        raise  # unreachable: _missing raises


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    """The helm_python module (Helm v4 embedded, no helm binary)."""
    module = _module("helm_python", "helm-python-sdk")
    module.disable_logging()
    return module


# --- rendering ---------------------------------------------------------------------------------------


def all_enabled_values() -> dict[str, Any]:
    """The values that switch every optional part on."""
    values: dict[str, Any] = yaml.safe_load(ALL_ENABLED.read_text("utf-8"))
    return values


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in, recursively (a copy)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def render_files(helm: ModuleType, values: dict[str, Any] | None = None, *, chart: Path = CHART) -> dict[str, str]:
    """Template path → rendered text, as `helm template md <chart> --namespace market-data` gives."""
    with helm.Chart.load(chart) as loaded:
        files: dict[str, str] = loaded.render(values, name=RELEASE, namespace=NAMESPACE)
    return files


def render(helm: ModuleType, values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every rendered Kubernetes object, the `helm test` pod included (as `helm template` gives it)."""
    manifests: list[Manifest] = []
    for path, text in sorted(render_files(helm, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The single object of `kind` (and `name`)."""
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def workload(manifests: list[Manifest]) -> Manifest:
    """The Deployment or the StatefulSet."""
    found = [m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [m["kind"] for m in found]
    return found[0]


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    """The pod spec of the workload."""
    spec: dict[str, Any] = workload(manifests)["spec"]["template"]["spec"]
    return spec


def container(manifests: list[Manifest]) -> dict[str, Any]:
    """The bridge's container."""
    containers = pod_spec(manifests)["containers"]
    assert [c["name"] for c in containers] == ["ime-bridge"]
    first: dict[str, Any] = containers[0]
    return first


def config_text(manifests: list[Manifest]) -> str:
    """The bridge's config file as the ConfigMap holds it."""
    text: str = one(manifests, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    return text


VARIANTS = {
    "defaults": None,
    "all-enabled": all_enabled_values(),
    "existing-secret": merged(all_enabled_values(), {"credentials": {"existingSecret": "ime-credentials"}}),
    "deployment-with-credentials": {
        "credentials": {"imeToken": "header.payload.signature"},
        "config": {"ime": {"contract_ids": ["1001"]}},
    },
    "replicas": {
        "replicaCount": 3,
        "credentials": {"imeToken": "header.payload.signature"},
        "config": {"ime": {"contract_ids": ["1001", "1002", "1003"]}},
    },
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    """One named set of values."""
    name: str = request.param
    return name, VARIANTS[name]


# --- lint and render ---------------------------------------------------------------------------------


def test_chart_passes_strict_lint(helm: ModuleType, variant: tuple[str, dict[str, Any] | None]) -> None:
    """`helm lint --strict --kube-version v1.30.0` finds no warning or error."""
    _, values = variant
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems, problems
    assert not report["errors"], report["errors"]
    infos = {m["error"] for m in report["messages"]}
    assert infos <= {"icon is recommended"}, infos


def test_lint_reports_a_broken_values_file(helm: ModuleType) -> None:
    """The linter is really looking: a wrong type is an error."""
    report = helm.lint(CHART, {"service": {"port": "metrics"}}, strict=True)
    assert report["errors"], report


def test_default_render_is_a_deployment_with_its_companions(helm: ModuleType) -> None:
    """Defaults: ConfigMap, Service, ServiceAccount, Deployment and the `helm test` Pod, no optional part."""
    kinds = sorted(m["kind"] for m in render(helm))
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Service", "ServiceAccount"]


def test_all_enabled_render_has_every_part(helm: ModuleType) -> None:
    """Every optional part on: a StatefulSet with a spool claim replaces the Deployment."""
    manifests = render(helm, all_enabled_values())
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "NetworkPolicy",
            "Pod",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "StatefulSet",
        ]
    )
    statefulset = one(manifests, "StatefulSet")
    headless = one(manifests, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    mounts = {m["name"]: m["mountPath"] for m in container(manifests)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/ime-bridge/spool"
    assert yaml.safe_load(config_text(manifests))["buffer"]["spool_dir"] == "/var/lib/ime-bridge/spool"


def test_spool_mode_requires_persistence(helm: ModuleType) -> None:
    """`overflow: spool` without a persistent volume fails the rendering, naming both keys."""
    with pytest.raises(helm.HelmRenderError, match=r"overflow: spool needs persistence\.enabled"):
        render(helm, {"config": {"buffer": {"overflow": "spool"}}})


# --- the Prometheus Operator's resources, structurally -----------------------------------------------


def test_service_monitor_scrapes_the_metrics_service_as_job_ime_bridge(helm: ModuleType) -> None:
    """The ServiceMonitor selects the metrics Service, its port, and names the job the rules select."""
    manifests = render(helm, all_enabled_values())
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service", FULLNAME)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "namespaceSelector", "endpoints"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert service["metadata"]["labels"][spec["jobLabel"]] == "ime-bridge"
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])
    assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["scrapeTimeout"])
    assert endpoint["metricRelabelings"][0]["action"] == "drop"


def test_prometheus_rule_without_rule_labels_is_the_plain_file_verbatim(helm: ModuleType) -> None:
    """With no ruleLabels the chart adds nothing to the rules."""
    manifests = render(helm, {"prometheusRule": {"enabled": True}})
    assert one(manifests, "PrometheusRule")["spec"]["groups"] == yaml.safe_load(RULES.read_text("utf-8"))["groups"]


def _rendered_alerts(helm: ModuleType, rule_values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    manifests = render(helm, {"prometheusRule": {"enabled": True, **rule_values}})
    groups = one(manifests, "PrometheusRule")["spec"]["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _plain_alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text("utf-8"))["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_prometheus_rule_values_set_job_links_for_thresholds_and_labels(helm: ModuleType) -> None:
    """prometheusRule.job, runbookUrl, grafanaUrl and alerts.<name> reach the rendered rules and only those."""
    alerts = _rendered_alerts(
        helm,
        {
            "job": "md-bridge",
            "runbookUrl": "https://wiki.example.org/ime/runbook.md",
            "grafanaUrl": "https://grafana.example.org/",
            "ruleLabels": {"team": "market-data"},
            "alerts": {
                "ImeBridgeReconnectStorm": {"threshold": 25, "for": "20m", "labels": {"severity": "critical"}},
                "ImeBridgeDeadLettersRising": {"threshold": 0.05},
                "ImeBridgeConnectionSilent": {"threshold": 300, "for": "30m"},
                "ImeBridgeStaticTokenExpiresSoon": {"threshold": 172800},
            },
        },
    )
    plain = _plain_alerts()
    assert alerts.keys() == plain.keys()
    for name, rule in alerts.items():
        assert 'job="ime-bridge"' not in rule["expr"], name
        assert 'job="md-bridge"' in rule["expr"], name
        assert rule["annotations"]["runbook_url"] == f"https://wiki.example.org/ime/runbook.md#{name.lower()}"
        dashboard = rule["annotations"]["dashboard_url"]
        assert dashboard.startswith("https://grafana.example.org/d/ime-bridge/ime-bridge?var-job=md-bridge"), name
        assert rule["labels"]["team"] == "market-data", name
    storm = alerts["ImeBridgeReconnectStorm"]
    assert "> 25  # threshold" in storm["expr"]
    assert "> 10" not in storm["expr"]
    assert (storm["for"], storm["labels"]["severity"]) == ("20m", "critical")
    assert "> 0.05  # threshold" in alerts["ImeBridgeDeadLettersRising"]["expr"]
    silent = alerts["ImeBridgeConnectionSilent"]
    assert "> 300)  # threshold" in silent["expr"]
    assert silent["for"] == "30m"
    assert "< 172800)  # threshold" in alerts["ImeBridgeStaticTokenExpiresSoon"]["expr"]
    untouched = alerts["ImeBridgeBufferNearCapacity"]
    assert untouched["expr"] == plain["ImeBridgeBufferNearCapacity"]["expr"].replace("ime-bridge", "md-bridge")
    assert untouched["for"] == plain["ImeBridgeBufferNearCapacity"]["for"]


def test_every_marked_threshold_can_be_set(helm: ModuleType) -> None:
    """Each alert whose expression marks a threshold takes a new one, and its expression still parses."""
    promql = importlib.import_module("promql_parser")
    marked = [name for name, rule in _plain_alerts().items() if "# threshold" in rule["expr"]]
    assert len(marked) >= 12
    alerts = _rendered_alerts(helm, {"alerts": {name: {"threshold": 4242} for name in marked}})
    for name in marked:
        assert "4242" in alerts[name]["expr"], name
        promql.parse(alerts[name]["expr"])


@pytest.mark.parametrize(
    ("tuning", "error"),
    [
        ({"ImeBridgeNoSuchAlert": {"for": "5m"}}, r"prometheusRule\.alerts\.ImeBridgeNoSuchAlert: no such alert"),
        ({"ImeBridgeDown": {"threshold": 3}}, r"prometheusRule\.alerts\.ImeBridgeDown\.threshold: the rule has no"),
    ],
    ids=["unknown-alert", "no-threshold"],
)
def test_prometheus_rule_tuning_mistakes_fail_the_render(helm: ModuleType, tuning: dict[str, Any], error: str) -> None:
    """A misspelt alert name or a threshold for a rule without one is an error, not silently ignored."""
    with pytest.raises(helm.HelmRenderError, match=error):
        render(helm, {"prometheusRule": {"enabled": True, "alerts": tuning}})


def test_grafana_dashboard_configmap_holds_the_plain_dashboard(helm: ModuleType) -> None:
    """The dashboard ConfigMap is labelled for the Grafana sidecar and holds deploy/grafana's JSON."""
    manifests = render(helm, all_enabled_values())
    configmap = one(manifests, "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Market data"}
    assert json.loads(configmap["data"]["ime-bridge.json"]) == json.loads(DASHBOARD.read_text("utf-8"))


CHART_FILES = sorted(path.name for path in (CHART / "files").iterdir())


def test_the_chart_ships_the_monitoring_files() -> None:
    """files/ holds the rules and the dashboard the templates read (so the test below has something to compare)."""
    assert {"ime-bridge-rules.yaml", "ime-bridge-dashboard.json"} <= set(CHART_FILES)


@pytest.mark.parametrize("name", CHART_FILES)
def test_chart_file_is_a_regular_copy_of_its_deploy_counterpart(name: str) -> None:
    """Each file in files/ is a regular file (GitOps sources may skip symlinks) equal to deploy/'s file of that name."""
    path = CHART / "files" / name
    assert not path.is_symlink(), f"{path} must be a regular file, not a link"
    assert path.is_file(), f"{path} must be a regular file"
    sources = sorted((ROOT / "deploy").rglob(name))
    assert len(sources) == 1, f"expected one deploy/**/{name}, found {sources}"
    source = sources[0]
    assert path.read_bytes() == source.read_bytes(), (
        f"{path.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: deploy/ is the original, "
        f"copy it: cp {source.relative_to(ROOT)} {path.relative_to(ROOT)}"
    )


# --- packaging: `helm package`, then install from the archive -------------------------------------


def helmignore_patterns() -> list[str]:
    """The patterns of the chart's .helmignore."""
    lines = (CHART / ".helmignore").read_text("utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!") or "/" in p.rstrip("/")], "only simple patterns expected"
    return patterns


def helmignored(relative: Path, patterns: list[str]) -> bool:
    """Whether Helm's loader skips this chart file: a `dir/` pattern matches a directory on its path, any other
    pattern the file's name (the only forms .helmignore uses, as helmignore_patterns checks)."""
    for pattern in patterns:
        if pattern.endswith("/"):
            if any(fnmatch.fnmatchcase(part, pattern[:-1]) for part in relative.parts[:-1]):
                return True
        elif fnmatch.fnmatchcase(relative.name, pattern):
            return True
    return False


def chart_tree(directory: Path) -> dict[str, bytes]:
    """The chart's files as an archive of it names them (`ime-bridge/...`), less what .helmignore ignores."""
    patterns = helmignore_patterns()
    return {
        f"ime-bridge/{path.relative_to(directory).as_posix()}": path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not helmignored(path.relative_to(directory), patterns)
    }


def archive_tree(archive: Path) -> dict[str, bytes]:
    """The regular files of a chart archive; anything else in it (a link, a device) fails the test."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            assert member.isfile(), f"{member.name} is not a regular file in {archive.name}"
            extracted = tar.extractfile(member)
            assert extracted is not None
            out[member.name] = extracted.read()
    return out


@pytest.fixture(scope="module")
def packaged(helm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart packaged by the Helm engine (`helm package helm/ime-bridge`)."""
    archive = Path(helm.package(CHART, destination=tmp_path_factory.mktemp("package")))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text("utf-8"))
    assert archive.name == f"ime-bridge-{chart['version']}.tgz"
    return archive


def test_package_holds_the_chart_directory_less_what_helmignore_ignores(packaged: Path) -> None:
    """One top folder `ime-bridge/`, regular files only, each with the directory's bytes (Chart.yaml re-serialized)."""
    packed, tree = archive_tree(packaged), chart_tree(CHART)
    assert set(packed) == set(tree)
    assert {"ime-bridge/templates/tests/test-endpoints.yaml", "ime-bridge/files/ime-bridge-rules.yaml"} <= set(packed)
    chart_yaml = "ime-bridge/Chart.yaml"
    assert yaml.safe_load(packed.pop(chart_yaml)) == yaml.safe_load(tree.pop(chart_yaml))
    assert [name for name in tree if packed[name] != tree[name]] == []


def test_package_leaves_out_what_helmignore_names(helm: ModuleType, tmp_path: Path) -> None:
    """Editor and VCS leftovers beside the chart stay out of the archive (a stray template would even render)."""
    copy_dir = tmp_path / "ime-bridge"
    shutil.copytree(CHART, copy_dir)
    leftovers = ["values.yaml.bak", "templates/workload.yaml.swp", "templates/stray.yaml~", ".idea/workspace.xml"]
    for name in leftovers:
        (copy_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (copy_dir / name).write_text("kind: ConfigMap\n", "utf-8")
        assert helmignored(Path(name), helmignore_patterns()), name
    packed = archive_tree(Path(helm.package(copy_dir, destination=tmp_path)))
    assert set(packed) == set(chart_tree(CHART))


def test_packaged_chart_renders_as_the_directory_does(
    helm: ModuleType, packaged: Path, variant: tuple[str, dict[str, Any] | None]
) -> None:
    """Installing from the .tgz renders what installing from the directory renders, test pod included."""
    _, values = variant
    from_archive = render_files(helm, values, chart=packaged)
    assert from_archive == render_files(helm, values)
    assert "ime-bridge/templates/tests/test-endpoints.yaml" in from_archive


def test_packaged_chart_passes_strict_lint(helm: ModuleType, packaged: Path) -> None:
    """`helm lint --strict` of the archive, with every part on, finds nothing the directory's lint would not."""
    report = helm.lint(packaged, all_enabled_values(), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report["errors"]
    assert {m["error"] for m in report["messages"]} <= {"icon is recommended"}, report["messages"]


# --- security ----------------------------------------------------------------------------------------

ALLOWED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks the restricted Pod Security Standard (Kubernetes 1.30's checks)."""
    problems = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} is set")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} has a disallowed type {kinds}")
    pod_context = pod.get("securityContext", {})
    if pod_context.get("runAsUser") == 0:
        problems.append("pod runs as uid 0")
    pod_seccomp = pod_context.get("seccompProfile", {}).get("type")
    containers = pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
    for entry in containers:
        context = entry.get("securityContext", {})
        name = entry["name"]
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser") == 0:
            problems.append(f"{name}: runs as uid 0")
        if context.get("seccompProfile", {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile is neither RuntimeDefault nor Localhost")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities are not all dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        for port in entry.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


def test_restricted_checker_finds_violations() -> None:
    """The checker itself reports what it should."""
    pod = {
        "hostNetwork": True,
        "volumes": [{"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}}],
        "containers": [{"name": "c", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}}],
    }
    problems = restricted_violations(pod)
    assert len(problems) == 8, problems


def test_pod_meets_the_restricted_pod_security_standard(
    helm: ModuleType, variant: tuple[str, dict[str, Any] | None]
) -> None:
    """Restricted PSS, a read-only root filesystem with /tmp writable, no service account token."""
    _, values = variant
    manifests = render(helm, values)
    pod = pod_spec(manifests)
    assert restricted_violations(pod) == []
    context = container(manifests)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    mounts = {m["mountPath"]: m["name"] for m in container(manifests)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert one(manifests, "ServiceAccount")["automountServiceAccountToken"] is False


def test_image_user_is_the_chart_user(helm: ModuleType) -> None:
    """The chart runs as the numeric user the Dockerfile's final stage sets."""
    final_stage = (ROOT / "Dockerfile").read_text("utf-8").rsplit("\nFROM ", 1)[1]
    match = re.search(r"^USER (\d+):(\d+)$", final_stage, re.MULTILINE)
    assert match, "the final stage sets no numeric USER uid:gid"
    pod_context = pod_spec(render(helm))["securityContext"]
    assert (pod_context["runAsUser"], pod_context["runAsGroup"]) == (int(match[1]), int(match[2]))


# --- probes, ports, rollout --------------------------------------------------------------------------


def test_probes_use_the_health_endpoints_on_the_metrics_port(helm: ModuleType) -> None:
    """Startup and liveness on /healthz, readiness on /readyz, all on the port the bridge's config binds."""
    values = {"config": {"metrics": {"port": 9200}}}
    manifests = render(helm, values)
    bridge = container(manifests)
    (port,) = bridge["ports"]
    assert port == {"name": "metrics", "containerPort": 9200, "protocol": "TCP"}
    assert bridge["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert bridge["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert bridge["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    for probe in (bridge["livenessProbe"], bridge["readinessProbe"]):
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    startup = bridge["startupProbe"]
    assert startup["timeoutSeconds"] <= startup["periodSeconds"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 60  # the budget values.yaml documents
    assert yaml.safe_load(config_text(manifests))["metrics"] == {"host": "0.0.0.0", "port": 9200}
    (service_port,) = one(manifests, "Service", FULLNAME)["spec"]["ports"]
    assert service_port["targetPort"] == "metrics"
    assert bridge["args"] == ["--config", "/etc/ime-bridge/config.yaml"]
    mounts = {m["name"]: m for m in bridge["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/ime-bridge"


def test_startup_probe_takes_its_values(helm: ModuleType) -> None:
    """startupProbe's timing comes from values; a zero failure threshold is refused by the schema."""
    timing = {"initialDelaySeconds": 3, "periodSeconds": 5, "timeoutSeconds": 4, "failureThreshold": 24}
    startup = container(render(helm, {"startupProbe": timing}))["startupProbe"]
    assert startup == {"httpGet": {"path": "/healthz", "port": "metrics"}, **timing}
    with pytest.raises(helm.HelmValuesError):
        render(helm, {"startupProbe": {"failureThreshold": 0}})


def test_extra_env_from_is_passed_through_after_the_variables(helm: ModuleType) -> None:
    """extraEnvFrom becomes the container's envFrom as given; the credentials stay in `env` (which wins)."""
    assert "envFrom" not in container(render(helm))
    sources = [{"secretRef": {"name": "ime-bridge-env"}}, {"configMapRef": {"name": "overrides"}, "prefix": "X_"}]
    bridge = container(render(helm, {"extraEnvFrom": sources, "credentials": {"imeToken": "a.b.c"}}))
    assert bridge["envFrom"] == sources
    assert [e["name"] for e in bridge["env"]] == ["IME_BRIDGE_IME__TOKEN"]


def test_topology_spread_constraints_select_every_ime_bridge_pod_unless_told(helm: ModuleType) -> None:
    """A constraint without labelSelector selects the pods of every ime-bridge release; a given one is kept."""
    assert "topologySpreadConstraints" not in pod_spec(render(helm))
    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    own = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}},
    }
    manifests = render(helm, {"topologySpreadConstraints": [zone, own]})
    filled, kept = pod_spec(manifests)["topologySpreadConstraints"]
    assert filled == {**zone, "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "ime-bridge"}}}
    assert kept == own
    pod_labels = workload(manifests)["spec"]["template"]["metadata"]["labels"]
    assert filled["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    with helm.Chart.load(CHART) as chart:
        other = chart.render({"topologySpreadConstraints": [zone]}, name="md-east", namespace=NAMESPACE)
    other_workload = yaml.safe_load(other["ime-bridge/templates/workload.yaml"])
    (constraint,) = other_workload["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint == filled  # the same selector in another release: the releases spread across one another
    with pytest.raises(helm.HelmValuesError):
        render(helm, {"topologySpreadConstraints": [{"maxSkew": 1}]})


def test_checksum_annotation_follows_the_config_file(helm: ModuleType) -> None:
    """checksum/config is the SHA-256 of the config file: it changes with it, and only with it."""

    def checksum(values: dict[str, Any] | None) -> tuple[str, str]:
        manifests = render(helm, values)
        annotations = workload(manifests)["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"], config_text(manifests)

    base, text = checksum(None)
    assert base == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    changed, _ = checksum({"config": {"log": {"level": "DEBUG"}}})
    unrelated, _ = checksum({"resources": {"limits": {"memory": "1Gi"}}})
    assert changed != base
    assert unrelated == base


def test_secret_checksum_rolls_pods_when_credentials_change(helm: ModuleType) -> None:
    """checksum/secret changes with the chart-created Secret's content."""

    def annotations(password: str) -> dict[str, str]:
        values = {"credentials": {"imePassword": password}}
        found: dict[str, str] = workload(render(helm, values))["spec"]["template"]["metadata"]["annotations"]
        return found

    first, second = annotations("one"), annotations("two")
    assert first["checksum/secret"] != second["checksum/secret"]
    assert first["checksum/config"] == second["checksum/config"]


def test_grace_period_is_derived_longer_than_the_shutdown_budget(helm: ModuleType) -> None:
    """Empty: ceil(shutdown_timeout_seconds) + 10; a set value must be longer than the budget."""

    def grace(values: dict[str, Any]) -> int:
        value: int = pod_spec(render(helm, values))["terminationGracePeriodSeconds"]
        return value

    assert grace({}) == math.ceil(Settings.model_fields["shutdown_timeout_seconds"].default) + 10
    assert grace({"config": {"shutdown_timeout_seconds": 45.5}}) == 56
    assert grace({"terminationGracePeriodSeconds": 21}) == 21
    for too_short in (20, 5):
        with pytest.raises(helm.HelmRenderError, match=r"must be longer than config\.shutdown_timeout_seconds"):
            render(helm, {"terminationGracePeriodSeconds": too_short})


# --- the `helm test` pod (templates/tests/) --------------------------------------------------------


def helm_test_pod(manifests: list[Manifest]) -> Manifest:
    """The Pod `helm test` runs."""
    return one(manifests, "Pod", f"{FULLNAME}-test")


def helm_test_selector_labels() -> dict[str, str]:
    """The labels the NetworkPolicy admits the test pod by."""
    return {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "helm-test"}


def helm_test_script(pod: Manifest) -> str:
    """The Python program the test pod runs (`python -c SCRIPT`)."""
    (check,) = pod["spec"]["containers"]
    interpreter, flag, script = check["command"]
    assert (interpreter, flag) == ("python", "-c")
    assert isinstance(script, str)
    return script


def test_helm_test_pod_checks_the_service_endpoints(helm: ModuleType) -> None:
    """A test hook that asks the release's Service for /readyz and /metrics, with the bridge's image."""
    values = merged(all_enabled_values(), {"service": {"port": 9300}, "tests": {"timeoutSeconds": 7}})
    manifests = render(helm, values)
    pod = helm_test_pod(manifests)
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert pod["metadata"]["annotations"] == {
        "helm.sh/hook": "test",
        "helm.sh/hook-delete-policy": "before-hook-creation",
    }
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (check,) = spec["containers"]
    bridge, bridge_pod = container(manifests), pod_spec(manifests)
    assert check["image"] == bridge["image"]
    assert check["image"].startswith("registry.example.com/market-data/ime-bridge@sha256:")
    assert spec["imagePullSecrets"] == bridge_pod["imagePullSecrets"]
    assert spec["serviceAccountName"] == bridge_pod["serviceAccountName"]
    assert spec["nodeSelector"] == bridge_pod["nodeSelector"]
    assert spec["tolerations"] == bridge_pod["tolerations"]
    service = one(manifests, "Service", FULLNAME)
    env = {e["name"]: e["value"] for e in check["env"]}
    assert env["BRIDGE_URL"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["BRIDGE_URL"] == f"http://{FULLNAME}:9300"
    assert env["TIMEOUT_SECONDS"] == "7"
    script = helm_test_script(pod)
    compile(script, "helm-test", "exec")  # valid Python; tests/component/test_helm_test_pod.py runs it
    assert '"/readyz"' in script
    assert '"/metrics"' in script


def test_helm_test_pod_is_hardened_like_the_bridge(
    helm: ModuleType, variant: tuple[str, dict[str, Any] | None]
) -> None:
    """Restricted Pod Security Standard, the bridge's security contexts, no token, bounded resources."""
    _, values = variant
    manifests = render(helm, values)
    pod = helm_test_pod(manifests)["spec"]
    assert restricted_violations(pod) == []
    (check,) = pod["containers"]
    assert check["securityContext"] == container(manifests)["securityContext"]
    assert check["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"] == pod_spec(manifests)["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert "volumes" not in pod
    assert check["resources"]["limits"]["memory"]


def test_no_selector_of_the_bridge_picks_the_test_pod(helm: ModuleType) -> None:
    """The Service, budget, policy and spread selectors match the bridge's pod and never the test pod."""
    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    manifests = render(helm, merged(all_enabled_values(), {"topologySpreadConstraints": [zone]}))
    test_labels = helm_test_pod(manifests)["metadata"]["labels"]
    bridge_labels = workload(manifests)["spec"]["template"]["metadata"]["labels"]
    assert helm_test_selector_labels().items() <= test_labels.items()
    assert not helm_test_selector_labels().items() <= bridge_labels.items()
    selectors = {
        "Service": one(manifests, "Service", FULLNAME)["spec"]["selector"],
        "workload": workload(manifests)["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": one(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        "topologySpread": pod_spec(manifests)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
    }
    for owner, selector in selectors.items():
        assert selector.items() <= bridge_labels.items(), owner
        assert not selector.items() <= test_labels.items(), f"the {owner} selector picks the test pod"


def test_tests_disabled_render_no_test_pod_and_no_policy_opening(helm: ModuleType) -> None:
    """tests.enabled: false leaves out the pod, the NetworkPolicy's way in for it and the NOTES' hint."""
    helm_test = f"helm test {RELEASE} --namespace {NAMESPACE} --logs"
    assert helm_test in render_files(helm)["ime-bridge/templates/NOTES.txt"]
    disabled = merged(all_enabled_values(), {"tests": {"enabled": False}})
    assert helm_test not in render_files(helm, disabled)["ime-bridge/templates/NOTES.txt"]
    manifests = render(helm, disabled)
    assert not [m for m in manifests if m["kind"] == "Pod"]
    (ingress,) = one(manifests, "NetworkPolicy")["spec"]["ingress"]
    assert [set(source) for source in ingress["from"]] == [{"namespaceSelector", "podSelector"}]


# --- secrets -----------------------------------------------------------------------------------------


def _env(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(manifests).get("env", [])}


def test_chart_created_secret_feeds_the_environment_never_the_configmap(helm: ModuleType) -> None:
    """Credentials land in the Secret and reach the bridge as IME_BRIDGE_* variables by reference."""
    password, sasl, registry = "s3cr3t-ime-password", "s3cr3t-sasl-password", "s3cr3t-registry-password"
    oauth, key_password = "s3cr3t-oauth-client-secret", "s3cr3t-key-password"
    credentials = {
        "imePassword": password,
        "kafkaSaslPassword": sasl,
        "schemaRegistryPassword": registry,
        "kafkaOauthClientSecret": oauth,
        "kafkaSslKeyPassword": key_password,
    }
    manifests = render(helm, merged(all_enabled_values(), {"credentials": credentials}))
    secret = one(manifests, "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "ime-password": password,
        "kafka-sasl-password": sasl,
        "schema-registry-password": registry,
        "kafka-oauth-client-secret": oauth,
        "kafka-ssl-key-password": key_password,
    }
    env = _env(manifests)
    assert set(SECRET_ENV) & set(env) == set(SECRET_ENV) - {"IME_BRIDGE_IME__TOKEN"}
    for name, key in (
        ("IME_BRIDGE_IME__PASSWORD", "ime-password"),
        ("IME_BRIDGE_KAFKA__SASL_PASSWORD", "kafka-sasl-password"),
        ("IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD", "schema-registry-password"),
        ("IME_BRIDGE_KAFKA__SASL_OAUTH_CLIENT_SECRET", "kafka-oauth-client-secret"),
        ("IME_BRIDGE_KAFKA__SSL_KEY_PASSWORD", "kafka-ssl-key-password"),
    ):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": key,
            "optional": False,
        }
    everything_but_the_secret = yaml.safe_dump([m for m in manifests if m["kind"] != "Secret"])
    for text in (password, sasl, registry, oauth, key_password, base64.b64encode(password.encode()).decode()):
        assert text not in everything_but_the_secret


def test_existing_secret_is_referenced_and_not_created(helm: ModuleType) -> None:
    """existingSecret: no Secret object; every variable references it, optionally, under its keys."""
    values = merged(
        all_enabled_values(),
        {"credentials": {"existingSecret": "ime-credentials", "existingSecretKeys": {"imeToken": "jwt"}}},
    )
    manifests = render(helm, values)
    assert not [m for m in manifests if m["kind"] == "Secret"]
    env = _env(manifests)
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in SECRET_ENV}
    assert refs == {
        "IME_BRIDGE_IME__PASSWORD": {"name": "ime-credentials", "key": "ime-password", "optional": True},
        "IME_BRIDGE_IME__TOKEN": {"name": "ime-credentials", "key": "jwt", "optional": True},
        "IME_BRIDGE_KAFKA__SASL_PASSWORD": {"name": "ime-credentials", "key": "kafka-sasl-password", "optional": True},
        "IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD": {
            "name": "ime-credentials",
            "key": "schema-registry-password",
            "optional": True,
        },
        "IME_BRIDGE_KAFKA__SASL_OAUTH_CLIENT_SECRET": {
            "name": "ime-credentials",
            "key": "kafka-oauth-client-secret",
            "optional": True,
        },
        "IME_BRIDGE_KAFKA__SSL_KEY_PASSWORD": {
            "name": "ime-credentials",
            "key": "kafka-ssl-key-password",
            "optional": True,
        },
    }
    assert "checksum/secret" not in workload(manifests)["spec"]["template"]["metadata"]["annotations"]


def test_no_credentials_no_secret_no_variables(helm: ModuleType) -> None:
    """Defaults: nothing secret is rendered (NOTES warns instead)."""
    files = render_files(helm)
    manifests = render(helm)
    assert not [m for m in manifests if m["kind"] == "Secret"]
    assert not set(_env(manifests)) & set(SECRET_ENV)
    assert "no IME credentials are configured" in files["ime-bridge/templates/NOTES.txt"]
    assert "no contracts are configured" in files["ime-bridge/templates/NOTES.txt"]


@pytest.mark.parametrize(
    "secret_in_config",
    [
        {"ime": {"password": "x"}},
        {"ime": {"token": "x"}},
        {"kafka": {"sasl_password": "x"}},
        {"kafka": {"sasl_oauth_client_secret": "x"}},
        {"kafka": {"ssl_key_password": "x"}},
    ],
    ids=lambda secret: ".".join([*secret, *next(iter(secret.values()))]),
)
def test_schema_keeps_secrets_out_of_the_config(helm: ModuleType, secret_in_config: dict[str, Any]) -> None:
    """A secret written under `config` is refused: it would land in the ConfigMap."""
    with pytest.raises(helm.HelmValuesError, match="additional properties"):
        render(helm, {"config": secret_in_config})


# --- the config file the bridge reads ----------------------------------------------------------------


def _settings_from(manifests: list[Manifest], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Load the rendered config file as the pod's bridge would: the file plus its environment."""
    for name in list(os.environ):
        if name.startswith("IME_BRIDGE_"):
            monkeypatch.delenv(name)
    secrets = [m for m in manifests if m["kind"] == "Secret"]
    data = {k: base64.b64decode(v).decode() for k, v in secrets[0]["data"].items()} if secrets else {}
    for entry in container(manifests).get("env", []):
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
        elif entry["valueFrom"]["secretKeyRef"]["key"] in data:
            monkeypatch.setenv(entry["name"], data[entry["valueFrom"]["secretKeyRef"]["key"]])
    path = tmp_path / "config.yaml"
    path.write_text(config_text(manifests), "utf-8")
    return load_settings(path)


def test_bridge_accepts_the_rendered_config(helm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-enabled ConfigMap plus the Secret's variables is a configuration the bridge accepts."""
    settings = _settings_from(render(helm, all_enabled_values()), tmp_path, monkeypatch)
    assert settings.ime.contract_ids == ["1001", "1002"]
    assert settings.ime.password is not None
    assert settings.ime.password.get_secret_value() == "example-password"
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.ssl_certfile == Path("/var/run/secrets/ime-bridge/kafka-tls/tls.crt")
    assert settings.buffer.overflow == "spool"
    assert str(settings.buffer.spool_dir) == "/var/lib/ime-bridge/spool"
    assert settings.ime.naive_timezone == "Asia/Tehran"
    assert settings.shutdown_timeout_seconds == 30


def test_default_config_is_refused_only_for_what_the_operator_must_supply(
    helm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the defaults the bridge asks exactly for credentials (and contracts), nothing else."""
    with pytest.raises(ConfigError) as refused:
        _settings_from(render(helm), tmp_path, monkeypatch)
    assert refused.value.problems == ["ime: set ime.token, or both ime.username and ime.password"]


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text("utf-8"))
    return schema


@pytest.mark.parametrize(
    ("section", "model", "not_values"),
    [
        ("ime", ImeSettings, {"password", "token"}),
        ("kafka", KafkaSettings, {"sasl_password", "sasl_oauth_client_secret", "ssl_key_password"}),
        ("buffer", BufferSettings, {"spool_dir"}),
        ("metrics", MetricsSettings, set()),
        ("coordination", CoordinationSettings, set()),
        ("log", LogSettings, set()),
    ],
)
def test_config_schema_offers_exactly_the_bridge_keys(section: str, model: type, not_values: set[str]) -> None:
    """values.schema.json's `config` mirrors bridge/config.py: every key, less secrets and chart-derived ones."""
    properties = _schema()["properties"]["config"]["properties"]
    fields: set[str] = set(model.model_fields)  # type: ignore[attr-defined]
    assert set(properties[section]["properties"]) == fields - not_values
    assert properties[section]["additionalProperties"] is False
    top = set(Settings.model_fields)
    assert set(properties) == top


@pytest.mark.parametrize(
    "bad",
    [
        {"service": {"port": "metrics"}},
        {"unknownKey": True},
        {"image": {"pullPolicy": "Sometimes"}},
        {"persistence": {"enabled": "yes"}},
        {"config": {"buffer": {"spool_dir": "/data"}}},
        {"config": {"log": {"level": "TRACE"}}},
        {"config": {"ime": {"contract_ids": [1001]}}},
        {"networkPolicy": {"kafka": {"ports": [0]}}},
        {"terminationGracePeriodSeconds": "30s"},
    ],
    ids=lambda bad: json.dumps(bad),
)
def test_schema_rejects_bad_values(helm: ModuleType, bad: dict[str, Any]) -> None:
    """Wrong types, unknown keys and values outside the bridge's sets are refused before rendering."""
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(bad))
    with pytest.raises(helm.HelmValuesError):
        render(helm, bad)


def test_schema_accepts_the_shipped_values(helm: ModuleType) -> None:
    """values.yaml and the ci values pass their own schema."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        chart.validate_schema(chart.merge_values(all_enabled_values()))


# --- network policy, disruption budget ---------------------------------------------------------------


def test_network_policy_allows_only_dns_kafka_ime_registry_and_metrics_scrapes(helm: ModuleType) -> None:
    """Egress to DNS, Kafka, the IME endpoint and the schema registry only; metrics ingress from one namespace."""
    manifests = render(helm, all_enabled_values())
    policy = one(manifests, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"] == workload(manifests)["spec"]["selector"]["matchLabels"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    source, test_pod = ingress["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert test_pod == {"podSelector": {"matchLabels": helm_test_selector_labels()}}  # same namespace
    dns, kafka, ime, registry = policy["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert kafka["ports"] == [{"port": 9093, "protocol": "TCP"}]
    assert kafka["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kafka"}
    assert ime == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    assert registry["to"] == kafka["to"]
    assert registry["ports"] == [{"port": 8081, "protocol": "TCP"}]  # the port of config.schema_registry.url


@pytest.mark.parametrize(
    ("url", "ports", "expected"),
    [
        ("https://registry.example.com", [], [443]),
        ("http://registry.example.com", [], [80]),
        ("http://registry:8081", [], [8081]),
        ("http://registry:8081", [18081, 18082], [18081, 18082]),
    ],
)
def test_the_schema_registry_egress_port_follows_its_url_unless_given(
    helm: ModuleType, url: str, ports: list[int], expected: list[int]
) -> None:
    values = {
        "config": {"schema_registry": {"url": url}},
        "networkPolicy": {"enabled": True, "schemaRegistry": {"ports": ports}},
    }
    *_, registry = one(render(helm, values), "NetworkPolicy")["spec"]["egress"]
    assert "to" not in registry  # no peers given: any destination on those ports
    assert registry["ports"] == [{"port": port, "protocol": "TCP"} for port in expected]


def test_without_a_schema_registry_the_network_policy_has_no_rule_for_it(helm: ModuleType) -> None:
    egress = one(render(helm, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]["egress"]
    assert len(egress) == 3  # DNS, Kafka, IME


def test_pod_disruption_budget_selects_the_pod(helm: ModuleType) -> None:
    """minAvailable wins when set; otherwise maxUnavailable."""
    manifests = render(helm, all_enabled_values())
    budget = one(manifests, "PodDisruptionBudget")["spec"]
    assert budget == {"minAvailable": 1, "selector": workload(manifests)["spec"]["selector"]}
    default_budget = one(render(helm, {"podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")["spec"]
    assert default_budget["maxUnavailable"] == 1
    assert "minAvailable" not in default_budget


# --- replicas: the contracts shared through a consumer group (config.coordination) --------------------

GROUP_ID = f"{NAMESPACE}-{FULLNAME}"  # what the chart derives: <namespace>-<fullname>
SURGE_FIRST = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
REPLICAS = {
    "replicaCount": 3,
    "credentials": {"imePassword": "p"},
    "config": {"ime": {"username": "u", "contract_ids": ["1001", "1002", "1003"]}},
}


def selector_labels() -> dict[str, str]:
    """The labels that select the release's bridge pods."""
    return {"app.kubernetes.io/name": "ime-bridge", "app.kubernetes.io/instance": RELEASE}


def test_replicas_share_the_contracts_through_a_group_named_after_the_release(
    helm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replicaCount 3: three replicas, coordination on with the release's group id (the bridge accepts the file),
    a budget letting one replica go at a time, a soft spread over nodes, and a surge-first rollout."""
    manifests = render(helm, REPLICAS)
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == SURGE_FIRST
    config = yaml.safe_load(config_text(manifests))
    assert config["coordination"] == {"group_id": GROUP_ID}
    settings = _settings_from(manifests, tmp_path, monkeypatch)
    assert settings.coordination.group_id == GROUP_ID
    assert settings.coordination.enabled
    assert settings.coordination.shards == type(settings.coordination).model_fields["shards"].default
    budget = one(manifests, "PodDisruptionBudget")["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels()}}
    assert budget["selector"] == deployment["spec"]["selector"]
    (spread,) = pod_spec(manifests)["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector_labels()},
    }
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    with helm.Chart.load(CHART) as chart:  # another release, another namespace: another group
        other = chart.render(REPLICAS, name="md-east", namespace="market-data-east")
    other_config = yaml.safe_load(yaml.safe_load(other["ime-bridge/templates/configmap.yaml"])["data"]["config.yaml"])
    assert other_config["coordination"] == {"group_id": "market-data-east-md-east-ime-bridge"}


def test_replicas_in_a_statefulset_get_a_spool_claim_each(helm: ModuleType) -> None:
    """Spool mode with several replicas: one StatefulSet of three, each pod with its own claim, in the group."""
    manifests = render(helm, all_enabled_values())
    statefulset = one(manifests, "StatefulSet")
    assert statefulset["spec"]["replicas"] == all_enabled_values()["replicaCount"] == 3
    assert [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]] == ["spool"]
    coordination = yaml.safe_load(config_text(manifests))["coordination"]
    assert coordination == {"group_id": GROUP_ID, "shards": 32, "handover_timeout_seconds": 15}


def test_one_replica_has_no_group_and_the_previous_defaults(helm: ModuleType) -> None:
    """replicaCount 1 (the default): no coordination section, no budget, no spread, the same config file."""
    manifests = render(helm)
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == SURGE_FIRST
    assert list(yaml.safe_load(config_text(manifests))) == [
        "ime",
        "kafka",
        "buffer",
        "metrics",
        "log",
        "shutdown_timeout_seconds",
    ]
    assert "coordination" not in config_text(manifests)
    assert not [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    assert "topologySpreadConstraints" not in pod_spec(manifests)
    assert "topologySpreadConstraints" not in pod_spec(render(helm, {"replicaCount": 1, "replicaSpread": {}}))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"config": {"coordination": {"group_id": "md-bridges"}}}, {"group_id": "md-bridges"}),
        ({"replicaCount": 3, "config": {"coordination": {"group_id": "md-bridges"}}}, {"group_id": "md-bridges"}),
        ({"coordination": {"enabled": True}}, {"group_id": GROUP_ID}),
        (
            {"replicaCount": 2, "config": {"coordination": {"shards": 16, "handover_timeout_seconds": 5.0}}},
            {"group_id": GROUP_ID, "shards": 16, "handover_timeout_seconds": 5.0},
        ),
        ({"config": {"coordination": {"topic": "md.coordination"}}}, {"topic": "md.coordination"}),
    ],
    ids=["explicit-one-replica", "explicit-replicas", "enabled-one-replica", "tuned-replicas", "tuned-off"],
)
def test_coordination_settings_reach_the_config_file(
    helm: ModuleType, values: dict[str, Any], expected: dict[str, Any]
) -> None:
    """An explicit group id wins over the derived one; coordination.enabled turns it on for one replica; the other
    coordination keys pass through (without a group id coordination stays off, as the bridge reads it)."""
    assert yaml.safe_load(config_text(render(helm, values)))["coordination"] == expected


def test_config_checksum_follows_the_derived_group_id(helm: ModuleType) -> None:
    """Scaling from one replica to several changes the config file (the group id), so the pods roll into the group;
    scaling between several does not."""

    def checksum(values: dict[str, Any]) -> str:
        annotations: dict[str, str] = workload(render(helm, values))["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"]

    one_replica, three, five = checksum({}), checksum({"replicaCount": 3}), checksum({"replicaCount": 5})
    assert one_replica != three
    assert three == five


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"replicaCount": 3, "coordination": {"enabled": False}}, r"replicaCount: 3 needs coordination"),
        (
            {"coordination": {"enabled": False}, "config": {"coordination": {"group_id": "md-bridges"}}},
            r"config\.coordination\.group_id is set but coordination\.enabled is false",
        ),
    ],
    ids=["replicas-without-coordination", "group-id-while-disabled"],
)
def test_replicas_without_coordination_fail_the_render(helm: ModuleType, values: dict[str, Any], error: str) -> None:
    """Several replicas that would each publish every contract are refused, as is a contradictory group id."""
    with pytest.raises(helm.HelmRenderError, match=error):
        render(helm, values)
    assert yaml.safe_load(config_text(render(helm, {"coordination": {"enabled": False}})))  # alone it is fine


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": 0},
        {"replicaCount": 1.5},
        {"replicaCount": "3"},
        {"coordination": {"enabled": "yes"}},
        {"coordination": {"groupId": "x"}},
        {"replicaSpread": {"whenUnsatisfiable": "Sometimes"}},
        {"replicaSpread": {"maxSkew": 0}},
        {"config": {"coordination": {"shards": 0}}},
        {"config": {"coordination": {"unknown": 1}}},
    ],
    ids=lambda bad: json.dumps(bad),
)
def test_schema_rejects_bad_replica_values(helm: ModuleType, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(helm, bad)


def test_replica_spread_can_be_tuned_replaced_or_turned_off(helm: ModuleType) -> None:
    """replicaSpread's fields reach the constraint; a given constraint on the same key replaces it; off: none."""
    tuned = {"topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule", "maxSkew": 2}
    (spread,) = pod_spec(render(helm, {"replicaCount": 3, "replicaSpread": tuned}))["topologySpreadConstraints"]
    assert spread == {**tuned, "labelSelector": {"matchLabels": selector_labels()}}
    own = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}
    (kept,) = pod_spec(render(helm, {"replicaCount": 3, "topologySpreadConstraints": [own]}))[
        "topologySpreadConstraints"
    ]
    assert kept == {**own, "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "ime-bridge"}}}
    zone = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
    both = pod_spec(render(helm, {"replicaCount": 3, "topologySpreadConstraints": [zone]}))["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in both] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    off = pod_spec(render(helm, {"replicaCount": 3, "replicaSpread": {"enabled": False}}))
    assert "topologySpreadConstraints" not in off


def test_pod_disruption_budget_follows_the_replicas_unless_told(helm: ModuleType) -> None:
    """enabled null: a budget with several replicas only; true or false decides; minAvailable still wins."""

    def budget(values: dict[str, Any]) -> dict[str, Any] | None:
        found = [m for m in render(helm, values) if m["kind"] == "PodDisruptionBudget"]
        return found[0]["spec"] if found else None

    assert budget({}) is None
    assert budget({"replicaCount": 2}) == {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels()}}
    assert budget({"replicaCount": 2, "podDisruptionBudget": {"enabled": False}}) is None
    assert budget({"podDisruptionBudget": {"enabled": True}}) is not None
    tuned = budget({"replicaCount": 5, "podDisruptionBudget": {"minAvailable": 3}})
    assert tuned == {"minAvailable": 3, "selector": {"matchLabels": selector_labels()}}


def test_notes_name_the_group_and_warn_of_idle_replicas_and_blocked_evictions(helm: ModuleType) -> None:
    notes = render_files(helm, REPLICAS)["ime-bridge/templates/NOTES.txt"]
    assert f"Kafka consumer group {GROUP_ID}" in notes
    assert "(64 shards" in notes
    assert "WARNING: replicaCount" not in notes
    assert "Kafka consumer group" not in render_files(helm)["ime-bridge/templates/NOTES.txt"]
    crowded = merged(REPLICAS, {"config": {"coordination": {"shards": 2}}, "podDisruptionBudget": {"minAvailable": 3}})
    notes = render_files(helm, crowded)["ime-bridge/templates/NOTES.txt"]
    assert "WARNING: replicaCount (3) is more than config.coordination.shards (2)" in notes
    assert "WARNING: podDisruptionBudget.minAvailable (3) is not below replicaCount (3)" in notes


# --- documentation -----------------------------------------------------------------------------------


def documented_keys() -> Iterator[tuple[str, bool]]:
    """(dotted key, documented) for every key of values.yaml; documented: a `# --` comment above it or an ancestor."""
    stack: list[tuple[int, str, bool]] = []
    comment = False
    for line in (CHART / "values.yaml").read_text("utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_.-]*):", line)
        if match is None:  # a list item or a continuation
            comment = False
            continue
        indent = len(match[1])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inherited = any(documented for _, _, documented in stack)
        key = ".".join([*(k for _, k, _ in stack), match[2]])
        yield key, comment or inherited
        stack.append((indent, match[2], comment))
        comment = False


def test_every_values_key_is_documented() -> None:
    """helm-docs style: each key of values.yaml has a `# --` comment, on itself or on an enclosing block."""
    keys = list(documented_keys())
    assert len(keys) > 50
    undocumented = [key for key, documented in keys if not documented]
    parents = {key.rsplit(".", 1)[0] for key, _ in keys if "." in key}
    assert [key for key in undocumented if key not in parents] == []


def test_readme_values_table_lists_every_documented_key() -> None:
    """The chart README's table has a row for each `# --` documented key, and no others."""
    readme = (CHART / "README.md").read_text("utf-8")
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE))
    lines = (CHART / "values.yaml").read_text("utf-8").splitlines()
    keys = []
    stack: list[tuple[int, str]] = []
    pending = False
    for line in lines:
        if line.strip().startswith("# --"):
            pending = True
            continue
        match = re.match(r"^( *)([A-Za-z_][A-Za-z0-9_.-]*):", line)
        if match is None:
            continue
        while stack and stack[-1][0] >= len(match[1]):
            stack.pop()
        if pending:
            keys.append(".".join([*(k for _, k in stack), match[2]]))
            pending = False
        stack.append((len(match[1]), match[2]))
    assert rows == set(keys)


VALUE_FLAGS = {"--namespace", "-n", "--set", "--set-string", "--set-json", "--from-literal", "--values", "-f"}


def readme_install_commands() -> list[tuple[list[str], list[tuple[str, str]]]]:
    """The commands of the README's install example: (positional words, [(flag, value)]) each."""
    readme = (CHART / "README.md").read_text("utf-8")
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "the Install section has no ```sh block"
    commands = []
    for line in block[1].replace("\\\n", " ").splitlines():
        words, flags = [], []
        tokens = iter(shlex.split(line))
        for token in tokens:
            flag, equals, value = token.partition("=")
            if flag in VALUE_FLAGS:
                flags.append((flag, value if equals else next(tokens)))
            elif token.startswith("-"):
                flags.append((token, ""))
            else:
                words.append(token)
        if words:
            commands.append((words, flags))
    return commands


def readme_install_example() -> dict[str, Any]:
    """What the example does: the namespace it creates, the Secret it creates, the helm install and helm test."""
    found: dict[str, Any] = {"order": []}
    set_parsers = {
        "--set": "parse_set_string",
        "--set-string": "parse_set_string_values",
        "--set-json": "parse_set_json",
    }
    for words, flags in readme_install_commands():
        options = {f: v for f, v in flags if f not in (*set_parsers, "--from-literal")}
        namespace = options.get("--namespace", options.get("-n"))
        if words[:3] == ["kubectl", "create", "namespace"]:
            found["order"].append("namespace")
            found["namespace"] = words[3]
        elif words[:4] == ["kubectl", "create", "secret", "generic"]:
            found["order"].append("secret")
            literals = dict(v.split("=", 1) for f, v in flags if f == "--from-literal")
            found["secret"] = {"namespace": namespace, "name": words[4], "data": literals}
        elif words[:2] == ["helm", "install"]:
            found["order"].append("install")
            sets = [(set_parsers[f], v) for f, v in flags if f in set_parsers]
            found["install"] = {"release": words[2], "chart": words[3], "namespace": namespace, "sets": sets}
        elif words[:2] == ["helm", "test"]:
            found["order"].append("test")
            found["test"] = {"release": words[2], "namespace": namespace}
        else:
            pytest.fail(f"the install example runs a command this test does not know: {words}")
    return found


def test_readme_install_example_works_as_written(
    helm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace exists before the Secret, the Secret lives in the release's namespace under the name and keys
    the values name, the values pass the schema and lint, and the bridge accepts the configuration it gets."""
    example = readme_install_example()
    assert example["order"] == ["namespace", "secret", "install", "test"]
    install, secret = example["install"], example["secret"]
    assert install["namespace"] == secret["namespace"] == example["namespace"] == example["test"]["namespace"]
    assert example["test"]["release"] == install["release"]
    assert (ROOT / install["chart"]).resolve() == CHART
    assert (install["release"], install["namespace"]) == (RELEASE, NAMESPACE)  # the names the helpers here know
    values: dict[str, Any] = {}
    for parser, expression in install["sets"]:
        values = merged(values, getattr(helm, parser)(expression))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))
    keys = defaults["credentials"]["existingSecretKeys"]
    assert values["credentials"]["existingSecret"] == secret["name"]
    assert set(secret["data"]) <= set(keys.values()), f"keys the chart does not read: {secret['data']}"

    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
    files = render_files(helm, values)
    assert "WARNING" not in files["ime-bridge/templates/NOTES.txt"]
    manifests = render(helm, values)
    assert not [m for m in manifests if m["kind"] == "Secret"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in container(manifests)["env"] if "valueFrom" in e]
    assert {ref["name"] for ref in refs} == {secret["name"]}
    assert set(secret["data"]) <= {ref["key"] for ref in refs}

    created = {"kind": "Secret", "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret["data"].items()}}
    settings = _settings_from([*manifests, created], tmp_path, monkeypatch)
    assert settings.ime.password is not None
    assert settings.kafka.sasl_password is not None
    assert settings.ime.contract_ids == ["1001", "1002"]


def test_readme_lists_every_secret_key_with_its_variable(helm: ModuleType) -> None:
    """The README's secrets table has a row per credentials.existingSecretKeys key naming the variable it feeds."""
    readme = (CHART / "README.md").read_text("utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`credentials.` value" not in line]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))["credentials"]["existingSecretKeys"]
    manifests = render(helm, {"credentials": {"existingSecret": "ime-credentials"}})
    variables = {
        e["valueFrom"]["secretKeyRef"]["key"]: e["name"]
        for e in container(manifests)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert variables, "no variable comes from the existing Secret"
    for value_name, key in defaults.items():
        row = [line for line in rows if f"| `{value_name}` | `{key}` |" in line]
        assert len(row) == 1, f"no README row for credentials.existingSecretKeys.{value_name} (`{key}`)"
        if key in variables:
            assert f"`{variables[key]}`" in row[0], row[0]


def test_chart_app_version_is_the_bridge_version() -> None:
    """Chart.yaml's appVersion (the default image tag) is pyproject's version."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text("utf-8"))
    assert chart["appVersion"] == project["version"]
    assert chart["apiVersion"] == "v2"


def test_chart_metadata_names_home_sources_and_maintainers(helm: ModuleType) -> None:
    """Chart.yaml tells a chart index where the project lives, where its source is and who maintains it."""
    with helm.Chart.load(CHART) as chart:
        metadata = chart.metadata
    for url in (metadata["home"], *metadata["sources"]):
        parsed = urllib.parse.urlparse(url)
        assert parsed.scheme == "https", url
        assert parsed.netloc, url
    assert metadata["sources"]
    assert metadata["maintainers"]
    for maintainer in metadata["maintainers"]:
        assert maintainer["name"], maintainer
        assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", maintainer["email"]), maintainer
    assert {"ime", "kafka", "prometheus"} <= set(metadata["keywords"])


def test_schema_registry_is_rendered_and_its_password_comes_from_the_secret(helm: ModuleType) -> None:
    values = {
        "config": {"schema_registry": {"url": "https://registry:8081", "username": "bridge"}},
        "credentials": {"schemaRegistryPassword": "s3cret"},
    }
    manifests = render(helm, values)
    (configmap,) = [m for m in manifests if m["kind"] == "ConfigMap"]
    config = yaml.safe_load(next(iter(configmap["data"].values())))
    assert config["schema_registry"] == {"url": "https://registry:8081", "username": "bridge"}
    assert "s3cret" not in json.dumps(configmap)
    env = {var["name"]: var for var in workload(manifests)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["IME_BRIDGE_SCHEMA_REGISTRY__PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "schema-registry-password"


# --- Kafka security: the TLS files from a Secret, the OAuth token endpoint --------------------------

MTLS = {"kafkaTls": {"secretName": "kafka-client-tls"}, "config": {"kafka": {"security_protocol": "SSL"}}}


def test_kafka_tls_secret_is_mounted_and_named_in_the_config(
    helm: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kafkaTls.secretName: the Secret is mounted read-only and the bridge's ssl_* keys point at its files."""
    values = merged(
        MTLS, {"kafkaTls": {"caFile": "ca.crt"}, "config": {"ime": {"username": "u", "contract_ids": ["1"]}}}
    )
    values = merged(values, {"credentials": {"imePassword": "p"}})
    manifests = render(helm, values)
    pod = pod_spec(manifests)
    mount = "/var/run/secrets/ime-bridge/kafka-tls"
    assert {"name": "kafka-tls", "secret": {"secretName": "kafka-client-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert {"name": "kafka-tls", "mountPath": mount, "readOnly": True} in container(manifests)["volumeMounts"]
    kafka = _settings_from(manifests, tmp_path, monkeypatch).kafka
    assert (kafka.ssl_certfile, kafka.ssl_keyfile, kafka.ssl_cafile) == (
        Path(f"{mount}/tls.crt"),
        Path(f"{mount}/tls.key"),
        Path(f"{mount}/ca.crt"),
    )
    # keyFile empty: the certificate file holds the key too.
    assert "ssl_keyfile" not in config_text(render(helm, merged(values, {"kafkaTls": {"keyFile": ""}})))


def test_without_kafka_tls_nothing_is_mounted(helm: ModuleType) -> None:
    manifests = render(helm)
    assert "kafka-tls" not in [volume["name"] for volume in pod_spec(manifests)["volumes"]]
    assert "ssl_certfile" not in config_text(manifests)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            merged(MTLS, {"config": {"kafka": {"ssl_certfile": "/mine.pem"}}}),
            r"config\.kafka\.ssl_certfile: leave it unset, kafkaTls points it at the mounted Secret",
        ),
        (
            merged(MTLS, {"kafkaTls": {"caFile": "ca.crt"}, "config": {"kafka": {"ssl_cafile": "/ca.pem"}}}),
            r"config\.kafka\.ssl_cafile: leave it unset",
        ),
        (
            {"kafkaTls": {"secretName": "kafka-client-tls"}},
            r"kafkaTls\.secretName needs config\.kafka\.security_protocol SSL or SASL_SSL",
        ),
    ],
    ids=["certfile-twice", "cafile-twice", "no-tls-protocol"],
)
def test_kafka_tls_conflicts_fail_the_rendering(helm: ModuleType, values: dict[str, Any], expected: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=expected):
        render(helm, values)


def test_a_ca_file_in_config_stays_when_kafka_tls_does_not_supply_one(helm: ModuleType) -> None:
    """caFile empty: config.kafka.ssl_cafile (e.g. from extraVolumes) is the operator's and is kept."""
    text = config_text(render(helm, merged(MTLS, {"config": {"kafka": {"ssl_cafile": "/etc/kafka-ca/ca.crt"}}})))
    assert "ssl_cafile: /etc/kafka-ca/ca.crt" in text


@pytest.mark.parametrize(
    ("url", "ports", "expected"),
    [
        ("https://login.example.com/oauth2/token", [], [443]),
        ("https://idp.example:8443/token", [], [8443]),
        ("https://idp.example:8443/token", [443], [443]),
    ],
)
def test_the_oauth_token_endpoint_egress_follows_its_url_unless_given(
    helm: ModuleType, url: str, ports: list[int], expected: list[int]
) -> None:
    values = {
        "config": {"kafka": {"sasl_oauth_token_url": url}},
        "networkPolicy": {"enabled": True, "kafkaOauth": {"ports": ports}},
    }
    egress = one(render(helm, values), "NetworkPolicy")["spec"]["egress"]
    assert len(egress) == 4  # DNS, Kafka, IME, the token endpoint
    assert "to" not in egress[-1]
    assert egress[-1]["ports"] == [{"port": port, "protocol": "TCP"} for port in expected]
