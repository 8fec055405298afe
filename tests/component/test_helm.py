"""The Helm chart helm/ime-bridge, rendered and linted by the Helm engine of the `helm-python-sdk` wheel.

Every rendered manifest is validated offline by `kubernetes-validate --strict` against Kubernetes 1.30,
except the Prometheus Operator's custom resources (ServiceMonitor, PrometheusRule), for which it has no
schema: those are checked structurally here, and the PrometheusRule's groups with `promtool check rules`.
A missing tool fails the test under CI=true and skips it elsewhere, saying which.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.unit.test_helm import (  # noqa: F401 (fixtures the tests here take)
    KUBE_VERSION,
    REPLICAS,
    RULES,
    Manifest,
    _missing,
    all_enabled_values,
    helm,
    merged,
    one,
    render,
    variant,
    workload,
)

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _executable(name: str, hint: str) -> str:
    """A command from this interpreter's environment (make test does not activate the venv) or PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        _missing(f"{name} ({hint})")
    assert found is not None
    return found


def _kubernetes_validate(manifests: list[Manifest], tmp_path: Path) -> tuple[int, str]:
    """Run `kubernetes-validate --strict -k 1.30.0` over the manifests, one file each."""
    command = _executable("kubernetes-validate", "pip package kubernetes-validate")
    files = []
    for index, manifest in enumerate(manifests):
        path = tmp_path / f"{index:02d}-{manifest['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(manifest), "utf-8")
        files.append(str(path))
    result = subprocess.run(
        [command, "--strict", "--kubernetes-version", KUBE_VERSION, *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_manifests_validate_strictly_against_kubernetes_1_30(
    helm: ModuleType, variant: tuple[str, dict[str, Any] | None], tmp_path: Path
) -> None:
    """Every built-in object passes kubernetes-validate --strict; CRDs are checked in the tests below."""
    _, values = variant
    manifests = [m for m in render(helm, values) if m["kind"] not in CRD_KINDS]
    code, output = _kubernetes_validate(manifests, tmp_path)
    assert code == 0, output
    for manifest in manifests:
        resource = f"{manifest['kind'].lower()}/{manifest['metadata']['name']}"
        assert re.search(rf"passed for resource {re.escape(resource)} against version 1\.30", output), (
            f"{resource} was not validated:\n{output}"
        )
    assert "WARN" not in output, output


def test_replicas_with_their_budget_and_spread_validate(helm: ModuleType, tmp_path: Path) -> None:
    """replicaCount 3, as a Deployment and as a StatefulSet: the workload, its PodDisruptionBudget and the spread
    constraint the chart adds pass kubernetes-validate --strict."""
    for values in (REPLICAS, merged(all_enabled_values(), {"topologySpreadConstraints": []})):
        manifests = [m for m in render(helm, values) if m["kind"] not in CRD_KINDS]
        assert workload(manifests)["spec"]["replicas"] == 3
        assert workload(manifests)["spec"]["template"]["spec"]["topologySpreadConstraints"]
        budget = one(manifests, "PodDisruptionBudget")
        code, output = _kubernetes_validate(manifests, tmp_path)
        assert code == 0, output
        for manifest in (workload(manifests), budget):
            resource = f"{manifest['kind'].lower()}/{manifest['metadata']['name']}"
            assert re.search(rf"passed for resource {re.escape(resource)} against version 1\.30", output), output


def test_kubernetes_validate_strict_rejects_an_unknown_field(helm: ModuleType, tmp_path: Path) -> None:
    """The validator is strict: a misspelt field in the pod spec is an error."""
    manifests = render(helm)
    deployment = copy.deepcopy(workload(manifests))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    code, output = _kubernetes_validate([deployment], tmp_path)
    assert code != 0
    assert "securityContxt" in output, output


def test_prometheus_rule_carries_the_plain_rules_file(helm: ModuleType, tmp_path: Path) -> None:
    """The PrometheusRule's groups are deploy/prometheus/ime-bridge-rules.yaml plus ruleLabels, and valid."""
    manifests = render(helm, all_enabled_values())
    rule = one(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    plain = yaml.safe_load(RULES.read_text("utf-8"))["groups"]
    for group in plain:
        for entry in group["rules"]:
            if "alert" in entry:
                entry["labels"] = {"team": "market-data", **entry.get("labels", {})}
    assert rule["spec"]["groups"] == plain
    # The same groups pass Prometheus's own checker.
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool (Debian package prometheus)")
    assert promtool is not None
    path = tmp_path / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), "utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
