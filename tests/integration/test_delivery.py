"""Delivery through Kafka outages, crashes and shutdowns: nothing lost, duplicated or reordered.

A broker runs behind a TCP fault proxy and advertises the proxy's address, so cutting the proxy cuts
the bridge off Kafka. The checker (tests/support/checker.py) matches every record consumed afterwards with the
snapshot the simulator sent.
"""

from __future__ import annotations

import asyncio
import io
import os
import resource
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader

from bridge.config import Settings
from bridge.devtools.broker import EmbeddedBroker, free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.spool import Spool
from tests.support.broker import BrokerInfo, consume
from tests.support.checker import DeliveryReport, check_delivery, record_identity
from tests.support.faultproxy import FaultProxy
from tests.support.harness import (
    SCHEMA,
    BridgeProcess,
    RunningBridge,
    bridge_config,
    bridge_settings,
    decode_value,
    running_bridge,
)
from tests.support.waiting import assert_holds, wait_for

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 60.0
CONTRACTS = 12


@dataclass
class ProxiedBroker:
    """A tansu broker reachable only through `proxy` (it advertises the proxy's port)."""

    broker: EmbeddedBroker
    proxy: FaultProxy

    @property
    def info(self) -> BrokerInfo:
        return BrokerInfo(self.proxy.address, "tansu", supports_idempotence=False)


@pytest.fixture
async def proxied_broker() -> AsyncIterator[ProxiedBroker]:
    proxy_port = free_port()
    broker = EmbeddedBroker(advertised_port=proxy_port)
    broker.start()
    proxy = FaultProxy("127.0.0.1", broker.port, listen_port=proxy_port)
    await proxy.start()
    try:
        yield ProxiedBroker(broker, proxy)
    finally:
        await proxy.stop()
        broker.close()


def spool_after_50(simulator: Simulator, proxied: ProxiedBroker, directory: Path) -> dict[str, Any]:
    """A bridge process's config: every contract, Kafka failing fast, spooling past 50 records in memory."""
    return bridge_config(
        simulator,
        proxied.info,
        ime={"contract_ids": [c.id for c in simulator.contracts]},
        kafka=fast_failing_kafka(),
        buffer={"overflow": "spool", "spool_dir": str(directory / "spool"), "spool_after_records": 50},
    )


def all_contracts_strict_pings(simulator: Simulator) -> dict[str, Any]:
    """Subscribe to every contract with pings tight enough that a reader stuck for 3 s would reconnect."""
    return {"contract_ids": [c.id for c in simulator.contracts], "ping_interval_seconds": 1, "ping_timeout_seconds": 2}


def fast_failing_kafka(**extra: Any) -> dict[str, Any]:
    # Batches expire after request_timeout_ms: short, so that rounds fail during the outage and are retried.
    return {"request_timeout_ms": 5000, "linger_ms": 5, **extra}


async def settle_and_stop(simulator: Simulator, running: RunningBridge) -> None:
    """Stop the market, let the bridge receive and deliver everything sent, then stop it in order."""
    await simulator.stall_and_settle()
    sent = len(simulator.sent_frames())
    await wait_for(
        lambda: running.metric("ime_bridge_messages_received_total", endpoint="id") >= sent,
        within=60,
        what="the bridge to receive every frame sent",
    )
    await wait_for(lambda: running.bridge.readiness()[1].get("buffer_records") == 0, within=120, what="drained")


async def outage(running: RunningBridge, proxy: FaultProxy, *, memory_bound: float) -> dict[str, float]:
    """Cut Kafka for OUTAGE_SECONDS, checking what must hold throughout; returns the worst values seen."""
    await wait_for(lambda: running.published() > 200, what="records flowing before the outage")
    proxy.cut()
    worst = {"memory": 0.0, "reconnects": 0.0, "connections_down": 0.0, "ready_during_outage": 1.0}
    deadline = time.monotonic() + OUTAGE_SECONDS
    while time.monotonic() < deadline:
        worst["memory"] = max(worst["memory"], running.metric("ime_bridge_buffer_records"))
        worst["reconnects"] = max(worst["reconnects"], running.metric_total("ime_bridge_reconnects_total"))
        worst["connections_down"] = max(worst["connections_down"], 1 - running.metric("ime_bridge_connections"))
        running.bridge.readiness()
        worst["ready_during_outage"] = min(worst["ready_during_outage"], running.metric("ime_bridge_ready"))
        assert worst["memory"] <= memory_bound, f"memory {worst['memory']} over the bound {memory_bound}"
        await asyncio.sleep(0.25)
    proxy.restore()
    return worst


