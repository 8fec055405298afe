"""`check-config --connect`: reach each service the configuration names, once, and say how it went.

The IME token endpoint (one token request with the configured credentials; a static `ime.token` is not
checked), Kafka (the bootstrap servers with the configured TLS and SASL, then whether the topics exist),
the replicas' control topic (with `coordination.group_id`: one partition per shard) and the schema
registry (when configured: its subjects, which needs the credentials). Each check is bounded
by a deadline and reported on its own, so one failure does not hide the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient

from bridge.auth import IssuedToken, jwt_expiry
from bridge.config import Settings
from bridge.coordination import control_topic_partitions, partitions_problem
from bridge.protocol import TOKEN_PATH
from bridge.registry import MISSING_CLIENT, SchemaRegistry, client_installed
from bridge.sink import client_options


@dataclass(frozen=True)
class CheckResult:
    """One service: what was tried (`target`), and OK with what it found, or the error."""

    name: str
    target: str
    ok: bool
    detail: str

    def line(self) -> str:
        """The report line: `name  target  OK: detail` or `name  target  FAILED: error`."""
        return f"{self.name:<15} {self.target}  {'OK' if self.ok else 'FAILED'}: {self.detail}"


async def _token_endpoint(settings: Settings) -> str:
    async with aiohttp.ClientSession() as session:
        token = await IssuedToken(session, settings.ime).token()
    expiry = jwt_expiry(token)
    return "token issued" + (
        f", valid until {datetime.fromtimestamp(expiry, UTC):%Y-%m-%d %H:%M:%S} UTC" if expiry else ""
    )


async def _kafka(settings: Settings) -> str:
    kafka = settings.kafka
    admin = AIOKafkaAdminClient(**client_options(kafka))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    topics = kafka.topics
    missing = [topic for topic in topics if topic not in existing]
    return "connected; " + (
        f"topics to be created at start: {', '.join(missing)}" if missing else f"topics exist: {', '.join(topics)}"
    )


async def _coordination(settings: Settings) -> str:
    coordination = settings.coordination
    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    try:
        await admin.start()
        partitions = await control_topic_partitions(admin, coordination)
    finally:
        await admin.close()
    problem = partitions_problem(coordination, partitions)
    if problem is not None:
        raise RuntimeError(problem)
    if partitions is None:
        return f"group {coordination.group_id}: control topic to be created at start, {coordination.shards} partitions"
    return f"group {coordination.group_id}: control topic has {partitions} partitions, one per shard"


async def _registry(settings: Settings) -> str:
    assert settings.schema_registry is not None
    if not client_installed():
        raise RuntimeError(MISSING_CLIENT)
    registry = SchemaRegistry(settings.schema_registry.model_copy(update={"retries": 0}))
    try:
        subjects = await registry.subjects()
    finally:
        registry.close()
    return f"{len(subjects)} subjects"


async def _check(name: str, target: str, probe: Callable[[], Awaitable[str]], seconds: float) -> CheckResult:
    try:
        async with asyncio.timeout(seconds):
            return CheckResult(name, target, True, await probe())
    except TimeoutError:
        return CheckResult(name, target, False, f"no answer within {seconds:g} s")
    except Exception as exc:
        return CheckResult(name, target, False, str(exc) or type(exc).__name__)


async def _skipped(name: str, target: str, why: str) -> CheckResult:
    return CheckResult(name, target, True, why)


async def check_connections(settings: Settings, seconds: float = 10.0) -> list[CheckResult]:
    """Try the token endpoint, Kafka, the control topic and the schema registry (those configured), concurrently,
    each within `seconds`."""
    ime = settings.ime
    checks: list[Awaitable[CheckResult]] = []
    url = str(ime.base_url).rstrip("/") + TOKEN_PATH
    if ime.token is None:
        checks.append(_check("token endpoint", url, lambda: _token_endpoint(settings), seconds))
    else:
        checks.append(_skipped("token endpoint", url, "not tried: ime.token is a static token"))
    servers = ",".join(settings.kafka.bootstrap_servers)
    checks.append(_check("kafka", servers, lambda: _kafka(settings), seconds))
    if settings.coordination.enabled:
        checks.append(_check("coordination", settings.coordination.topic, lambda: _coordination(settings), seconds))
    if settings.schema_registry is not None:
        url = str(settings.schema_registry.url).rstrip("/")
        checks.append(_check("schema registry", url, lambda: _registry(settings), seconds))
    return list(await asyncio.gather(*checks))
