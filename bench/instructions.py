"""`make bench-instructions`: the bridge's in-process work counted in CPU instructions (valgrind's callgrind), a
figure a busy host does not move, for changes too small for `make bench`'s µs to tell apart on a shared machine.

The pipeline runs in one process without sockets: pre-rendered simulator frames (64 contracts, about 800 bytes
each) go in bursts of nine through intake, the buffer and the sink in rounds of 1,000 records over six partitions,
the sink handing its batches to a producer that builds them (records encoded, compressed, checksummed) and sends
nothing. Each figure is the difference between a run of 4,000 frames and one of 14,000, so the interpreter's
start-up drops out, with `PYTHONHASHSEED=0` so that two runs of one tree count alike (within about 0.3k
instructions). It prints instructions per record without raw capture, and raw capture's added instructions per
frame: what websockets' receive, the network and aiokafka's sender add on top is `make bench`'s to measure.
`--against REV` runs this pipeline over that revision's bridge package too, for the ratios (revisions from db4ec27
on, which has `Intake.on_burst`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatch

from bridge.batches import compress_zstd_at
from bridge.buffer import DeliveryBuffer
from bridge.config import BufferSettings, KafkaSettings
from bridge.devtools.market import FrameRenderer, MarketGenerator, build_catalogue
from bridge.encode import load_schema
from bridge.intake import Intake
from bridge.metrics import Metrics
from bridge.normalize import ContractDirectory, Normalizer
from bridge.planner import ConnectionInfo, Subscription
from bridge.protocol import Endpoint
from bridge.sink import KafkaSink

CONTRACTS = 64
BURST = 9
ROUND = 1000
PARTITIONS = 6
SHORT_RUN, LONG_RUN = 4_000, 14_000


class BuildingProducer:
    """Takes the sink's batches as aiokafka's producer does, builds each (encoding, compression, checksum) and
    acknowledges it at once."""

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[None]:
        batch._build()
        acknowledged: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


async def run_pipeline(raw: bool, frame_total: int) -> None:
    """`frame_total` frames through intake, buffer and sink, with raw capture or without."""
    contracts = build_catalogue(CONTRACTS)
    renderer = FrameRenderer("ht")
    steps = MarketGenerator(contracts).steps(4096, datetime(2026, 12, 8, 9, tzinfo=UTC))
    frames = [renderer.render(step, Endpoint.ID).encode() for step in steps]
    connection = ConnectionInfo(Subscription("id-0", Endpoint.ID, tuple(c.id for c in contracts)), attempt=1)
    metrics = Metrics()
    buffer = DeliveryBuffer(BufferSettings(capacity_records=1_000_000), metrics=metrics)
    intake = Intake(
        normalizer=Normalizer(session_id="bench", contracts=ContractDirectory({c.id: c.name for c in contracts})),
        buffer=buffer,
        metrics=metrics,
        schema=load_schema(),
        max_frame_bytes=100_000,
        suppress_duplicates=False,
        dead_letter_raw_bytes=1000,
        capture_raw=raw,
    )
    settings = KafkaSettings(topic="u", dlq_topic="d", state_topic="s", raw_topic="r" if raw else "")
    sink = KafkaSink(settings)
    sink._producer = BuildingProducer()
    sink._partitions = dict.fromkeys(("u", "d", "s", "r"), PARTITIONS)
    sink._raw_codec = DefaultRecordBatch.CODEC_ZSTD
    compress_zstd_at(settings.zstd_level)  # what the sink's start() would do
    gc.collect()  # as `ime-bridge run` sets the collector up
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    intake.on_connection_open(connection)
    receive_time = 1_765_184_400_000_000
    sent = 0
    while sent < frame_total:
        for _ in range(ROUND // BURST):
            receive_time += 900
            intake.on_burst([frames[(sent + n) % len(frames)] for n in range(BURST)], receive_time, connection)
            sent += BURST
        taken = await buffer.take(ROUND * 2)
        outcomes = await sink.publish(taken.records, taken.raw)
        buffer.settle(taken, [outcome is None for outcome in outcomes])


def instructions(code: Path, raw: bool, frame_total: int) -> int:
    """The instructions callgrind counts for a whole run of `run_pipeline` over the bridge package in `code`."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--run", "raw" if raw else "clean", str(frame_total)]
    environment = os.environ | {"PYTHONHASHSEED": "0", "PYTHONPATH": str(code)}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"callgrind counted nothing:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def count(code: Path) -> tuple[float, float]:
    """Instructions per record without raw capture, and raw capture's added instructions per frame, of the bridge
    package in `code`: each the difference of a long and a short run (two runs at a time, one per core)."""
    runs = [(raw, frames) for raw in (False, True) for frames in (SHORT_RUN, LONG_RUN)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        clean_short, clean_long, raw_short, raw_long = pool.map(lambda run: instructions(code, *run), runs)
    clean = (clean_long - clean_short) / (LONG_RUN - SHORT_RUN)
    return clean, (raw_long - raw_short) / (LONG_RUN - SHORT_RUN) - clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", help="also count this git revision's bridge, for the ratio")
    parser.add_argument("--run", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)  # one counted run
    args = parser.parse_args()
    if args.run is not None:
        asyncio.run(run_pipeline(args.run[0] == "raw", int(args.run[1])))
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench-instructions needs valgrind (callgrind); it is not installed here")
    from bench.pipeline import checkout  # here, not at the top: a counted run loads only what it counts

    print("ime-bridge instructions (callgrind, in process: intake, buffer, sink, batches built; no network)")
    clean, raw = count(Path(__file__).resolve().parents[1])
    print(f"  without raw capture: {clean / 1000:.1f}k instructions per record")
    print(f"  raw capture: +{raw / 1000:.1f}k instructions per frame ({raw / clean:.1%} of a record's)")
    if args.against:
        with (
            tempfile.TemporaryDirectory(prefix="ime-bridge-bench-") as directory,
            checkout(args.against, Path(directory) / "against") as code,
        ):
            assert code is not None
            their_clean, their_raw = count(code)
        print(f"against {args.against} (this / {args.against}):")
        print(f"  without raw capture: {clean / their_clean:.3f}x ({their_clean / 1000:.1f}k)")
        print(f"  raw capture: {raw / their_raw:.3f}x (+{their_raw / 1000:.1f}k)")


if __name__ == "__main__":
    main()
