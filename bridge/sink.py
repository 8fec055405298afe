"""The Kafka side: records out, acknowledgements back.

`KafkaSink` wraps aiokafka. It picks each record's partition itself (murmur2 of the key, as the Java
client and aiokafka's default partitioner do, so every client agrees where a contract lives) and
sends one `create_batch`/`send_batch` per partition, which costs a fifth of a `send()` per record
(see ../shared/design.md). Library errors are translated here into SinkUnavailable. `MemorySink` is
the in-memory twin for unit tests.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.partitioner import murmur2

from bridge.config import KafkaSettings

Headers = list[tuple[str, bytes]]

_TOPIC_ALREADY_EXISTS = 36


@dataclass(slots=True)
class OutgoingRecord:
    """One record on its way to Kafka. `received` is the monotonic time its frame arrived."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    received: float
    dead_letter_reason: str | None = None


class SinkUnavailable(Exception):
    """Kafka could not be reached, or the producer became unusable and must be replaced."""


class NotSent(Exception):
    """The record was not handed to Kafka in this round (its partition's batch was full): send it next round."""


class Sink(Protocol):
    """Where records go. `publish` resolves once every record has an outcome."""

    async def start(self) -> None:
        """Connect; raise SinkUnavailable if Kafka cannot be reached."""
        ...

    async def publish(self, records: Sequence[OutgoingRecord]) -> list[Exception | None]:
        """Send `records` in order, per partition; one outcome per record (None = acknowledged)."""
        ...

    async def stop(self) -> None:
        """Flush what is in flight and disconnect."""
        ...


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    return ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)


def _client_options(settings: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol,
        "ssl_context": _ssl_context(settings),
    }
    if settings.sasl_mechanism is not None and settings.sasl_password is not None:
        options |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password.get_secret_value(),
        }
    return options


class KafkaSink:
    """Sink over aiokafka, `acks=all`, idempotent unless configured otherwise."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._partition_of_key: dict[tuple[str, bytes], int] = {}
        self._next_unkeyed = 0

    async def start(self) -> None:
        """Create missing topics, start the producer and learn each topic's partition count."""
        settings = self._settings
        topics = [settings.topic, settings.dlq_topic]
        try:
            if settings.create_topics:
                await self._create_missing_topics(topics)
            producer = AIOKafkaProducer(
                **_client_options(settings),
                acks="all",
                enable_idempotence=settings.enable_idempotence,
                compression_type=None if settings.compression == "none" else settings.compression,
                linger_ms=settings.linger_ms,
                max_batch_size=settings.max_batch_bytes,
            )
            await producer.start()
        except KafkaError as exc:
            raise SinkUnavailable(f"cannot start the Kafka producer: {exc!r}") from exc
        try:
            for topic in topics:
                partitions = await producer.partitions_for(topic)
                if not partitions:
                    raise SinkUnavailable(f"topic {topic!r} does not exist and kafka.create_topics is off")
                self._partitions[topic] = len(partitions)
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def _create_missing_topics(self, topics: list[str]) -> None:
        settings = self._settings
        admin = AIOKafkaAdminClient(**_client_options(settings))
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [topic for topic in topics if topic not in existing]
            if not missing:
                return
            response = await admin.create_topics(
                [NewTopic(topic, settings.partitions, settings.replication_factor) for topic in missing]
            )
            for topic, code, message in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise SinkUnavailable(f"cannot create topic {topic!r}: error {code}: {message}")
        finally:
            await admin.close()

    def _partition(self, topic: str, key: bytes | None) -> int:
        count = self._partitions[topic]
        if key is None:
            self._next_unkeyed = (self._next_unkeyed + 1) % count
            return self._next_unkeyed
        cached = self._partition_of_key.get((topic, key))
        if cached is None:
            cached = self._partition_of_key[(topic, key)] = (murmur2(key) & 0x7FFFFFFF) % count
        return cached

    async def publish(self, records: Sequence[OutgoingRecord]) -> list[Exception | None]:
        """One batch per partition, in record order; each record's outcome (None = acknowledged).

        A partition never gets a second batch in the same round, so a batch that fails cannot be
        overtaken by a later one of its partition: what does not fit comes back as NotSent.
        Raises SinkUnavailable when the producer itself failed (its sender task died).
        """
        producer = self._producer
        if producer is None:
            raise SinkUnavailable("publish before start")
        outcomes: list[Exception | None] = [None] * len(records)
        batches: dict[tuple[str, int], tuple[Any, list[int]]] = {}
        for index, record in enumerate(records):
            slot = (record.topic, self._partition(record.topic, record.key))
            batch, indices = batches.get(slot) or (None, [])
            if batch is None:
                batch = producer.create_batch()
                batches[slot] = (batch, indices)
            elif indices and indices[-1] < 0:  # this partition's batch is full for this round
                outcomes[index] = NotSent()
                continue
            if batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers) is None:
                if not indices:  # a single record larger than a whole batch
                    outcomes[index] = MessageSizeTooLargeError(f"record of {len(record.value)} bytes")
                    continue
                indices.append(-1)
                outcomes[index] = NotSent()
                continue
            indices.append(index)

        pending: list[tuple[asyncio.Future[Any], list[int]]] = []
        for (topic, partition), (batch, indices) in batches.items():
            sent = [index for index in indices if index >= 0]
            if not sent:
                continue
            try:
                pending.append((await producer.send_batch(batch, topic, partition=partition), sent))
            except KafkaError as exc:
                for index in sent:
                    outcomes[index] = exc
            except Exception as exc:
                raise SinkUnavailable(f"the producer failed: {exc!r}") from exc
        for future, sent in pending:
            try:
                await future
            except KafkaError as exc:
                for index in sent:
                    outcomes[index] = exc
            except Exception as exc:
                raise SinkUnavailable(f"the producer failed: {exc!r}") from exc
        return outcomes

    async def stop(self) -> None:
        """Flush and close the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


@dataclass
class MemorySink:
    """A Sink that keeps what it is given, for unit tests. `fail_with` makes every publish fail."""

    records: list[OutgoingRecord] = field(default_factory=list)
    fail_with: Exception | None = None
    started: bool = False

    async def start(self) -> None:
        """Mark started."""
        self.started = True

    async def publish(self, records: Sequence[OutgoingRecord]) -> list[Exception | None]:
        """Keep `records`, or fail each with `fail_with`."""
        if self.fail_with is not None:
            return [self.fail_with] * len(records)
        self.records.extend(records)
        return [None] * len(records)

    async def stop(self) -> None:
        """Mark stopped."""
        self.started = False