async def consume_all(bootstrap: str, topic: str, expected: int) -> list[Any]:
    """At least `expected` records, and then whatever else the topic holds: duplicates must not hide a loss."""
    return await consume(bootstrap, topic, until=lambda got: len(got) >= expected, within=120, quiet_for=2.0)


def assert_clean(report: DeliveryReport, *, max_duplicates: int) -> None:
    assert report.unknown == 0, report.summary()
    assert report.total_lost == 0, report.summary()
    assert sum(report.out_of_order.values()) == 0, report.summary()
    assert sum(report.duplicated.values()) <= max_duplicates, report.summary()


async def test_spool_mode_loses_and_reorders_nothing_through_a_60s_kafka_outage(
    proxied_broker: ProxiedBroker, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=150, record_sent=True)) as simulator:
        settings = bridge_settings(
            simulator,
            proxied_broker.info,
            ime=all_contracts_strict_pings(simulator),
            kafka=fast_failing_kafka(),
            buffer={
                "overflow": "spool",
                "spool_dir": str(tmp_path / "spool"),
                "spool_after_records": 200,
                "max_batch_records": 500,
            },
        )
        async with running_bridge(settings) as running:
            worst = await outage(running, proxied_broker.proxy, memory_bound=200 + 500)
            restored = time.monotonic()

            def spool_empty() -> bool:
                return running.metric("ime_bridge_spool_records") == 0

            await wait_for(spool_empty, within=30, what="the spool to drain once Kafka is back")
            drained_after = time.monotonic() - restored
            published = running.published()
            # Kafka keeps up again: records go through memory only, while the feed goes on.
            await assert_holds(spool_empty, seconds=10, what="an empty spool while Kafka keeps up")
            assert running.metric("ime_bridge_spooling") == 0
            assert running.published() > published + 1000, "the feed went on"
            await settle_and_stop(simulator, running)
        sent = simulator.sent_frames()
    records = await consume_all(proxied_broker.proxy.address, settings.kafka.topic, len(sent))
    report = check_delivery(sent, records)
    assert_clean(report, max_duplicates=500)
    assert worst["reconnects"] == 0, "the readers kept answering pings: no reconnect during the outage"
    assert worst["connections_down"] == 0
    assert worst["ready_during_outage"] == 0, "readiness reported the outage"
    assert running.metric_total("ime_bridge_produce_errors_total") > 0, "the outage was felt"
    print(f"\nspool outage: {report.summary()} worst={worst} drained {drained_after:.1f}s after Kafka returned")


async def test_conflate_mode_delivers_the_latest_of_every_contract_and_accounts_for_every_skip(
    proxied_broker: ProxiedBroker,
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=150, record_sent=True)) as simulator:
        capacity, batch = 300, 200
        settings = bridge_settings(
            simulator,
            proxied_broker.info,
            ime=all_contracts_strict_pings(simulator),
            kafka=fast_failing_kafka(),
            buffer={"overflow": "conflate", "capacity_records": capacity, "max_batch_records": batch},
        )
        async with running_bridge(settings) as running:
            worst = await outage(running, proxied_broker.proxy, memory_bound=capacity + CONTRACTS + batch)
            await settle_and_stop(simulator, running)
            conflated = running.metric("ime_bridge_conflated_total")
        sent = simulator.sent_frames()
    records = await consume_all(proxied_broker.proxy.address, settings.kafka.topic, len(sent) - int(conflated))
    report = check_delivery(sent, records)
    assert conflated > 1000, "the outage forced conflation"
    assert report.latest_missing == [], report.summary()
    assert sum(report.unaccounted_gaps.values()) == 0, report.summary()
    assert sum(report.out_of_order.values()) == 0, report.summary()
    assert report.total_lost == report.skipped == conflated, report.summary()
    assert worst["reconnects"] == 0
    assert worst["ready_during_outage"] == 0, "readiness reported the outage"
    print(f"\nconflate outage: {report.summary()} conflated={conflated} worst={worst}")


def decode_avro(value: bytes) -> dict[str, Any]:
    decoded = schemaless_reader(io.BytesIO(value), SCHEMA.parsed, SCHEMA.parsed)
    assert isinstance(decoded, dict)
    return decoded


