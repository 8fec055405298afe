"""/metrics, /healthz and /readyz on one port.

/healthz answers 200 while the event loop runs (a liveness probe restarts a wedged process).
/readyz answers 200 only when the bridge is doing its job (producer started, a subscription
connected) and 503 otherwise, with a JSON body saying what is and is not ready.
/metrics answers as prometheus-client's own exposition handlers do: the format negotiated from `Accept`
(OpenMetrics when the scraper asks for it, else the text format), gzip when `Accept-Encoding` allows it, and
`?name[]=...` restricting the output to those metrics.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

ReadinessCheck = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serves the three endpoints; `port` is known after `start()` (0 picks a free port)."""

    def __init__(self, registry: CollectorRegistry, readiness: ReadinessCheck, host: str, port: int) -> None:
        self._registry = registry
        self._readiness = readiness
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        """Bind and serve."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the asyncio server
        if server is not None and self._port == 0:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        names = request.query.getall("name[]", [])
        body = encoder(self._registry.restricted_registry(names) if names else self._registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, detail = self._readiness()
        return web.json_response({"ready": ready, **detail}, status=200 if ready else 503)
