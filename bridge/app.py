"""The bridge assembled: start-up in dependency order, and an ordered shutdown under a timeout.

Start: metrics endpoint (live, not ready) → token → contract lookups → Kafka → publisher → sources.
Stop (uvicorn's order): stop intake (close the WebSockets with 1001), drain the buffer, flush the
producer, stop serving; whatever is still unacknowledged when the timeout runs out is counted and
logged as undelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bridge import __version__
from bridge.auth import IssuedToken, StaticToken, TokenProvider
from bridge.buffer import DeliveryBuffer, Overflow
from bridge.catalog import CatalogUnavailable, ContractCatalog, HttpContractCatalog
from bridge.config import Settings
from bridge.encode import load_schema
from bridge.health import HealthServer
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import Normalizer
from bridge.pipeline import FramePipeline, Publisher
from bridge.planner import plan_subscriptions
from bridge.protocol import Endpoint
from bridge.sink import KafkaSink, Sink, SinkUnavailable
from bridge.source import Backoff, SourceSettings, WebSocketSource
from bridge.spool import Spool

logger = logging.getLogger(__name__)


class PublisherFailed(Exception):
    """The publisher task ended with an error: records would no longer reach Kafka."""


@dataclass
class Bridge:
    """One bridge process. `run()` until `stop` is set; the parts are replaceable for tests."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    sink: Sink | None = None
    catalog: ContractCatalog | None = None
    health_port: int | None = None
    kafka_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _source: WebSocketSource | None = None
    _publisher: Publisher | None = None
    _publisher_task: asyncio.Task[None] | None = None
    _buffer: DeliveryBuffer | None = None
    _fsync_task: asyncio.Task[None] | None = None
    _sink_started: bool = False

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when Kafka takes records and at least one subscription is connected."""
        source = self._source
        connections = source.status() if source is not None else {}
        up = source.connections_up if source is not None else 0
        kafka = self._sink_started and (self._publisher is None or self._publisher.healthy)
        ready = kafka and up > 0
        self.metrics.ready.set(1 if ready else 0)
        detail: dict[str, Any] = {"kafka": kafka, "connections_up": up, "connections": connections}
        if self._buffer is not None:
            detail["buffer_records"] = len(self._buffer)
            detail["spool_full"] = self._buffer.spool_full
        return ready, detail

    async def run(self, stop: asyncio.Event) -> None:
        """Run the bridge until `stop` is set, then shut down in order."""
        settings = self.settings
        self.metrics.build_info.info({"version": __version__, "session_id": self.session_id})
        health = HealthServer(self.metrics.registry, self.readiness, settings.metrics.host, settings.metrics.port)
        await health.start()
        self.health_port = health.port
        log_event(logger, logging.INFO, "starting", session_id=self.session_id, metrics_port=health.port)
        try:
            async with aiohttp.ClientSession() as http:
                tokens = self._token_provider(http)
                catalog = self.catalog or HttpContractCatalog(
                    http, str(settings.ime.base_url), tokens, timeout=settings.ime.http_timeout_seconds
                )
                started = await _until_stopped(stop, self._start(tokens, catalog, stop))
                try:
                    if started:
                        await self._run_until(stop)
                finally:
                    await self._shutdown()
        finally:
            await health.stop()

    async def _run_until(self, stop: asyncio.Event) -> None:
        """Wait for `stop`; a publisher that dies instead takes the process down rather than leaving it mute."""
        assert self._publisher_task is not None
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, self._publisher_task}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if self._publisher_task.done() and not self._publisher_task.cancelled():
            error = self._publisher_task.exception()
            log_event(logger, logging.CRITICAL, "publisher_failed", error=repr(error))
            raise PublisherFailed("the publisher stopped unexpectedly") from error

    def _token_provider(self, http: aiohttp.ClientSession) -> TokenProvider:
        ime = self.settings.ime
        if ime.token is not None:
            return StaticToken(ime.token.get_secret_value())
        assert ime.username is not None  # ImeSettings requires a token or both credentials
        assert ime.password is not None
        return IssuedToken(
            http,
            str(ime.base_url),
            ime.username,
            ime.password.get_secret_value(),
            sdk_field_names=ime.token_form == "sdk",
            timeout=ime.http_timeout_seconds,
        )

    async def _start(self, tokens: TokenProvider, catalog: ContractCatalog, stop: asyncio.Event) -> None:
        settings = self.settings
        ime = settings.ime
        names_by_id, ids_by_name = await self._resolve_contracts(catalog, stop)
        subscriptions = plan_subscriptions(
            str(ime.ws_url),
            ime.contract_ids,
            [name for name in ime.contract_names if name in ids_by_name],
            max_contracts=ime.max_contracts_per_connection,
            max_url_length=ime.max_url_length,
        )
        sink = self.sink or KafkaSink(settings.kafka)
        self.sink = sink
        await self._start_sink(sink, stop)

        buffer = self._open_buffer()
        self._buffer = buffer
        pipeline = FramePipeline(
            normalizer=Normalizer(
                session_id=self.session_id,
                naive_timezone=ime.timezone,
                names_by_id=names_by_id,
                ids_by_name=ids_by_name,
            ),
            buffer=buffer,
            metrics=self.metrics,
            schema=load_schema(),
            topic=settings.kafka.topic,
            dlq_topic=settings.kafka.dlq_topic,
            max_frame_bytes=ime.max_frame_bytes,
            suppress_duplicates=settings.buffer.suppress_duplicates,
        )
        self._publisher = Publisher(
            buffer,
            sink,
            self.metrics,
            dlq_topic=settings.kafka.dlq_topic,
            max_batch_records=settings.buffer.max_batch_records,
        )
        self._publisher_task = asyncio.create_task(self._publisher.run(), name="publisher")
        if buffer.spool is not None:
            self._fsync_task = asyncio.create_task(
                self._sync_spool(buffer, settings.buffer.spool_fsync_interval_seconds), name="spool-fsync"
            )
        self._source = WebSocketSource(
            settings=SourceSettings(
                ws_url=str(ime.ws_url),
                bearer=ime.bearer,
                compression=ime.compression,
                open_timeout=ime.open_timeout_seconds,
                ping_interval=ime.ping_interval_seconds,
                ping_timeout=ime.ping_timeout_seconds,
                reconnect_min=ime.reconnect_min_seconds,
                reconnect_max=ime.reconnect_max_seconds,
                healthy_after=ime.healthy_after_seconds,
                max_message_bytes=4 * ime.max_frame_bytes,
            ),
            tokens=tokens,
            handler=pipeline.on_frame,
            metrics=self.metrics,
            subscriptions=subscriptions,
        )
        self._source.start()
        log_event(
            logger,
            logging.INFO,
            "started",
            connections=len(subscriptions),
            contract_ids=len(ime.contract_ids),
            contract_names=len(ids_by_name),
            topic=settings.kafka.topic,
        )

    def _open_buffer(self) -> DeliveryBuffer:
        """The delivery buffer; in spool mode, the spool is recovered first (replayed before anything new)."""
        config = self.settings.buffer
        spool = None
        if config.overflow == "spool":
            assert config.spool_dir is not None  # required by BufferSettings
            spool = Spool(config.spool_dir, max_bytes=config.spool_max_bytes)
            recovery = spool.open()
            self.metrics.spool_damaged_entries.inc(recovery.torn_entries + recovery.corrupt_segments)
            log_event(
                logger,
                logging.INFO,
                "spool_opened",
                directory=str(config.spool_dir),
                records=recovery.records,
                bytes=recovery.bytes,
                torn_entries=recovery.torn_entries,
                corrupt_segments=recovery.corrupt_segments,
            )
        return DeliveryBuffer(
            capacity=config.capacity_records,
            overflow=Overflow(config.overflow),
            metrics=self.metrics,
            spool=spool,
            spool_after=config.spool_after_records,
            topics=(self.settings.kafka.topic, self.settings.kafka.dlq_topic),
        )

    @staticmethod
    async def _sync_spool(buffer: DeliveryBuffer, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            buffer.sync()

    async def _resolve_contracts(
        self, catalog: ContractCatalog, stop: asyncio.Event
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Names must resolve to ids (they key the records): retried until the lookup answers.

        Names of subscribed ids only label records, so one failed attempt is logged and accepted.
        """
        ime = self.settings.ime
        ids_by_name: dict[str, str] = {}
        backoff = Backoff(ime.reconnect_min_seconds, ime.reconnect_max_seconds)
        while ime.contract_names and not stop.is_set():
            try:
                refs = await catalog.by_names(ime.contract_names)
                break
            except CatalogUnavailable as exc:
                log_event(logger, logging.WARNING, "name_lookup_failed", error=str(exc))
                await asyncio.sleep(backoff.next_delay())
        else:
            refs = {}
        ids_by_name = {name: ref.contract_id for name, ref in refs.items()}
        for name in ime.contract_names:
            if name not in ids_by_name:
                log_event(logger, logging.ERROR, "contract_name_unresolved", contract_name=name)
        names_by_id = {ref.contract_id: name for name, ref in refs.items()}
        if ime.contract_ids:
            try:
                described = await catalog.by_ids(ime.contract_ids)
                names_by_id |= {contract_id: ref.contract_name for contract_id, ref in described.items()}
            except CatalogUnavailable as exc:
                log_event(logger, logging.WARNING, "id_lookup_failed", error=str(exc))
        return names_by_id, ids_by_name

    async def _start_sink(self, sink: Sink, stop: asyncio.Event) -> None:
        """Kafka may be down at start: keep trying (not ready meanwhile)."""
        backoff = Backoff(1.0, 30.0)
        while not stop.is_set():
            try:
                await sink.start()
                self._sink_started = True
                self.kafka_ready.set()
                log_event(logger, logging.INFO, "kafka_connected")
                return
            except SinkUnavailable as exc:
                delay = backoff.next_delay()
                log_event(logger, logging.WARNING, "kafka_unavailable", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    async def _shutdown(self) -> None:
        timeout = self.settings.shutdown_timeout_seconds
        log_event(logger, logging.INFO, "stopping", timeout_seconds=timeout)
        publisher = self._publisher
        try:
            async with asyncio.timeout(timeout):
                if self._source is not None:
                    await self._source.stop()
                if publisher is not None and self._publisher_task is not None and not self._publisher_task.done():
                    await publisher.wait_drained()
        except TimeoutError:
            log_event(logger, logging.ERROR, "shutdown_timeout", timeout_seconds=timeout)
        for task in (self._publisher_task, self._fsync_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        undelivered = 0
        if self._buffer is not None and publisher is not None:
            undelivered = self._buffer.close(publisher.in_flight) + publisher.undeliverable
        if self.sink is not None and self._sink_started:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(max(1.0, timeout / 4)):
                    await self.sink.stop()
        self.metrics.undelivered_at_shutdown.set(undelivered)
        received = sum(
            self.metrics.registry.get_sample_value("ime_bridge_messages_received_total", {"endpoint": endpoint}) or 0
            for endpoint in Endpoint
        )
        log_event(
            logger,
            logging.INFO if undelivered == 0 else logging.ERROR,
            "stopped",
            received=int(received),
            undelivered=undelivered,
            kept_in_spool=self._buffer is not None and self._buffer.spool is not None,
        )


async def _until_stopped(stop: asyncio.Event, work: Any) -> bool:
    """Run `work` unless `stop` is set first; True when the work completed."""
    work_task = asyncio.ensure_future(work)
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({work_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if work_task in done:
        work_task.result()
        return True
    work_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work_task
    return False