def spooled_identities(spool_dir: Path, copy_to: Path) -> dict[str, list[Any]]:
    """What a (killed) bridge left in its spool, read from a copy: per contract, in spool order."""
    shutil.copytree(spool_dir, copy_to)
    spool = Spool(copy_to, max_bytes=1 << 34)
    spool.open()
    found: dict[str, list[Any]] = {}
    while batch := spool.read(10_000):
        for spooled in batch:
            value = decode_avro(spooled.record.value)
            found.setdefault(value["contract_id"], []).append(record_identity(value))
    return found


async def test_kill_9_during_an_outage_in_spool_mode_loses_nothing_that_reached_the_spool(
    proxied_broker: ProxiedBroker, tmp_path: Path
) -> None:
    spool_after, batch = 100, 200
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=150, record_sent=True)) as simulator:
        config = bridge_config(
            simulator,
            proxied_broker.info,
            ime=all_contracts_strict_pings(simulator),
            kafka=fast_failing_kafka(),
            buffer={
                "overflow": "spool",
                "spool_dir": str(tmp_path / "spool"),
                "spool_after_records": spool_after,
                "max_batch_records": batch,
            },
        )
        first = BridgeProcess(config, tmp_path)
        first.start()
        try:
            await wait_for(_above(first, "ime_bridge_messages_published_total", 100), within=60, what="flowing")
            proxied_broker.proxy.cut()
            await wait_for(_above(first, "ime_bridge_spool_records", 500), within=60, what="records spooled")
            await simulator.stall_and_settle()
            sent_before_kill = len(simulator.sent_frames())
            await wait_for(
                _above(first, "ime_bridge_messages_received_total", sent_before_kill - 1),
                within=30,
                what="every frame sent received before the kill",
            )
            assert first.process is not None
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait()
        finally:
            first.stop()
        in_spool = spooled_identities(tmp_path / "spool", tmp_path / "spool-at-kill")

        proxied_broker.proxy.restore()
        simulator.stall(False)
        await replay_after_kill(config, tmp_path, simulator)
        sent = simulator.sent_frames()

    records = await consume_all(proxied_broker.proxy.address, config["kafka"]["topic"], len(sent) - spool_after - batch)
    report = check_delivery(sent, records)
    delivered_order = delivered_identities(records)
    for contract, identities in in_spool.items():
        assert is_subsequence(identities, delivered_order[contract]), f"spooled records of {contract} not all delivered"
    assert sum(len(identities) for identities in in_spool.values()) > 500
    assert sum(report.out_of_order.values()) == 0, report.summary()
    assert report.unknown == 0, report.summary()
    # What a kill can lose: the round that was in flight when Kafka went away (memory spills to the spool).
    assert report.total_lost <= batch, report.summary()
    before_kill = Counter(frame.contract_id for frame in sent[:sent_before_kill])
    for contract, positions in report.lost.items():
        if positions:
            assert positions[-1] < before_kill[contract], f"{contract}: lost a frame sent after the kill"
            assert positions == list(range(positions[0], positions[-1] + 1)), f"{contract}: lost {positions}"
    assert sum(report.duplicated.values()) <= batch, report.summary()
    print(f"\nkill -9: {report.summary()} spooled_at_kill={sum(len(v) for v in in_spool.values())}")


async def test_a_kill_at_the_end_of_a_6s_cut_loses_nothing_older_than_spool_after_seconds_at_default_settings(
    proxied_broker: ProxiedBroker, tmp_path: Path
) -> None:
    """Spool mode with every other setting at its default, at 50 records/s (far below spool_after_records): what a
    kill -9 can lose is bounded by time, not by a count that takes minutes to reach."""
    cut_seconds, spool_after_seconds = 6.0, 1.0
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=50, record_sent=True)) as simulator:
        config = bridge_config(
            simulator,
            proxied_broker.info,
            ime={"contract_ids": [c.id for c in simulator.contracts]},
            buffer={"overflow": "spool", "spool_dir": str(tmp_path / "spool")},
        )
        first = BridgeProcess(config, tmp_path)
        first.start()
        sent_at: list[tuple[float, int]] = []  # (monotonic time, frames sent by then)
        try:
            await wait_for(_above(first, "ime_bridge_messages_published_total", 50), within=60, what="flowing")
            proxied_broker.proxy.cut()
            cut_at = time.monotonic()
            while time.monotonic() < cut_at + cut_seconds:
                sent_at.append((time.monotonic(), len(simulator.sent_frames())))
                await asyncio.sleep(0.05)
            assert first.process is not None
            killed_at = time.monotonic()
            os.kill(first.process.pid, signal.SIGKILL)
            sent_before_kill = len(simulator.sent_frames())
            first.process.wait()
        finally:
            first.stop()
        # Every frame sent (so received no earlier) more than spool_after_seconds + 1 s before the kill.
        must_deliver = max(count for moment, count in sent_at if moment <= killed_at - spool_after_seconds - 1)
        assert must_deliver - sent_at[0][1] >= 150, "several seconds of the cut are covered"

        proxied_broker.proxy.restore()
        await replay_after_kill(config, tmp_path, simulator)
        sent = simulator.sent_frames()

    required = Counter(frame.contract_id for frame in sent[:must_deliver])
    at_risk = sent_before_kill - must_deliver
    records = await consume_all(proxied_broker.proxy.address, config["kafka"]["topic"], len(sent) - at_risk)
    report = check_delivery(sent, records)
    assert sum(report.out_of_order.values()) == 0, report.summary()
    assert report.unknown == 0, report.summary()
    for contract, positions in report.lost.items():
        assert not [p for p in positions if p < required[contract]], f"{contract}: lost {positions} of {required}"
    print(f"\nkill after a {cut_seconds:.0f}s cut: {report.summary()} required={must_deliver} at_risk={at_risk}")


