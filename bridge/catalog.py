"""The static contract lookups: names ↔ ids, so that every record is keyed by contract id.

`GET {base}/data-engine/ime/static/data/contract/name?contract_names=..` and `.../contract/id?contract_ids=..`
answer `{"Data": [item | null, ...], "Status": {...}}`, one entry per identifier asked, in order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from bridge import protocol
from bridge.auth import AuthError, TokenProvider
from bridge.config import ImeSettings

# Identifiers per request, so that URLs stay short.
_CHUNK = 50


class CatalogUnavailable(Exception):
    """The static endpoint could not be reached or answered something unreadable."""


@dataclass(frozen=True, slots=True)
class ContractRef:
    """A contract as the static lookup describes it."""

    contract_id: str
    contract_name: str


class ContractCatalog(Protocol):
    """Looks contracts up by id or by name; unknown identifiers are absent from the answer."""

    async def by_names(self, names: Sequence[str]) -> dict[str, ContractRef]:
        """The contracts these names designate, keyed by name."""
        ...

    async def by_ids(self, ids: Sequence[str]) -> dict[str, ContractRef]:
        """The contracts these ids designate, keyed by id."""
        ...


class HttpContractCatalog:
    """ContractCatalog over the service's static HTTP endpoints."""

    def __init__(self, session: aiohttp.ClientSession, settings: ImeSettings, tokens: TokenProvider) -> None:
        self._session = session
        self._base_url = str(settings.base_url).rstrip("/")
        self._tokens = tokens
        self._timeout = aiohttp.ClientTimeout(total=settings.http_timeout_seconds)

    async def by_names(self, names: Sequence[str]) -> dict[str, ContractRef]:
        """Resolve names; a name the service does not know is left out."""
        refs = await self._lookup(protocol.STATIC_BY_NAME_PATH, "contract_names", names)
        return {asked: ref for asked, ref in zip(names, refs, strict=True) if ref is not None}

    async def by_ids(self, ids: Sequence[str]) -> dict[str, ContractRef]:
        """Describe ids; an id the service does not know is left out."""
        refs = await self._lookup(protocol.STATIC_BY_ID_PATH, "contract_ids", ids)
        return {asked: ref for asked, ref in zip(ids, refs, strict=True) if ref is not None}

    async def _lookup(self, path: str, parameter: str, identifiers: Sequence[str]) -> list[ContractRef | None]:
        refs: list[ContractRef | None] = []
        for start in range(0, len(identifiers), _CHUNK):
            chunk = identifiers[start : start + _CHUNK]
            items = await self._get(path, [(parameter, identifier) for identifier in chunk])
            if len(items) != len(chunk):
                raise CatalogUnavailable(f"{path} answered {len(items)} items for {len(chunk)} identifiers")
            refs.extend(_ref(item) for item in items)
        return refs

    async def _get(self, path: str, params: list[tuple[str, str]]) -> list[Any]:
        try:
            headers = {"Authorization": await self._tokens.token()}
        except AuthError as exc:
            raise CatalogUnavailable(f"no token for the static endpoint: {exc}") from exc
        try:
            async with self._session.get(
                self._base_url + path, params=params, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CatalogUnavailable(f"static endpoint unreachable: {type(exc).__name__}") from exc
        if status != 200:
            raise CatalogUnavailable(f"static endpoint {path} answered HTTP {status}")
        try:
            data = json.loads(body)["Data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CatalogUnavailable(f"static endpoint {path} answered without a Data list") from exc
        if not isinstance(data, list):
            raise CatalogUnavailable(f"static endpoint {path} answered a Data that is not a list")
        return data


def _ref(item: Any) -> ContractRef | None:
    if not isinstance(item, dict):
        return None
    contract_id = item.get("contractId", item.get("ContractId"))
    name = item.get("contractName")
    if contract_id is None or not name:
        return None
    return ContractRef(str(contract_id), str(name))


class StaticCatalog:
    """An in-memory ContractCatalog, for unit tests and for configurations without a static endpoint."""

    def __init__(self, contracts: Sequence[ContractRef]) -> None:
        self._by_id = {ref.contract_id: ref for ref in contracts}
        self._by_name = {ref.contract_name: ref for ref in contracts}

    async def by_names(self, names: Sequence[str]) -> dict[str, ContractRef]:
        """The known names among `names`."""
        return {name: self._by_name[name] for name in names if name in self._by_name}

    async def by_ids(self, ids: Sequence[str]) -> dict[str, ContractRef]:
        """The known ids among `ids`."""
        return {contract_id: self._by_id[contract_id] for contract_id in ids if contract_id in self._by_id}
