"""`ime-bridge demo`: an embedded broker, the simulator and the bridge, with records shown as they land.

Half the contracts are subscribed by id and half by name, so the output shows both arriving under the
same kind of key (the contract id). Everything runs on 127.0.0.1 with free ports. A line says what the demo
waits for until Kafka takes the bridge's records, and every SUMMARY_SECONDS a summary line gives the records
published, the dead letters and the p99 publish latency of that interval (from the bridge's own metrics).
On Ctrl-C or after `--duration` seconds everything stops in order, each part before what it depends on:
the consumer, the bridge (which drains into Kafka), the simulator, then the broker, stopped by its PID
(it runs in its own session, so the terminal's Ctrl-C reaches only the demo).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from bridge.app import Bridge
from bridge.config import Settings
from bridge.devtools.broker import EmbeddedBroker, free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.signals import install_stop_signals
from bridge.tail import Decoded, format_number, tail

TOPIC = "ime.contract.updates"
DLQ_TOPIC = "ime.contract.updates.dlq"
SUMMARY_SECONDS = 5.0
WAITING_LINE_SECONDS = 2.0


def demo_settings(simulator: Simulator, bootstrap_servers: str, metrics_port: int, contracts: int) -> Settings:
    """Bridge settings for the demo: half the contracts by id, half by name, tansu's producer profile."""
    chosen = simulator.contracts[:contracts]
    by_id = [contract.id for contract in chosen[: (len(chosen) + 1) // 2]]
    by_name = [contract.name for contract in chosen[(len(chosen) + 1) // 2 :]]
    document: dict[str, Any] = {
        "ime": {
            "base_url": simulator.base_url,
            "ws_url": simulator.ws_url,
            "allow_insecure": True,  # the local simulator speaks http:// and ws://
            "username": simulator.config.username,
            "password": simulator.config.password,
            "contract_ids": by_id,
            "contract_names": by_name,
        },
        "kafka": {
            "bootstrap_servers": [bootstrap_servers],
            "topic": TOPIC,
            "dlq_topic": DLQ_TOPIC,
            "partitions": 3,
            "replication_factor": 1,
            "enable_idempotence": False,  # tansu does not support InitProducerId
        },
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "shutdown_timeout_seconds": 10,
    }
    return Settings(**document)


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """The `q` quantile of a histogram's cumulative (upper bound, count) buckets, interpolated within its
    bucket as PromQL's histogram_quantile does; None without observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


class Summary:
    """Records published, dead letters and p99 publish latency per interval, read from the bridge's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._last = self._read()
        self._last_at = time.monotonic()

    def _read(self) -> tuple[float, float, dict[float, float]]:
        records = dead_letters = 0.0
        buckets: dict[float, float] = {}
        for family in self._registry.collect():
            for sample in family.samples:
                if sample.name == "ime_bridge_messages_published_total" and sample.labels.get("topic") == TOPIC:
                    records += sample.value
                elif sample.name == "ime_bridge_dead_letters_total":
                    dead_letters += sample.value
                elif sample.name == "ime_bridge_publish_latency_seconds_bucket":
                    buckets[float(sample.labels["le"])] = sample.value
        return records, dead_letters, buckets

    def line(self) -> str:
        """The interval since the previous line (or since the start): one line for the terminal."""
        now, (records, dead_letters, buckets) = time.monotonic(), self._read()
        (last_records, last_dead, last_buckets), seconds = self._last, max(now - self._last_at, 1e-9)
        self._last, self._last_at = (records, dead_letters, buckets), now
        p99 = quantile(((bound, count - last_buckets.get(bound, 0.0)) for bound, count in buckets.items()), 0.99)
        latency = f"{p99 * 1000:.1f} ms" if p99 is not None else "-"
        return (
            f"── {datetime.now(UTC):%H:%M:%S} last {seconds:.0f} s: {records - last_records:,.0f} records "
            f"({(records - last_records) / seconds:,.1f}/s, {records:,.0f} in all), "
            f"dead letters {dead_letters - last_dead:,.0f} ({dead_letters:,.0f} in all), p99 latency {latency}"
        )


async def _print_summaries(summary: Summary) -> None:
    while True:
        await asyncio.sleep(SUMMARY_SECONDS)
        print(summary.line(), flush=True)


async def _wait_for_kafka(bridge: Bridge, bridge_task: asyncio.Task[None], stop: asyncio.Event) -> bool:
    """Wait, saying so every few seconds, until the bridge has Kafka (True), or it ended or a stop came."""
    started = time.monotonic()
    print("waiting for Kafka: the bridge creates the topics and starts its producer ...", flush=True)
    waits = {asyncio.create_task(bridge.kafka_ready.wait()), asyncio.create_task(stop.wait()), bridge_task}
    try:
        while True:
            done, _ = await asyncio.wait(waits, timeout=WAITING_LINE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
            print(f"still waiting for Kafka ({time.monotonic() - started:.0f} s) ...", flush=True)
    finally:
        for task in waits - {bridge_task}:
            task.cancel()
    if not bridge.kafka_ready.is_set():
        return False
    print(f"Kafka ready after {time.monotonic() - started:.1f} s", flush=True)
    return True


def _show(record: Decoded) -> None:
    value = record.get("value")
    if value is None:
        print(f"dead letter  reason={record['headers'].get('reason')}  {record['raw'][:60]!r}", flush=True)
        return
    level = value["best_limit"][0] if value["best_limit"] else {}
    print(
        f"key={record['key']:<6} {value['contract_name'] or '?':<14} via {value['endpoint']:<4} "
        f"seq={value['sequence']:<5} bid={format_number(level.get('buy_price', 0)):>12} "
        f"ask={format_number(level.get('sell_price', 0)):>12} "
        f"t={value['exchange_time'].astimezone(UTC):%H:%M:%S.%f} p{record['partition']}@{record['offset']}",
        flush=True,
    )


async def run_demo(duration: float | None, contracts: int, rate: float) -> int:
    """Run the demo until Ctrl-C or `duration` seconds; returns the exit code."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    broker = EmbeddedBroker()
    print("starting an embedded Kafka-protocol broker (tansu), waiting for it to listen ...", flush=True)
    broker.start()
    try:
        async with Simulator(SimulatorConfig(contracts=max(contracts, 2), rate=rate)) as simulator:
            metrics_port = free_port()
            settings = demo_settings(simulator, broker.bootstrap_servers, metrics_port, contracts)
            print(f"broker     {broker.bootstrap_servers} (pid {broker.pid})")
            print(f"simulator  {simulator.ws_url} ({contracts} contracts, {rate:g} snapshots/s)")
            print(f"subscribed by id:   {', '.join(settings.ime.contract_ids)}")
            print(f"subscribed by name: {', '.join(settings.ime.contract_names)}")
            print(f"metrics    http://127.0.0.1:{metrics_port}/metrics  (also /healthz, /readyz)")
            print(f"watch      ime-bridge tail --bootstrap-servers {broker.bootstrap_servers} --topic {TOPIC}")
            print(f"dead letters: ime-bridge tail --bootstrap-servers {broker.bootstrap_servers} --dead-letters")
            bridge = Bridge(settings)
            bridge_task = asyncio.create_task(bridge.run(stop))
            deadline = asyncio.get_running_loop().time() + duration if duration is not None else None
            # The bridge creates the topics; a consumer started earlier would auto-create them first.
            if await _wait_for_kafka(bridge, bridge_task, stop):
                print("records arriving in Kafka (Ctrl-C to stop):", flush=True)
                tail_task = asyncio.create_task(tail(settings.kafka, TOPIC, on_record=_show, out=None))
                summaries = asyncio.create_task(_print_summaries(Summary(bridge.metrics.registry)))
                stopped = asyncio.create_task(stop.wait())
                remaining = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
                await asyncio.wait({stopped, bridge_task}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                print("stopping: consumer ...", flush=True)
                for task in (summaries, tail_task):
                    task.cancel()
                await asyncio.gather(summaries, tail_task, return_exceptions=True)
            print("stopping: bridge (draining into Kafka) ...", flush=True)
            stop.set()
            await bridge_task
            print("stopping: simulator ...", flush=True)
    finally:
        print("stopping: broker ...", flush=True)
        broker.close()
    print("stopped: bridge, simulator and broker", flush=True)
    return 0