async def test_a_spool_whose_disk_refuses_writes_enters_the_alerted_full_state_and_leaves_it(
    proxied_broker: ProxiedBroker, tmp_path: Path
) -> None:
    """The disk refuses writes (RLIMIT_FSIZE in the bridge process: EFBIG, as a full disk gives ENOSPC), then
    accepts them again: spool_full is raised and lowered, and the latest of every contract is delivered."""
    limit = 200_000

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=150, record_sent=True)) as simulator:
        config = spool_after_50(simulator, proxied_broker, tmp_path)
        bridge = BridgeProcess(config, tmp_path)
        bridge.start(preexec_fn=limit_file_size)
        try:
            await wait_for(_above(bridge, "ime_bridge_messages_published_total", 100), within=60, what="flowing")
            proxied_broker.proxy.cut()
            await wait_for(_above(bridge, "ime_bridge_spool_full", 0), within=60, what="the spool-full state")
            # Meanwhile the newest snapshot of each contract is held in memory, the older ones conflated.
            await wait_for(_above(bridge, "ime_bridge_conflated_total", 50), within=60, what="conflation while full")
            assert await bridge.metric("ime_bridge_spool_bytes") <= limit
            assert bridge.process is not None
            resource.prlimit(bridge.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            await wait_for(_at(bridge, "ime_bridge_spool_full", 0), within=30, what="the spool accepting again")
            proxied_broker.proxy.restore()
            await simulator.stall_and_settle()
            sent_total = len(simulator.sent_frames())
            await wait_for(
                _above(bridge, "ime_bridge_messages_received_total", sent_total - 1), within=60, what="all received"
            )
            bridge.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(bridge.process.wait, 60) == 0, bridge.log()
        finally:
            bridge.stop()
        sent = simulator.sent_frames()
    log = bridge.log()
    assert "event=spool_full" in log, log[-3000:]
    assert "File too large" in log, log[-3000:]
    assert "event=spool_accepting_again" in log
    (stopped,) = [line for line in log.splitlines() if "event=stopped" in line]
    assert "undelivered=0" in stopped, stopped
    records = await consume(
        proxied_broker.proxy.address,
        config["kafka"]["topic"],
        until=lambda got: check_delivery(sent, got).latest_missing == [],
        within=120,
        describe=lambda got: check_delivery(sent, got).summary(),
    )
    report = check_delivery(sent, records)
    assert sum(report.out_of_order.values()) == 0, report.summary()
    assert sum(report.unaccounted_gaps.values()) == 0, "what the full spool held back is accounted by skipped"
    assert report.skipped > 50, report.summary()
    assert report.unknown == 0, report.summary()
    print(f"\nspool disk refusing writes: {report.summary()}")


def _at(process: BridgeProcess, name: str, value: float) -> Any:
    async def check() -> bool:
        return await process.metric(name) == value

    return check


async def replay_after_kill(config: dict[str, Any], directory: Path, simulator: Simulator) -> None:
    """Start a bridge on a killed one's spool: it replays, receives what the simulator still sends, and stops."""
    killed = {frame.connection_id for frame in simulator.sent_frames()}  # frames may still go to a dying socket
    second = BridgeProcess(config, directory)
    second.start()
    try:
        await wait_for(_spool_replayed(second), within=120, what="spool replayed")
        await wait_for(_above(second, "ime_bridge_messages_received_total", 100), within=60, what="new frames")
        await simulator.stall_and_settle()
        sent_to_second = sum(1 for frame in simulator.sent_frames() if frame.connection_id not in killed)
        await wait_for(
            _above(second, "ime_bridge_messages_received_total", sent_to_second - 1),
            within=60,
            what="the restarted bridge to receive everything sent to it",
        )
        assert second.process is not None
        second.process.send_signal(signal.SIGTERM)  # the proxy runs in this loop: wait in a thread
        assert await asyncio.to_thread(second.process.wait, 60) == 0, second.log()
    finally:
        second.stop()


def _above(process: BridgeProcess, name: str, threshold: float) -> Any:
    async def check() -> bool:
        return await process.metric(name) > threshold

    return check


def _spool_replayed(process: BridgeProcess) -> Any:
    async def check() -> bool:
        published = await process.metric("ime_bridge_messages_published_total")  # 0 until it serves /metrics
        return published > 0 and await process.metric("ime_bridge_spool_records") == 0

    return check


def delivered_identities(records: list[Any]) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = decode_value(record)
        found.setdefault(value["contract_id"], []).append(record_identity(value))
    return found


def is_subsequence(needles: list[Any], haystack: list[Any]) -> bool:
    remaining = iter(haystack)
    return all(any(needle == item for item in remaining) for needle in needles)


async def test_sigterm_under_load_exits_0_in_time_and_loses_nothing_received(
    kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=3000)) as simulator:
        config = bridge_config(simulator, kafka_broker, ime={"contract_ids": [c.id for c in simulator.contracts]})
        process = BridgeProcess(config, tmp_path)
        process.start()
        try:
            await wait_for(_above(process, "ime_bridge_messages_published_total", 3000), within=60, what="load")
            assert process.process is not None
            started = time.monotonic()
            process.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.process.wait, config["shutdown_timeout_seconds"] + 10)
            took = time.monotonic() - started
        finally:
            process.stop()
    assert code == 0, process.log()
    assert took < config["shutdown_timeout_seconds"]
    stopped = [line for line in process.log().splitlines() if "event=stopped" in line]
    assert len(stopped) == 1, process.log()
    assert "undelivered=0" in stopped[0]
    received = int(stopped[0].split("received=")[1].split()[0])
    records = await consume_all(kafka_broker.bootstrap_servers, config["kafka"]["topic"], received)
    assert len(records) == received, "every frame received is in Kafka"
    by_contract = delivered_sequences(records)
    assert all(sequences == list(range(1, len(sequences) + 1)) for sequences in by_contract.values())
    print(f"\nSIGTERM under load: received={received} stopped in {took:.2f}s")


