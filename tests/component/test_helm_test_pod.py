"""The chart's `helm test` check (helm/ime-bridge/templates/tests/), run against the bridge's own endpoint.

The program the chart renders into the test pod runs here as the pod runs it (`python -c`, with the pod's
environment but the URL of a local endpoint), against the bridge's HealthServer over its Metrics registry: it
passes on a ready bridge, and fails, saying why, on one that is not ready, on /metrics contradicting /readyz,
and on no answer at all.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from bridge.health import HealthServer
from bridge.metrics import Metrics
from tests.unit.test_helm import Manifest, _module, helm_test_pod, helm_test_script, render


@dataclass
class Endpoint:
    """The bridge's /readyz and /metrics on a free local port, readiness set by the test."""

    url: str
    metrics: Metrics
    ready: bool = False

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What /readyz reports: the test's answer, whatever ime_bridge_ready says."""
        return self.ready, {"kafka": self.ready, "connections_up": int(self.ready)}


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    """A running HealthServer; the test sets `ready` and the `ime_bridge_ready` gauge."""
    metrics = Metrics()
    state = Endpoint(url="", metrics=metrics)
    server = HealthServer(metrics.registry, state.readiness, "127.0.0.1", 0)
    await server.start()
    state.url = f"http://127.0.0.1:{server.port}"
    try:
        yield state
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def pod() -> Manifest:
    """The `helm test` pod as the chart renders it by default (Helm's engine as tests/unit/test_helm.py loads it)."""
    engine = _module("helm_python", "helm-python-sdk")
    engine.disable_logging()
    return helm_test_pod(render(engine))


async def run_check(pod: Manifest, url: str) -> tuple[int | None, str, str]:
    """Run the test pod's program against `url`: exit code, stdout, stderr."""
    (check,) = pod["spec"]["containers"]
    env = {entry["name"]: entry["value"] for entry in check["env"]}
    assert set(env) == {"BRIDGE_URL", "TIMEOUT_SECONDS", "PYTHONDONTWRITEBYTECODE"}
    env["BRIDGE_URL"] = url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        helm_test_script(pod),
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, out.decode(), err.decode()


async def test_passes_on_a_ready_bridge(pod: Manifest, endpoint: Endpoint) -> None:
    """/readyz 200 and ime_bridge_ready 1: exit 0, with what it saw in the log."""
    endpoint.ready = True
    endpoint.metrics.ready.set(1)
    code, out, err = await run_check(pod, endpoint.url)
    assert code == 0, out + err
    assert f"GET {endpoint.url}/readyz: 200" in out
    assert "ime_bridge_ready ['1.0']" in out
    assert out.rstrip().endswith("OK")


async def test_fails_on_a_bridge_that_is_not_ready(pod: Manifest, endpoint: Endpoint) -> None:
    """/readyz 503: exit 1, naming /readyz and printing its body (what is not ready)."""
    endpoint.metrics.ready.set(0)
    code, out, err = await run_check(pod, endpoint.url)
    assert code == 1, out + err
    assert '"kafka": false' in out
    assert "FAIL /readyz answered 503" in err


async def test_fails_when_metrics_contradict_readiness(pod: Manifest, endpoint: Endpoint) -> None:
    """/readyz 200 but ime_bridge_ready 0 (what the alerts read): exit 1, naming /metrics."""
    endpoint.ready = True
    endpoint.metrics.ready.set(0)
    code, out, err = await run_check(pod, endpoint.url)
    assert code == 1, out + err
    assert "FAIL /metrics answered 200 with ime_bridge_ready ['0.0']" in err


async def test_fails_when_nothing_answers(pod: Manifest) -> None:
    """No listener on the Service's port: exit 1 with the address, not a traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, out, err = await run_check(pod, url)
    assert code == 1, out + err
    assert f"FAIL GET {url}/readyz" in err
    assert "Traceback" not in err
