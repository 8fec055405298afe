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
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bridge import __version__
from bridge.auth import IssuedToken, StaticToken, TokenProvider
from bridge.buffer import DeliveryBuffer
from bridge.catalog import ContractCatalog, HttpContractCatalog
from bridge.config import ConfigError, Settings, load_settings
from bridge.coordination import KafkaShardGroup, ShardGroup, SoleOwner
from bridge.encode import load_schema
from bridge.handover import ShardKeeper
from bridge.health import HealthServer
from bridge.intake import Intake
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory, Normalizer, RejectReason
from bridge.protocol import Endpoint
from bridge.publisher import Publisher, start_sink
from bridge.records import Sink, SinkFatal
from bridge.sink import KafkaSink
from bridge.source import WebSocketSource
from bridge.spool import Spool, SpoolError
from bridge.subscriptions import SubscriptionManager
from bridge.supervise import every, supervised

logger = logging.getLogger(__name__)


class PublisherFailed(Exception):
    """The publisher task ended with an error: records would no longer reach Kafka."""


@dataclass
class _Running:
    """The parts a start assembled once Kafka answered; all of them exist together (built without waiting)."""

    buffer: DeliveryBuffer
    publisher: Publisher
    publisher_task: asyncio.Task[None]
    source: WebSocketSource
    manager: SubscriptionManager
    keeper: ShardKeeper
    keeper_task: asyncio.Task[None]
    spool_task: asyncio.Task[None] | None  # spool mode only