def delivered_sequences(records: list[Any]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = decode_value(record)
        found.setdefault(value["contract_id"], []).append(value["sequence"])
    return found


async def test_a_broker_down_at_start_keeps_the_bridge_unready_then_it_delivers(
    proxied_broker: ProxiedBroker,
) -> None:
    proxied_broker.proxy.cut()
    async with Simulator(SimulatorConfig(contracts=4, rate=100)) as simulator:
        settings = bridge_settings(simulator, proxied_broker.info, ime={"contract_ids": [simulator.contracts[0].id]})
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.bridge.health_port is not None, what="the health endpoint")
            status, body = await running.get("/readyz")
            assert status == 503
            assert '"kafka": false' in body
            await wait_for(lambda: running.metric_total("ime_bridge_messages_received_total") == 0, within=3)
            proxied_broker.proxy.restore()
            await wait_for(lambda: running.published() > 10, within=90, what="delivery once Kafka is back")
            assert (await running.get("/readyz"))[0] == 200


async def test_oversized_frames_are_dead_lettered_and_valid_contracts_keep_flowing(kafka_broker: BrokerInfo) -> None:
    async with Simulator(SimulatorConfig(contracts=4, rate=100)) as simulator:
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": [c.id for c in simulator.contracts], "max_frame_bytes": 65536}
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 5)
            assert simulator.send_oversized(100_000) == 1
            dead = await consume(
                kafka_broker.bootstrap_servers, settings.kafka.dlq_topic, until=lambda got: len(got) >= 1
            )
            before = running.published()
            await wait_for(lambda: running.published() > before + 20, what="updates still flowing")
    (letter,) = dead
    headers = dict(letter.headers)
    assert headers["reason"] == b"oversized"
    assert b"exceeds ime.max_frame_bytes=65536" in headers["detail"]
    assert len(letter.value) == 100_000
    assert letter.key is None
    assert running.metric("ime_bridge_dead_letters_total", reason="oversized") == 1


