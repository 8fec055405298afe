"""The Kafka side: records out, acknowledgements back.

`KafkaSink` wraps aiokafka. It picks each record's partition itself (murmur2 of the key, as the Java
client and aiokafka's default partitioner do, so every client agrees where a contract lives), builds
one batch per partition and hands it over with `send_batch`, which costs a fifth of a `send()` per record
(see ../shared/design.md). Only this module knows Kafka (with bridge/batches.py, the batches themselves): it maps
each record's kind to its topic and translates aiokafka's errors into the outcomes and errors of bridge/records.py.

Updates also go to the latest-state topic (compacted, same key, value and headers): each contract's newest
update of every publish round, under the same one-batch-per-partition rule, so per-contract order holds on
both topics, and that update counts as delivered only once both topics acknowledged it. With a schema
registry, update values are framed in Confluent's wire format (bridge/registry.py registers the schemas at
start); dead letters stay raw frames. Every batch is compressed by its builder (kafka.compression, or
kafka.raw_compression for the raw records of kafka.raw_topic), not by the producer, which never compresses;
a round's batches are sent closed, as one produce request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError, UnknownError
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatch

from bridge.batches import RoundBatch, compress_zstd_at
from bridge.config import KafkaSettings, SchemaRegistrySettings
from bridge.encode import Schema, load_schema
from bridge.logs import log_event
from bridge.records import (
    KIND_RAW,
    KIND_UPDATE,
    NOT_SENT,
    Failed,
    Headers,
    Outcome,
    OutgoingRecord,
    RawFrames,
    RecordKind,
    SinkFatal,
    SinkUnavailable,
    TooLarge,
    frame_count,
    raw_headers,
)
from bridge.registry import SchemaRegistry, wire_prefix

logger = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
# The latest-state topic keeps the newest record per key; older ones are compacted away.
STATE_TOPIC_CONFIG = {"cleanup.policy": "compact"}
_TLS_PROBE_SECONDS = 2.0  # the TLS diagnosis's budget: a handshake and a refusal right after it


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of SSL and SASL_SSL, with the client certificate when one is configured.

    Raises SinkFatal naming the key when a file cannot be loaded: retrying cannot fix that.
    """
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        context = ssl.create_default_context(cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise SinkFatal(f"kafka.ssl_cafile {settings.ssl_cafile}: cannot load the CA bundle: {exc}") from None
    if settings.ssl_certfile is not None:
        password = settings.ssl_key_password.get_secret_value() if settings.ssl_key_password else None
        try:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password)
        except (OSError, ssl.SSLError) as exc:
            files = f"kafka.ssl_certfile {settings.ssl_certfile}" + (
                f", kafka.ssl_keyfile {settings.ssl_keyfile}" if settings.ssl_keyfile else " (no kafka.ssl_keyfile)"
            )
            raise SinkFatal(f"{files}: cannot load the client certificate and key: {exc}") from None
    return context


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """aiokafka connection options (servers, TLS, SASL) shared by the producer, the admin client and tail.

    Raises SinkFatal when the TLS files cannot be loaded.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": settings.security_protocol,
        "ssl_context": _ssl_context(settings),
    }
    if settings.sasl_mechanism == "OAUTHBEARER":
        from bridge.kafka_oauth import ClientCredentialsTokenProvider

        options |= {
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauth_token_provider": ClientCredentialsTokenProvider(settings),
        }
    elif settings.sasl_mechanism is not None and settings.sasl_password is not None:
        options |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password.get_secret_value(),
        }
    return options


async def tls_diagnosis(settings: KafkaSettings) -> str | None:
    """Why TLS to the first bootstrap server fails, or None when it does not (or TLS is off).

    It names the TLS error (e.g. the broker requires a client certificate). Under TLS 1.3 a server refuses
    the client's certificate after the handshake, so the first read is awaited too, briefly: a broker sends
    nothing unasked.
    """
    context = _ssl_context(settings)
    if context is None:
        return None
    host, _, port = settings.bootstrap_servers[0].rpartition(":")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(_TLS_PROBE_SECONDS):
            reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
            await reader.read(1)
    except TimeoutError:
        return None
    except (OSError, ssl.SSLError) as exc:
        return f"TLS to {settings.bootstrap_servers[0]}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    return None


async def oauth_diagnosis(settings: KafkaSettings) -> str | None:
    """Why no OAUTHBEARER token can be had, or None when one can (or the mechanism is another)."""
    if settings.sasl_mechanism != "OAUTHBEARER":
        return None
    from bridge.kafka_oauth import ClientCredentialsTokenProvider, TokenEndpointError

    try:
        await ClientCredentialsTokenProvider(settings).token()
    except TokenEndpointError as exc:
        return str(exc)
    return None


async def _why(settings: KafkaSettings, exc: KafkaError) -> str:
    """What to append to a connection failure's message: the TLS or token failure behind it ("" if none).

    aiokafka reports both only as "Unable to bootstrap" (and in its own log).
    """
    if not isinstance(exc, KafkaConnectionError):
        return ""
    diagnosis = await tls_diagnosis(settings) or await oauth_diagnosis(settings)
    return f" ({diagnosis})" if diagnosis else ""


class KafkaSink:
    """Sink over aiokafka, `acks=all`, idempotent unless configured otherwise."""

    def __init__(
        self,
        settings: KafkaSettings,
        registry: SchemaRegistrySettings | None = None,
        *,
        schema: Schema | None = None,
        on_state_published: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_state_published = on_state_published
        self._schema = schema or load_schema()
        self._registry: SchemaRegistry | None = None
        if registry is not None:
            # Raises RegistryClientMissing (SinkFatal) without the `registry` extra; it loads confluent-kafka lazily.
            self._registry = SchemaRegistry(registry)
        self._state_topic = settings.state_topic if settings.state_topic_enabled else None
        self._topics = {
            RecordKind.UPDATE: settings.topic,
            RecordKind.DEAD_LETTER: settings.dlq_topic,
            RecordKind.STATE: settings.state_topic,
            RecordKind.RAW: settings.raw_topic,
        }
        # The wire-format prefix of update values on each topic; empty without a registry (b"" + value is value).
        self._updates_prefix = self._state_prefix = b""
        self._producer: AIOKafkaProducer | None = None
        self._codec = 0  # aiokafka's numbers of kafka.compression and kafka.raw_compression, checked at start
        self._raw_codec = 0
        self._partitions: dict[str, int] = {}
        self._partition_of_key: dict[tuple[str, bytes], int] = {}
        self._raw_partition_of_key: dict[bytes, int] = {}
        self._partitions_of_update: dict[bytes, tuple[int, int]] = {}
        self._next_unkeyed = 0

    def topic(self, kind: RecordKind) -> str:
        """The topic of `kind` (kafka.topic, kafka.dlq_topic or kafka.state_topic)."""
        return self._topics[kind]

    async def start(self) -> None:
        """Register the value schemas (registry only), create missing topics, start the producer.

        Raises SinkUnavailable when Kafka or the registry cannot be reached (the caller retries), and
        SinkFatal when the registry refuses the schema or the credentials.
        """
        settings = self._settings
        if self._registry is not None:
            try:
                self._updates_prefix = wire_prefix(await self._registry.register(settings.topic, self._schema))
                if self._state_topic is not None:
                    self._state_prefix = wire_prefix(await self._registry.register(self._state_topic, self._schema))
            finally:
                self._registry.close()  # the ids are cached: no connection is kept between starts
        topics = settings.topics
        try:
            if settings.create_topics:
                await self._create_missing_topics(topics)
        except KafkaError as exc:
            raise SinkUnavailable(f"cannot create the topics: {exc!r}{await _why(settings, exc)}") from exc
        self._codec = _codec(settings.compression, "compression")
        self._raw_codec = _codec(settings.raw_compression, "raw_compression")
        compress_zstd_at(settings.zstd_level)
        producer = AIOKafkaProducer(
            **client_options(settings),
            acks="all",
            enable_idempotence=settings.enable_idempotence,
            linger_ms=0,  # the publisher lingers, per round (batches are sent closed, so this would not apply)
            max_batch_size=settings.batch_bytes,
        )
        try:
            await producer.start()
            for topic in topics:
                partitions = await producer.partitions_for(topic)
                if not partitions:
                    raise SinkUnavailable(f"topic {topic!r} does not exist and kafka.create_topics is off")
                self._partitions[topic] = len(partitions)
        except BaseException as exc:
            await producer.stop()  # also after a failed start: its connections and tasks are open
            if isinstance(exc, KafkaError):
                raise SinkUnavailable(f"cannot start the Kafka producer: {exc!r}{await _why(settings, exc)}") from exc
            raise
        self._producer = producer

    async def _create_missing_topics(self, topics: list[str]) -> None:
        settings = self._settings
        admin = AIOKafkaAdminClient(**client_options(settings))
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [topic for topic in topics if topic not in existing]
            if not missing:
                return
            await create_topics(
                admin,
                [
                    NewTopic(
                        topic,
                        settings.partitions,
                        settings.replication_factor,
                        topic_configs=STATE_TOPIC_CONFIG if topic == self._state_topic else {},
                    )
                    for topic in missing
                ],
            )
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

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Outcome]:
        """One batch per partition per topic, in record order; each record's outcome (None = acknowledged), then
        each raw frame's (the frames of `raw` go to the raw topic after the round's records, in order).

        A partition never gets a second batch in the same round, so a batch that fails cannot be
        overtaken by a later one of its partition: what does not fit comes back as NotSent.

        The newest update of each contract in the round also goes to the latest-state topic (the older
        ones of the round would only be compacted away), first: if it does not fit there, it goes to
        neither topic this round and is sent again, state copy included, before anything newer; if it
        fits there but not in the updates topic, the state topic merely gets it twice, which a
        latest-state reader cannot tell from once. Such an update is acknowledged once both topics
        acknowledged it. Raises SinkUnavailable when the producer itself failed (its sender task died).
        """
        producer = self._producer
        if producer is None:
            raise SinkUnavailable("publish before start")
        outcomes: list[Outcome] = [None] * (len(records) + frame_count(raw))
        updates_topic, state_topic = self._settings.topic, self._state_topic
        updates_prefix, state_prefix = self._updates_prefix, self._state_prefix
        # Batches by partition: of the updates topic, of the state topic, and by (topic, partition) of others.
        updates: dict[int, RoundBatch] = {}
        states: dict[int, RoundBatch] = {}
        others: dict[tuple[str, int], RoundBatch] = {}
        partitions_of_update = self._partitions_of_update
        new_batch = self._batch
        # The state topic needs only each contract's newest update of the round (compaction keeps no other).
        newest = {r.key: i for i, r in enumerate(records) if r.kind is KIND_UPDATE} if state_topic is not None else {}
        for index, record in enumerate(records):
            key = record.key
            kind = record.kind
            if kind is not KIND_UPDATE or key is None:
                topic = self._topics[kind]
                slot = (topic, self._partition(topic, key))
                raw_kind = kind is KIND_RAW  # a subscription marker, or spool mode's raw frame
                batch = others.get(slot) or others.setdefault(slot, self._raw_batch() if raw_kind else new_batch())
                # A raw record is stamped with its receive time, the others with the time they are batched.
                timestamp = int(record.received * 1000) if raw_kind else None
                outcome = batch.add(key, record.value, record.headers, index, timestamp)
            else:
                partition, state_partition = partitions_of_update.get(key) or self._update_partitions(key)
                batch = updates.get(partition) or updates.setdefault(partition, new_batch())
                if batch.full:
                    outcome = NOT_SENT
                elif newest.get(key) != index:
                    outcome = batch.add(key, updates_prefix + record.value, record.headers, index)
                else:
                    state = states.get(state_partition) or states.setdefault(state_partition, new_batch())
                    outcome = state.add(key, state_prefix + record.value, record.headers, index)
                    if outcome is None:
                        outcome = batch.add(key, updates_prefix + record.value, record.headers, index)
            if outcome is not None:
                outcomes[index] = outcome
        if raw:
            self._add_raw(raw, len(records), others, outcomes)

        pending: list[tuple[asyncio.Future[Any], list[int], str]] = []
        slots = [
            *(((updates_topic, partition), batch) for partition, batch in updates.items()),
            *(((state_topic, partition), batch) for partition, batch in states.items() if state_topic is not None),
            *others.items(),
        ]
        for (topic, partition), batch in slots:
            if not batch.indices:
                continue
            # The round is complete: a closed batch is ready at once. An open one would wait out aiokafka's
            # linger, measured per batch, so a round's batches fell due microseconds apart and went out as
            # two produce requests, the second only after the first was acknowledged.
            batch.close()
            try:
                future = await producer.send_batch(batch, topic, partition=partition)
                pending.append((future, batch.indices, topic))
            except KafkaError as exc:
                for index in batch.indices:
                    outcomes[index] = _failed(exc)
            except Exception as exc:
                raise SinkUnavailable(f"the producer failed: {exc!r}") from exc
        state_copies = 0
        for future, sent, topic in pending:
            try:
                await future
            except KafkaError as exc:
                if topic == self._topics[RecordKind.RAW]:
                    self._raw_batch_failed(exc)
                for index in sent:
                    outcomes[index] = _failed(exc)
            except Exception as exc:
                raise SinkUnavailable(f"the producer failed: {exc!r}") from exc
            else:
                state_copies += len(sent) if topic == state_topic else 0
        if state_copies and self._on_state_published is not None:
            self._on_state_published(state_copies)
        return outcomes

    def _add_raw(
        self,
        raw: Sequence[RawFrames],
        index: int,
        batches: dict[tuple[str, int], RoundBatch],
        outcomes: list[Outcome],
    ) -> None:
        """Add the raw frames (outcomes from `index` on) to the raw topic's batches, one per partition.

        The frames are sorted by partition first, then each partition's go into its batch in one run: a batch's
        buffer grows by reallocation, and batches growing in turn would each be moved (copied) far more often.
        """
        topic = self._topics[KIND_RAW]
        # Per partition: (index, frame, key, headers, timestamp) of its frames, in order.
        by_partition: list[list[tuple[int, bytes, bytes | None, Headers, int]]] = [
            [] for _ in range(self._partitions[topic])
        ]
        # By key alone: `_partition`'s cache is keyed by (topic, key), a tuple to build per frame.
        partition_of_key = self._raw_partition_of_key
        for block in raw:
            # The headers, once per burst; the receive time is also the frames' Kafka timestamp (in ms; aiokafka
            # would read the clock for each record without one).
            receive_time = block.receive_time
            headers = raw_headers(block.labels, receive_time)
            timestamp = receive_time // 1000
            for frame, key in zip(block.frames, block.keys, strict=True):
                partition = partition_of_key.get(key) if key is not None else None
                if partition is None:
                    partition = self._partition(topic, key)
                    if key is not None:
                        partition_of_key[key] = partition
                by_partition[partition].append((index, frame, key, headers, timestamp))
                index += 1
        for partition, frames in enumerate(by_partition):
            if not frames:
                continue
            batch = batches.get((topic, partition)) or batches.setdefault((topic, partition), self._raw_batch())
            # batch.add, inlined: a call per frame is a tenth of this loop's cost.
            append, indices = batch.append_record, batch.indices
            for index, frame, key, headers, timestamp in frames:
                if not batch.full and append(len(indices), timestamp, key, frame, headers) is not None:
                    indices.append(index)
                else:
                    outcomes[index] = batch.refused()

    def _raw_batch_failed(self, exc: KafkaError) -> None:
        """A broker without zstd (before Kafka 2.1) refuses such batches with UNSUPPORTED_COMPRESSION_TYPE, which
        aiokafka knows only as UnknownError: the raw topic's batches then go uncompressed (and are sent again)."""
        if isinstance(exc, UnknownError) and self._raw_codec == DefaultRecordBatch.CODEC_ZSTD:
            self._raw_codec = int(DefaultRecordBatch.CODEC_NONE)
            log_event(logger, logging.WARNING, "raw_compression_refused", compression="zstd", now="none")

    def _batch(self) -> RoundBatch:
        """A batch of the updates, state or dead-letter topic, compressed with kafka.compression."""
        return RoundBatch(self._settings.batch_bytes, self._codec)

    def _raw_batch(self) -> RoundBatch:
        """A batch of the raw topic, compressed with kafka.raw_compression."""
        return RoundBatch(self._settings.batch_bytes, self._raw_codec)

    def _update_partitions(self, key: bytes) -> tuple[int, int]:
        """The partitions of an update's key on the updates and the state topic (cached)."""
        state_topic = self._state_topic
        partitions = (
            self._partition(self._settings.topic, key),
            self._partition(state_topic, key) if state_topic is not None else -1,
        )
        self._partitions_of_update[key] = partitions
        return partitions

    async def stop(self) -> None:
        """Flush and close the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


async def create_topics(admin: AIOKafkaAdminClient, topics: list[NewTopic]) -> None:
    """Create `topics`; one that exists already (another process was faster) is fine. Raises SinkUnavailable
    naming a topic the broker refused."""
    response = await admin.create_topics(topics)
    for topic, code, message in response.topic_errors:
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            raise SinkUnavailable(f"cannot create topic {topic!r}: error {code}: {message}")


def _codec(compression: str, key: str) -> int:
    """aiokafka's codec number of the value of kafka.`key`; SinkFatal when its library is missing."""
    if compression == "none":
        return int(DefaultRecordBatch.CODEC_NONE)
    available, codec = AIOKafkaProducer._COMPRESSORS[compression]
    if not available():
        raise SinkFatal(f"kafka.{key} {compression}: its codec is not installed (cramjam)")
    return int(codec)


def _failed(exc: KafkaError) -> Failed:
    """The outcome of a record Kafka refused with `exc`."""
    return TooLarge() if isinstance(exc, MessageSizeTooLargeError) else Failed(type(exc).__name__)
