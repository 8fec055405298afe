"""The session broker as tests see it (`BrokerInfo`, from the `kafka_broker` fixture of tests/integration), and
reading a topic back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord


@dataclass(frozen=True)
class BrokerInfo:
    """How to reach the session's broker and what it supports."""

    bootstrap_servers: str
    kind: str
    supports_idempotence: bool


async def consume(
    bootstrap_servers: str,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord[Any, Any]]], bool],
    within: float = 60.0,
    describe: Callable[[list[ConsumerRecord[Any, Any]]], str] = lambda records: f"{len(records)} records",
    quiet_for: float = 0.0,
) -> list[ConsumerRecord[Any, Any]]:
    """Read `topic` from the earliest offset until `until(records)` holds (tansu's "latest" is unreliable),
    then on until nothing new came for `quiet_for` seconds; on timeout, fail with `describe(records)`."""
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
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_for:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return records
