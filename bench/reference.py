"""The straightforward implementation `make bench` measures the bridge against (never imported by the product).

websockets, json, pydantic, fastavro and one aiokafka `send()` per record, against the same simulator and
broker as the bridge: a token, one connection subscribing to every contract, each frame parsed into a pydantic
model, mapped to the Avro record of schemas/contract_update.avsc, written with fastavro's schemaless writer
and sent to the updates topic keyed by contract id, with the latest-state copy left out (it would only make
the reference dearer). It has no dead letters, buffer or spool. After `--warmup` seconds it measures its own
CPU and each record's receive → acknowledgement time for `--seconds`, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import websockets
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import BaseModel, ConfigDict, Field

SCHEMA = fastavro.parse_schema(json.loads((Path(__file__).parents[1] / "schemas" / "contract_update.avsc").read_text()))


class Level(BaseModel):
    """One book level as the frame carries it."""

    buy_quantity: int
    buy_price: float
    sell_quantity: int
    sell_price: float


class Aggregate(BaseModel):
    """Session statistics as the frame carries them."""

    date: str
    time: str
    trade_count: int
    total_volume: int
    total_value: float
    closing_price: float
    last_price: float
    low_price: float
    high_price: float
    open_price: float
    previous_close: float


class PriceRange(BaseModel):
    """Daily limits as the frame carries them."""

    min_allowed: float = Field(alias="minAllowedPrice")
    max_allowed: float = Field(alias="maxAllowedPrice")


class Info(BaseModel):
    """Open interest as the frame carries it."""

    open_interest: int
    open_interest_changes: int


class Data(BaseModel):
    """The frame's data object."""

    best_limit: dict[str, Level] = Field(alias="BestLimit")
    aggregate: Aggregate | None = Field(default=None, alias="Aggregate")
    price_range: PriceRange | None = Field(default=None, alias="AllowedPriceRange")
    info: Info | None = Field(default=None, alias="ContractInfo")


class Frame(BaseModel):
    """One snapshot frame."""

    model_config = ConfigDict(populate_by_name=True)

    channel: str
    contract_id: str = Field(alias="contractId")
    timestamp: datetime
    data: Data


def avro_record(frame: Frame, received: float, sequence: int) -> dict[str, Any]:
    """The frame as the Avro record of schemas/contract_update.avsc."""
    data, aggregate = frame.data, frame.data.aggregate
    stamp = frame.timestamp if frame.timestamp.tzinfo else frame.timestamp.replace(tzinfo=UTC)
    return {
        "contract_id": frame.contract_id,
        "contract_name": None,
        "endpoint": "ID",
        "channel": frame.channel,
        "exchange_time": stamp,
        "receive_time": datetime.fromtimestamp(received, UTC),
        "best_limit": [{"level": int(level), **value.model_dump()} for level, value in sorted(data.best_limit.items())],
        "aggregate": None
        if aggregate is None
        else {
            "trade_date": datetime.strptime(aggregate.date, "%Y-%m-%d").date() if aggregate.date else None,
            "trade_time": datetime.strptime(aggregate.time, "%H:%M:%S").time() if aggregate.time else None,
            **aggregate.model_dump(exclude={"date", "time"}),
        },
        "allowed_price_range": None
        if data.price_range is None
        else {"min_price": data.price_range.min_allowed, "max_price": data.price_range.max_allowed},
        "contract_info": None
        if data.info is None
        else {"open_interest": data.info.open_interest, "open_interest_change": data.info.open_interest_changes},
        "sequence": sequence,
        "session_id": "reference",
        "skipped": 0,
        "first_after_subscribe": sequence == 1,
    }


def token(base_url: str) -> str:
    """A token from the simulator's token endpoint."""
    form = urllib.parse.urlencode({"username": "demo", "password": "demo-password"}).encode()
    with urllib.request.urlopen(f"{base_url}/auth/user/token/issue", data=form, timeout=10) as response:
        return str(json.load(response)["Authorization"])


async def run(args: argparse.Namespace) -> dict[str, float]:
    """Bridge frames to Kafka; measure CPU and latency over the window."""
    contracts = [str(1001 + n) for n in range(args.contracts)]
    query = "&".join(f"contract_id={contract}" for contract in contracts)
    url = f"{args.ws_url}/data-engine/ime/live/data/websocket/contract/id?{query}"
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap_servers)
    await admin.start()
    try:
        if args.topic not in await admin.list_topics():
            await admin.create_topics([NewTopic(args.topic, 6, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap_servers, acks="all", enable_idempotence=False, linger_ms=args.linger_ms
    )
    await producer.start()
    latencies: list[float] = []
    sequences: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start, window_end = start + args.warmup, start + args.warmup + args.seconds
    cpu_before = cpu_after = 0.0
    acknowledged = 0

    def acked(received: float, future: asyncio.Future[Any]) -> None:
        nonlocal acknowledged
        if window_start <= loop.time() < window_end and not future.exception():
            latencies.append(time.time() - received)
            acknowledged += 1

    try:
        headers = {"Authorization": token(args.base_url)}
        async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
            while loop.time() < window_end:
                if not cpu_before and loop.time() >= window_start:
                    cpu_before = time.process_time()
                message = await ws.recv()
                received = time.time()
                frame = Frame.model_validate(json.loads(message))
                sequence = sequences[frame.contract_id] = sequences.get(frame.contract_id, 0) + 1
                out = io.BytesIO()
                fastavro.schemaless_writer(out, SCHEMA, avro_record(frame, received, sequence))
                future = await producer.send(args.topic, out.getvalue(), key=frame.contract_id.encode())
                future.add_done_callback(lambda done, received=received: acked(received, done))
            cpu_after = time.process_time()
    finally:
        await producer.stop()
    latencies.sort()
    count = max(len(latencies), 1)
    return {
        "msgs_per_s": acknowledged / args.seconds,
        "cpu_us_per_msg": (cpu_after - cpu_before) / max(acknowledged, 1) * 1e6,
        "cpu_share": (cpu_after - cpu_before) / args.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"p{name}_ms": latencies[min(int(q * count), count - 1)] * 1e3 for name, q in PERCENTILES},
    }


PERCENTILES = (("50", 0.5), ("99", 0.99), ("999", 0.999))


def main() -> None:
    """Parse the arguments, run, print the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--ws-url", required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", default="bench.reference")
    parser.add_argument("--contracts", type=int, default=64)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