@dataclass
class Bridge:
    """One bridge process. `run()` until `stop` is set; the parts are replaceable for tests."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    sink: Sink | None = None
    catalog: ContractCatalog | None = None
    health_port: int | None = None
    config_path: Path | None = None
    # `ime-bridge capture`: frames only become raw records (no parsing), for a capture file's sink.
    raw_only: bool = False
    kafka_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _running: _Running | None = None  # set once the start assembled the parts
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _reload_requested: asyncio.Event = field(default_factory=asyncio.Event)
    _sink_started: bool = False

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when Kafka takes records and at least one subscription is connected; with the details /readyz
        shows."""
        ready, kafka, up = self._ready()
        running = self._running
        if running is None:
            return ready, {"kafka": kafka, "connections_up": up, "connections": {}}
        return ready, {
            "kafka": kafka,
            "connections_up": up,
            "connections": running.source.status(),
            "buffer_records": len(running.buffer),
            "spool_full": running.buffer.spool_full,
            "quarantined": running.manager.status(),
            "shards": running.keeper.status(),
        }

    def _ready(self) -> tuple[bool, bool, int]:
        """(ready, Kafka takes records, connections up), and ime_bridge_ready set to match."""
        running = self._running
        kafka = self._sink_started and (running is None or running.publisher.healthy)
        up = running.source.connections_up if running is not None else 0
        # A replica of a group may own no contract while the others serve them all: ready, and /readyz says so.
        ready = running is not None and kafka and (up > 0 or running.keeper.serves_nothing())
        self.metrics.ready.set(1 if ready else 0)
        return ready, kafka, up

    def _refresh_gauges(self) -> None:
        """Keep ime_bridge_ready and ime_bridge_trading_session_open current without anyone polling /readyz,
        so that a scrape of /metrics alone tells the truth (Docker's HEALTHCHECK polls only /healthz). Only the
        gauges: the details /readyz shows are built when it is asked."""
        self._ready()
        self.metrics.trading_session_open.set(1 if self.settings.ime.calendar.is_open(datetime.now(UTC)) else 0)

    def request_reload(self) -> None:
        """SIGHUP: re-read the configuration file and reconcile the subscriptions."""
        self._reload_requested.set()

    async def _reload_on_request(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            if self._running is None:
                continue
            try:
                settings = load_settings(self.config_path)
            except ConfigError as exc:
                log_event(logger, logging.ERROR, "reload_refused", problems="; ".join(exc.problems))
                continue
            if settings.model_dump(exclude={"ime"}) != self.settings.model_dump(exclude={"ime"}):
                log_event(
                    logger, logging.WARNING, "reload_partial", note="only ime.* applies live; restart for the rest"
                )
            opened = await self._running.manager.reload(settings.ime)
            log_event(logger, logging.INFO, "reloaded", reopened=sorted(opened))

    async def run(self, stop: asyncio.Event) -> None:
        """Run the bridge until `stop` is set, then shut down in order."""
        settings = self.settings
        self.metrics.build_info.info({"version": __version__, "session_id": self.session_id})
        health = HealthServer(self.metrics.registry, self.readiness, settings.metrics.host, settings.metrics.port)
        await health.start()
        self.health_port = health.port
        gauges = every(1.0, self._refresh_gauges, task="gauges", metrics=self.metrics, immediately=True)
        self._background.append(asyncio.create_task(gauges, name="gauges"))
        await asyncio.sleep(0)  # the first tick, before anything can scrape
        log_event(logger, logging.INFO, "starting", session_id=self.session_id, metrics_port=health.port)
        try:
            async with aiohttp.ClientSession() as http:
                tokens = self._token_provider(http)
                catalog = self.catalog or HttpContractCatalog(http, settings.ime, tokens)
                try:  # a start that fails half-way still stops what it started (the Kafka producer, say)
                    if await _until_stopped(stop, self._start(tokens, catalog)):
                        await self._run_until(stop)
                finally:
                    await self._shutdown()
        finally:
            await health.stop()

    async def _run_until(self, stop: asyncio.Event) -> None:
        """Wait for `stop`; a publisher that dies instead takes the process down rather than leaving it mute."""
        assert self._running is not None  # a completed start assembled it
        publisher_task = self._running.publisher_task
        stopped = asyncio.create_task(stop.wait())
        source_failed = asyncio.create_task(self._running.source.fatal())
        await asyncio.wait({stopped, source_failed, publisher_task}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        source_failed.cancel()
        if source_failed.done() and not source_failed.cancelled():
            fatal = source_failed.result()
            log_event(logger, logging.CRITICAL, "source_failed", error=str(fatal))
            raise fatal
        if publisher_task.done() and not publisher_task.cancelled():
            error = publisher_task.exception()
            log_event(logger, logging.CRITICAL, "publisher_failed", error=repr(error))
            raise PublisherFailed("the publisher stopped unexpectedly") from error

    def _token_provider(self, http: aiohttp.ClientSession) -> TokenProvider:
        ime = self.settings.ime
        if ime.token is not None:
            return StaticToken(ime.token.get_secret_value())
        tokens = IssuedToken(
            http,
            ime,
            on_issue=self._token_issued,
            on_held_back=self.metrics.token_requests_held_back.inc,
        )
        refresh = supervised("token-refresh", tokens.refresh_ahead, metrics=self.metrics)
        self._background.append(asyncio.create_task(refresh, name="token-refresh"))
        return tokens

    def _token_issued(self, outcome: str, expires_at: float | None) -> None:
        self.metrics.token_refreshes.labels(outcome).inc()
        if outcome == "ok":
            self.metrics.token_expiry.set(expires_at or 0)
        log_event(logger, logging.INFO if outcome == "ok" else logging.ERROR, "token_issued", outcome=outcome)

    async def _start(self, tokens: TokenProvider, catalog: ContractCatalog) -> None:
        settings = self.settings
        ime = settings.ime
        sink = self.sink or KafkaSink(
            settings.kafka, settings.schema_registry, on_state_published=self.metrics.state_records_published.inc
        )
        self.sink = sink
        await self._start_sink(sink)

        # Assembled without waiting, so that a stop finds either none of these parts or all of them.
        contracts = ContractDirectory()  # written by the subscription manager, read by the normalizer
        buffer = self._open_buffer()
        intake = Intake(
            normalizer=Normalizer(
                session_id=self.session_id,
                naive_timezone=ime.timezone,
                contracts=contracts,
            ),
            buffer=buffer,
            metrics=self.metrics,
            schema=load_schema(),
            max_frame_bytes=ime.max_frame_bytes,
            suppress_duplicates=settings.buffer.suppress_duplicates,
            dead_letter_raw_bytes=settings.buffer.dead_letter_raw_bytes,
            capture_raw=self.raw_only or bool(settings.kafka.raw_topic),
            normalize=not self.raw_only,
        )
        publisher = Publisher(
            buffer,
            sink,
            self.metrics,
            max_batch_records=settings.round_records,
            linger=settings.kafka.linger_seconds,
        )
        spool_task = None
        if buffer.spool is not None:
            # Often enough to spill records that waited spool_after_seconds while nothing new arrived.
            interval = min(settings.buffer.spool_fsync_interval_seconds, settings.buffer.spool_after_seconds / 4)
            spool_task = asyncio.create_task(
                every(interval, lambda: buffer.maintain(time.time()), task="spool-maintenance", metrics=self.metrics),
                name="spool-maintenance",
            )
        source = WebSocketSource(
            settings=ime,
            tokens=tokens,
            handler=intake.on_burst,
            on_frame_too_large=intake.on_frame_too_large,
            on_open=intake.on_connection_open,
            metrics=self.metrics,
        )
        manager = SubscriptionManager(ime, catalog, source, self.metrics, contracts=contracts)
        coordination = settings.coordination
        group: ShardGroup = (
            KafkaShardGroup(coordination, settings.kafka, self.metrics, claim=lambda: keeper.claim())
            if coordination.enabled
            else SoleOwner(coordination.shards)
        )
        keeper = ShardKeeper(
            coordination,
            group,
            manager,
            intake,
            buffer,
            publisher,
            self.metrics,
            owned=frozenset() if coordination.enabled else frozenset(range(coordination.shards)),
        )
        self._running = running = _Running(
            buffer=buffer,
            publisher=publisher,
            publisher_task=asyncio.create_task(publisher.run(), name="publisher"),
            source=source,
            manager=manager,
            keeper=keeper,
            keeper_task=asyncio.create_task(supervised("shards", keeper.run, metrics=self.metrics), name="shards"),
            spool_task=spool_task,
        )
        await running.manager.start()
        reload = supervised("reload", self._reload_on_request, metrics=self.metrics)
        self._background.append(asyncio.create_task(reload, name="reload"))
        log_event(
            logger,
            logging.INFO,
            "started",
            connections=len(source.subscriptions),
            contract_ids=len(ime.contract_ids),
            contract_names=len(ime.contract_names),
            topic=settings.kafka.topic,
        )

    def _open_buffer(self) -> DeliveryBuffer:
        """The delivery buffer; in spool mode, the spool is recovered first (replayed before anything new)."""
        config = self.settings.buffer
        spool = None
        if config.overflow == "spool":
            assert config.spool_dir is not None  # required by BufferSettings
            spool = Spool(
                config.spool_dir,
                max_bytes=config.spool_max_bytes,
                on_unknown_schema=self.metrics.messages_rejected.labels(RejectReason.UNKNOWN_SCHEMA.value).inc,
            )
            try:
                recovery = spool.open()
            except SpoolError as exc:  # the directory cannot be created, read or written: nothing to run with
                log_event(logger, logging.CRITICAL, "spool_unusable", directory=str(config.spool_dir), error=str(exc))
                raise
            self.metrics.spool_damaged_entries.inc(recovery.torn_entries + recovery.corrupt_segments)
            self.metrics.spool_possible_duplicates.inc(recovery.possible_duplicates)
            log_event(
                logger,
                logging.INFO,
                "spool_opened",
                directory=str(config.spool_dir),
                records=recovery.records,
                bytes=recovery.bytes,
                torn_entries=recovery.torn_entries,
                corrupt_segments=recovery.corrupt_segments,
                possible_duplicates=recovery.possible_duplicates,
            )
        return DeliveryBuffer(config, metrics=self.metrics, spool=spool)

    async def _start_sink(self, sink: Sink) -> None:
        """Kafka may be down at start: keep trying, not ready meanwhile (a stop cancels this).

        A SinkFatal (the schema registry refused the schema or the credentials) ends the start: retrying
        cannot fix it.
        """
        try:
            await start_sink(sink)
        except SinkFatal as exc:
            log_event(logger, logging.CRITICAL, "sink_fatal", error=str(exc))
            raise
        self._sink_started = True
        self.kafka_ready.set()
        log_event(logger, logging.INFO, "kafka_connected")

    async def _shutdown(self) -> None:
        timeout = self.settings.shutdown_timeout_seconds
        log_event(logger, logging.INFO, "stopping", timeout_seconds=timeout)
        running = self._running
        for background in self._background:
            background.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        undelivered = 0
        if running is not None:
            undelivered = await self._stop_running(running, timeout)
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
            kept_in_spool=running is not None and running.buffer.spool is not None,
        )

    async def _stop_running(self, running: _Running, drain_seconds: float) -> int:
        """Stop intake, drain within `drain_seconds`, stop the publisher; the records left undelivered."""
        try:
            async with asyncio.timeout(drain_seconds):
                # Replicas of a group first hand their shards over, so that the others serve them without a gap.
                try:
                    async with asyncio.timeout(drain_seconds / 2):
                        await running.keeper.leave()
                except TimeoutError:
                    log_event(logger, logging.WARNING, "handover_at_stop_incomplete", owned=len(running.keeper.owned))
                # No plan changes the connections from here on (the keeper is done with them, or out of time).
                running.keeper_task.cancel()
                await asyncio.gather(running.keeper_task, return_exceptions=True)
                await running.manager.stop()
                await running.source.stop()
                if not running.publisher_task.done():
                    await running.publisher.wait_drained()
        except TimeoutError:
            log_event(logger, logging.ERROR, "shutdown_timeout", timeout_seconds=drain_seconds)
        for task in (running.publisher_task, running.spool_task, running.keeper_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(1.0, drain_seconds / 4)):
                await running.keeper.group.stop()  # leave the group: the others take what is left
        return running.buffer.close(running.publisher.in_flight) + running.publisher.undeliverable


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
