"""/metrics, /healthz and /readyz as served by HealthServer: /metrics negotiates its format and compression
the way prometheus-client's own handlers do (OpenMetrics when asked for, gzip when accepted, `name[]`)."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from bridge.health import HealthServer
from bridge.metrics import Metrics

OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    metrics = Metrics()
    metrics.messages_published.labels("ime.contract.updates").inc(42)
    metrics.publish_latency.observe(0.003)
    server = HealthServer(metrics.registry, lambda: (False, {"kafka": False}), "127.0.0.1", 0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def fetch(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the body exactly as sent (no transparent decompression)."""
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept-Encoding"]) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_plain_scrapes_get_the_text_format_uncompressed(base_url: str) -> None:
    status, headers, body = await fetch(f"{base_url}/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "Content-Encoding" not in headers
    families = {family.name: family for family in parse_text(body.decode())}
    (sample,) = families["ime_bridge_messages_published"].samples
    assert sample.value == 42
    assert not body.rstrip().endswith(b"# EOF")


async def test_openmetrics_when_the_scraper_asks_for_it(base_url: str) -> None:
    """What Prometheus sends by default: OpenMetrics, which ends with `# EOF` and parses as OpenMetrics."""
    status, headers, body = await fetch(f"{base_url}/metrics", Accept=OPENMETRICS_ACCEPT)
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert body.endswith(b"# EOF\n")
    families = {family.name: family for family in parse_openmetrics(body.decode())}
    assert families["ime_bridge_messages_published"].type == "counter"
    assert families["ime_bridge_publish_latency_seconds"].type == "histogram"


@pytest.mark.parametrize("accept", ["", OPENMETRICS_ACCEPT])
async def test_gzip_when_accepted(base_url: str, accept: str) -> None:
    _, _, plain = await fetch(f"{base_url}/metrics", Accept=accept)
    status, headers, body = await fetch(f"{base_url}/metrics", Accept=accept, **{"Accept-Encoding": "gzip, deflate"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    unpacked = gzip.decompress(body)
    assert len(body) < len(unpacked)
    # Process metrics (CPU seconds, memory) move between two scrapes: compare the bridge's own lines.
    ours = [line for line in unpacked.splitlines() if line.startswith(b"ime_bridge_messages_published")]
    assert ours
    assert ours == [line for line in plain.splitlines() if line.startswith(b"ime_bridge_messages_published")]


async def test_name_restricts_the_output(base_url: str) -> None:
    _, _, body = await fetch(f"{base_url}/metrics?name[]=ime_bridge_messages_published_total")
    names = {family.name for family in parse_text(body.decode())}
    assert names == {"ime_bridge_messages_published"}


async def test_healthz_and_readyz_are_kept(base_url: str) -> None:
    status, _, body = await fetch(f"{base_url}/healthz")
    assert (status, body) == (200, b'{"status": "ok"}')
    status, _, body = await fetch(f"{base_url}/readyz")
    assert status == 503
    assert b'"kafka": false' in body
