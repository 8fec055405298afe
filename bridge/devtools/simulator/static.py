"""The simulator's static part: the contract lookups (search by market, by name, by id) in the service's
envelope; a token is optional there, a bad one is refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from bridge.devtools.market import (
    Contract,
)
from bridge.devtools.simulator.model import Catalogue, PolicyCause
from bridge.protocol import (
    MARKETS,
    STATIC_BY_ID_PATH,
    STATIC_BY_NAME_PATH,
    STATIC_SEARCH_PATH,
    Endpoint,
)


class StaticLookups:
    """The three static GET endpoints over the catalogue; delisted contracts answer as unknown."""

    def __init__(
        self,
        catalogue: Catalogue,
        delisted: set[str],
        authorize: Callable[[str], PolicyCause | None],
    ) -> None:
        self._catalogue = catalogue
        self._delisted = delisted  # the simulator's set, changed by invalidate_contracts(delist=True)
        self._authorize = authorize

    def add_routes(self, app: web.Application) -> None:
        """Serve the lookups on `app`."""
        app.router.add_get(STATIC_SEARCH_PATH, self._static_search)
        app.router.add_get(STATIC_BY_NAME_PATH, self._static_by_name)
        app.router.add_get(STATIC_BY_ID_PATH, self._static_by_id)

    def _static_check(self, request: web.Request) -> web.Response | None:
        """401 when a token is given and bad; the static lookups also answer without one."""
        header = request.headers.get("Authorization")
        if header is not None and self._authorize(header) is not None:
            return web.json_response({"detail": "Could not validate credentials"}, status=401)
        return None

    def _static_items(self, contracts: Iterable[Contract | None]) -> web.Response:
        data = [
            None if contract is None or contract.id in self._delisted else contract.static_item()
            for contract in contracts
        ]
        body = {"Data": data, "Status": {"Code": 200, "Message": "OK"}}
        return web.json_response(body, dumps=_dumps_unicode)

    async def _static_search(self, request: web.Request) -> web.Response:
        refused = self._static_check(request)
        if refused is not None:
            return refused
        market = request.query.get("market")
        if market is not None and market not in MARKETS:
            detail = f"market must be one of {', '.join(MARKETS)}"
            return web.json_response({"detail": detail}, status=422)
        return self._static_items(
            contract
            for contract in self._catalogue.contracts
            if (market is None or contract.market == market) and contract.id not in self._delisted
        )

    async def _static_by_name(self, request: web.Request) -> web.Response:
        return self._static_lookup(request, Endpoint.NAME, self._catalogue.by_name)

    async def _static_by_id(self, request: web.Request) -> web.Response:
        return self._static_lookup(request, Endpoint.ID, self._catalogue.by_id)

    def _static_lookup(self, request: web.Request, endpoint: Endpoint, lookup: dict[str, Contract]) -> web.Response:
        refused = self._static_check(request)
        if refused is not None:
            return refused
        param = endpoint.static_lookup_param
        identifiers = request.query.getall(param, [])
        if not identifiers:
            return web.json_response({"detail": f"query parameter {param} is required"}, status=422)
        return self._static_items(lookup.get(identifier) for identifier in identifiers)


def _dumps_unicode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