async def test_a_frame_past_the_websocket_limit_is_dead_lettered_unread_and_the_connection_reopens(
    kafka_broker: BrokerInfo,
) -> None:
    """Past 4 x max_frame_bytes websockets closes the connection (1009) rather than buffer the frame."""
    async with Simulator(SimulatorConfig(contracts=4, rate=100)) as simulator:
        settings = bridge_settings(
            simulator, kafka_broker, ime={"contract_ids": [c.id for c in simulator.contracts], "max_frame_bytes": 65536}
        )
        async with running_bridge(settings) as running:
            await wait_for(lambda: running.published() > 5)
            assert simulator.send_oversized(4 * 65536 + 1) == 1
            dead = await consume(
                kafka_broker.bootstrap_servers, settings.kafka.dlq_topic, until=lambda got: len(got) >= 1
            )
            before = running.published()
            await wait_for(lambda: running.published() > before + 20, what="updates flowing after the reconnect")
            assert running.metric("ime_bridge_reconnects_total", endpoint="id", reason="frame_too_large") == 1
    (letter,) = dead
    headers = dict(letter.headers)
    assert headers["reason"] == b"oversized"
    assert b"exceeds limit of 262144 bytes" in headers["detail"]
    assert b"closed (1009) before the frame was read" in headers["detail"]
    assert letter.value == b""
    assert running.metric("ime_bridge_dead_letters_total", reason="oversized") == 1


async def test_shutdown_timeout_in_spool_mode_counts_the_undelivered_and_the_next_start_delivers_them(
    proxied_broker: ProxiedBroker, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(contracts=CONTRACTS, rate=200, record_sent=True)) as simulator:
        config = spool_after_50(simulator, proxied_broker, tmp_path)
        config["shutdown_timeout_seconds"] = 2.0
        first = BridgeProcess(config, tmp_path)
        first.start()
        try:
            await wait_for(_above(first, "ime_bridge_messages_published_total", 100), within=60)
            proxied_broker.proxy.cut()
            await wait_for(_above(first, "ime_bridge_spool_records", 300), within=60, what="records spooled")
            await simulator.stall_and_settle()
            sent_to_first = len(simulator.sent_frames())
            await wait_for(_above(first, "ime_bridge_messages_received_total", sent_to_first - 1), within=30)
            assert first.process is not None
            first.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.process.wait, 30) == 0, first.log()
        finally:
            first.stop()
        (stopped,) = [line for line in first.log().splitlines() if "event=stopped" in line]
        undelivered = int(stopped.split("undelivered=")[1].split()[0])
        assert undelivered > 300, stopped
        assert "kept_in_spool=True" in stopped

        proxied_broker.proxy.restore()
        settings = Settings(**{**config, "metrics": {"host": "127.0.0.1", "port": free_port()}})
        async with running_bridge(settings) as second:
            await wait_for(lambda: second.published() >= undelivered, within=120, what="the spool replayed")
            assert second.metric("ime_bridge_spool_records") == 0
        sent = simulator.sent_frames()
    records = await consume_all(proxied_broker.proxy.address, config["kafka"]["topic"], len(sent))
    report = check_delivery(sent, records)
    # A round in flight at the stop may have reached Kafka before the cut: then it is sent twice, never lost.
    assert_clean(report, max_duplicates=config["buffer"].get("max_batch_records", 10_000))
    print(f"\nshutdown timeout: undelivered={undelivered} {report.summary()}")


async def test_a_second_signal_exits_at_once(proxied_broker: ProxiedBroker, tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(contracts=4, rate=200)) as simulator:
        config = bridge_config(
            simulator, proxied_broker.info, ime={"contract_ids": [c.id for c in simulator.contracts]}
        )
        config["shutdown_timeout_seconds"] = 120  # a drain that cannot finish: Kafka is cut
        process = BridgeProcess(config, tmp_path)
        process.start()
        try:
            await wait_for(_above(process, "ime_bridge_messages_published_total", 20), within=60)
            proxied_broker.proxy.cut()
            await wait_for(_above(process, "ime_bridge_buffer_records", 50), within=30, what="a backlog")
            assert process.process is not None
            process.process.send_signal(signal.SIGTERM)
            await wait_for(lambda: "event=stopping" in process.log(), within=10)
            process.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.process.wait, 10)
        finally:
            process.stop()
    assert code == 130, process.log()
