"""`ime-bridge demo`: an embedded broker, the simulator and the bridge, with records shown as they land.

Half the contracts are subscribed by id and half by name, so the output shows both arriving under the
same kind of key (the contract id). Everything runs on 127.0.0.1 with free ports and stops on Ctrl-C
or after `--duration` seconds; the broker process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC
from typing import Any

from bridge.app import Bridge
from bridge.config import Settings
from bridge.devtools.broker import EmbeddedBroker, free_port
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.signals import install_stop_signals
from bridge.tail import Decoded, tail

TOPIC = "ime.contract.updates"
DLQ_TOPIC = "ime.contract.updates.dlq"


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


def _show(record: Decoded) -> None:
    value = record.get("value")
    if value is None:
        print(f"dead letter  reason={record['headers'].get('reason')}  {record['raw'][:60]!r}", flush=True)
        return
    level = value["best_limit"][0] if value["best_limit"] else {}
    print(
        f"key={record['key']:<6} {value['contract_name'] or '?':<14} via {value['endpoint']:<4} "
        f"seq={value['sequence']:<5} bid={level.get('buy_price', 0):>12,.0f} ask={level.get('sell_price', 0):>12,.0f} "
        f"t={value['exchange_time'].astimezone(UTC):%H:%M:%S.%f} p{record['partition']}@{record['offset']}",
        flush=True,
    )


async def run_demo(duration: float | None, contracts: int, rate: float) -> int:
    """Run the demo until Ctrl-C or `duration` seconds; returns the exit code."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    broker = EmbeddedBroker()
    print("starting an embedded Kafka-protocol broker (tansu) ...", flush=True)
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
            print("records arriving in Kafka (Ctrl-C to stop):", flush=True)
            bridge = Bridge(settings)
            bridge_task = asyncio.create_task(bridge.run(stop))
            # The bridge creates the topics; a consumer started earlier would auto-create them first.
            kafka_ready = asyncio.create_task(bridge.kafka_ready.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({kafka_ready, stopped, bridge_task}, return_when=asyncio.FIRST_COMPLETED)
            kafka_ready.cancel()
            stopped.cancel()
            tail_task = asyncio.create_task(tail(settings.kafka, TOPIC, on_record=_show, out=None))
            if duration is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=duration)
                stop.set()
            await bridge_task
            tail_task.cancel()
            await asyncio.gather(tail_task, return_exceptions=True)
    finally:
        broker.close()
    print("stopped: bridge, simulator and broker", flush=True)
    return 0
