"""`ime-bridge replay`: today's normalizer and encoder over captured frames, published as the bridge would.

The frames come from a raw topic (`kafka.raw_topic`) or a capture file (bridge/capture.py), in the order
they were received: a topic's partitions are merged by receive time, so each connection's subscription
marker comes before its frames. Each frame goes through the same intake as live, with what its connection
had subscribed (from the marker; without one, from the configuration's plan) and its captured receive
time, so a replay of a whole capture yields the same updates (values equal apart from `session_id`) and
the same dead letters as the live run. A frame two replicas both received (the overlap of a handover) is
published once: a snapshot equal to one of its contract's recent ones is dropped. Records carry the
replay's session id (`replay-<uuid>`) and a `replay` header; they go to `--to-topic` (default
`kafka.topic`) and `kafka.dlq_topic`, never to the latest-state topic (an old snapshot must not overwrite
the latest) nor the raw topic.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bridge.buffer import DeliveryBuffer
from bridge.capture import read_capture
from bridge.config import KafkaSettings, Settings
from bridge.encode import load_schema
from bridge.intake import Intake
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory, Normalizer
from bridge.planner import ConnectionInfo, Subscription, plan_subscriptions
from bridge.publisher import Publisher, start_sink
from bridge.raw import CapturedFrame, NotCaptured
from bridge.records import HEADER_REPLAY, RecordKind, Sink
from bridge.sink import client_options

logger = logging.getLogger(__name__)

# A capture spanning a handover holds the overlap's frames of a contract twice (both replicas were subscribed):
# each is dropped if it equals one of the contract's last this many (more than its changes during an overlap).
REPEATS_LOOKED_BACK = 64


@dataclass
class ReplaySummary:
    """What a replay did: frames replayed, skipped by --since/--until, and records that were not raw frames."""

    session_id: str
    frames: int = 0
    outside_window: int = 0
    not_captured: int = 0
    published: int = 0
    dead_letters: int = 0


def replay_kafka_settings(kafka: KafkaSettings, to_topic: str | None) -> KafkaSettings:
    """The Kafka settings a replay publishes with: `to_topic` (or kafka.topic), no state topic, no raw topic."""
    return kafka.model_copy(update={"topic": to_topic or kafka.topic, "state_topic_enabled": False, "raw_topic": ""})


async def frames_from_file(path: Path) -> AsyncIterator[CapturedFrame | NotCaptured]:
    """The records of a capture file series, in order."""
    for item in read_capture(path):
        yield item
        await asyncio.sleep(0)


async def frames_from_topic(kafka: KafkaSettings, topic: str) -> AsyncIterator[CapturedFrame | NotCaptured]:
    """A raw topic's records up to its end at the start, its partitions merged by receive time."""
    consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        if topic not in await consumer.topics():  # also loads the topic's metadata
            raise NotCaptured(f"topic {topic!r} does not exist")
        partitions = [TopicPartition(topic, number) for number in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        # tansu (0.6) answers ListOffsets with its last batch's base offset + 1, short of a batch's other records;
        # the high watermark of the first fetch is right: the end is the larger of the two.
        corrected: set[TopicPartition] = set()
        pending: dict[TopicPartition, deque[CapturedFrame | NotCaptured]] = {p: deque() for p in partitions}
        starts = await consumer.beginning_offsets(partitions)  # past 0 once retention deleted the oldest
        done = {partition for partition in partitions if starts[partition] >= ends[partition]}
        while True:
            # Merge: the oldest head can go once every unfinished partition has one.
            hungry = [p for p in partitions if not pending[p] and p not in done]
            while hungry:
                batches = await consumer.getmany(*hungry, timeout_ms=500)
                for partition, messages in batches.items():
                    if partition not in corrected:
                        corrected.add(partition)
                        ends[partition] = max(ends[partition], consumer.highwater(partition) or 0)
                    for message in messages:
                        if message.offset < ends[partition]:
                            pending[partition].append(_captured(message))
                        if message.offset + 1 >= ends[partition]:
                            done.add(partition)
                hungry = [p for p in hungry if not pending[p] and p not in done]
            heads = [(_order(pending[p][0]), index, p) for index, p in enumerate(partitions) if pending[p]]
            if not heads:
                return
            yield pending[heapq.nsmallest(1, heads)[0][2]].popleft()
    finally:
        await consumer.stop()


def _captured(message: ConsumerRecord[bytes, bytes]) -> CapturedFrame | NotCaptured:
    try:
        return CapturedFrame.of(message.key, message.value or b"", list(message.headers or ()))
    except NotCaptured as exc:
        return exc


def _order(item: CapturedFrame | NotCaptured) -> int:
    return item.receive_time if isinstance(item, CapturedFrame) else 0


class Replay:
    """One replay: a fresh intake, buffer and publisher in front of `sink`."""

    def __init__(self, settings: Settings, sink: Sink, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics or Metrics()
        self.summary = ReplaySummary(f"replay-{uuid.uuid4()}")
        self._directory = ContractDirectory()
        self._buffer = DeliveryBuffer(settings.buffer.model_copy(update={"overflow": "conflate"}), metrics=self.metrics)
        ime = settings.ime
        self._intake = Intake(
            normalizer=Normalizer(
                session_id=self.summary.session_id, naive_timezone=ime.timezone, contracts=self._directory
            ),
            buffer=self._buffer,
            metrics=self.metrics,
            schema=load_schema(),
            max_frame_bytes=ime.max_frame_bytes,
            suppress_duplicates=settings.buffer.suppress_duplicates,
            dead_letter_raw_bytes=settings.buffer.dead_letter_raw_bytes,
            extra_headers=[(HEADER_REPLAY, self.summary.session_id.encode())],
            recent_snapshots=REPEATS_LOOKED_BACK,
        )
        self._publisher = Publisher(
            self._buffer,
            sink,
            self.metrics,
            max_batch_records=settings.round_records,
            linger=settings.kafka.linger_seconds,
        )
        # Without a marker (a capture that began mid-connection), a connection's contracts are the config's plan.
        self._planned = {
            subscription.name: subscription
            for subscription in plan_subscriptions(
                str(ime.ws_url),
                ime.contract_ids,
                ime.contract_names,
                max_contracts=ime.max_contracts_per_connection,
                max_url_length=ime.max_url_length,
            )
        }
        self._connections: dict[str, ConnectionInfo] = {}

    async def run(
        self,
        frames: AsyncIterator[CapturedFrame | NotCaptured],
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        pace: bool = False,
    ) -> ReplaySummary:
        """Replay `frames` (those received in [since, until); markers always apply) and wait until every record
        is acknowledged."""
        await start_sink(self.sink)
        publishing = asyncio.create_task(self._publisher.run(), name="replay-publisher")
        summary = self.summary
        # Never let the buffer reach conflation: wait for a round's worth, or for what it holds before conflating.
        high_water = min(self.settings.round_records, self._buffer.capacity)
        started: tuple[float, int] | None = None  # (monotonic, receive time) of the first frame, for --pace
        try:
            async for item in frames:
                if isinstance(item, NotCaptured):
                    summary.not_captured += 1
                    log_event(logger, logging.WARNING, "replay_skipped", reason=str(item)[:200])
                    continue
                if item.marker is not None:
                    self._learn(item.marker.connection, item.marker.names)
                    continue
                if (since_us is not None and item.receive_time < since_us) or (
                    until_us is not None and item.receive_time >= until_us
                ):
                    summary.outside_window += 1
                    continue
                if pace:
                    if started is None:
                        started = (time.monotonic(), item.receive_time)
                    due = started[0] + (item.receive_time - started[1]) / 1e6
                    if (wait := due - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                self._intake.on_frame(item.value, item.receive_time, self._connection(item))
                summary.frames += 1
                if len(self._buffer) >= high_water:
                    await self._drained(publishing)
            await self._drained(publishing)
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await self.sink.stop()
        published = self.metrics.registry.get_sample_value
        summary.published = int(
            published("ime_bridge_messages_published_total", {"topic": self.sink.topic(RecordKind.UPDATE)}) or 0
        )
        summary.dead_letters = int(
            published("ime_bridge_messages_published_total", {"topic": self.sink.topic(RecordKind.DEAD_LETTER)}) or 0
        )
        return summary

    async def _drained(self, publishing: asyncio.Task[None]) -> None:
        """Wait until everything is acknowledged; a publisher that failed ends the replay with its error."""
        drained = asyncio.ensure_future(self._publisher.wait_drained())
        await asyncio.wait({drained, publishing}, return_when=asyncio.FIRST_COMPLETED)
        if publishing.done():
            drained.cancel()
            publishing.result()
            raise RuntimeError("the replay's publisher stopped")

    def _learn(self, connection: ConnectionInfo, names: dict[str, str]) -> None:
        for contract_id, name in names.items():
            self._directory.learn(contract_id, name)
        self._connections[connection.label] = connection

    def _connection(self, frame: CapturedFrame) -> ConnectionInfo:
        label = f"{frame.subscription}/{frame.attempt}"
        connection = self._connections.get(label)
        if connection is None:
            planned = self._planned.get(frame.subscription)
            subscription = planned or Subscription(frame.subscription, frame.endpoint, ())
            connection = self._connections[label] = ConnectionInfo(subscription, frame.attempt)
        return connection
