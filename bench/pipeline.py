"""`make bench`: simulator → bridge → broker, at full speed (with and without the latest-state topic, with a
share of bad frames, and with raw capture) and paced.

Three processes on 127.0.0.1: tansu, the simulator (pre-rendered frames, so it is not the bottleneck)
and `ime-bridge run`. Figures come from the bridge's /metrics over a measurement window after a
warm-up: records acknowledged per second (updates and dead letters), the bridge process's CPU µs per
record (process_cpu_seconds_total), and receive→ack latency quantiles of the updates interpolated from the
ime_bridge_publish_latency_seconds histogram (as PromQL's histogram_quantile does). The bad-frame phase
also prints its CPU per record against the clean full-speed phase's: a flood of bad frames must stay cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.devtools.broker import EmbeddedBroker, free_port, stop_process
from bridge.devtools.demo import quantile


@dataclass(frozen=True)
class Scrape:
    """The counters the benchmark reads, at one instant."""

    at: float
    cpu_seconds: float
    received: float
    published: float
    dead_letters: float
    latency_buckets: dict[float, float]


def scrape(port: int) -> Scrape:
    """Read the bridge's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    at = time.monotonic()
    values: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ime_bridge_publish_latency_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == "ime_bridge_messages_published_total" and sample.labels.get("topic") == "bench":
                values["published"] = sample.value
            elif sample.name in (
                "process_cpu_seconds_total",
                "ime_bridge_messages_received_total",
                "ime_bridge_dead_letters_total",
            ):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Scrape(
        at,
        values.get("process_cpu_seconds_total", 0.0),
        values.get("ime_bridge_messages_received_total", 0.0),
        values.get("published", 0.0),
        values.get("ime_bridge_dead_letters_total", 0.0),
        buckets,
    )


def window_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """histogram_quantile over the bucket increments between two scrapes (NaN without observations)."""
    increments = ((bound, count - before.get(bound, 0.0)) for bound, count in after.items())
    found = quantile(increments, q)
    return float("nan") if found is None else found


@contextlib.contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command`, stopping exactly that process (by PID) afterwards."""
    with log.open("wb") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield child
        finally:
            stop_process(child, timeout=20)


def wait_until(condition: Callable[[], bool], what: str, logs: tuple[Path, ...], within: float = 30.0) -> None:
    """Poll `condition()` until true, or fail naming `what` with the end of each process's log."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if condition():
                return
        time.sleep(0.1)
    tails = "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in logs)
    raise SystemExit(f"bench: timed out waiting for {what}\n{tails}")


def run_phase(
    name: str,
    rate: float,
    args: argparse.Namespace,
    broker: EmbeddedBroker,
    workdir: Path,
    *,
    state_topic: bool = True,
    bad_frame_ratio: float = 0.0,
    raw_topic: bool = False,
) -> dict[str, float]:
    """One measurement: a fresh simulator and bridge at `rate` snapshots/s (0 = as fast as possible),
    with or without the latest-state topic (its fan-out is part of the cost of every round), with
    `bad_frame_ratio` of the frames malformed (each a dead letter), with or without raw capture (every frame
    also to a raw topic, zstd)."""
    executable = str(Path(sys.executable).parent / "ime-bridge")
    sim_port, metrics_port = free_port(), free_port()
    contracts = [str(1001 + n) for n in range(args.contracts)]
    config = {
        "ime": {
            "base_url": f"http://127.0.0.1:{sim_port}",
            "ws_url": f"ws://127.0.0.1:{sim_port}",
            "allow_insecure": True,
            "username": "demo",
            "password": "demo-password",
            "contract_ids": contracts,
        },
        "kafka": {
            "bootstrap_servers": [broker.bootstrap_servers],
            "topic": "bench",
            "dlq_topic": "bench.dlq",
            "state_topic": "bench.state",
            "state_topic_enabled": state_topic,
            "raw_topic": "bench.raw" if raw_topic else "",
            "partitions": 6,
            "replication_factor": 1,
            "enable_idempotence": False,
            "linger_ms": args.linger_ms,
        },
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "log": {"level": "WARNING"},
    }
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    simulator_command = [executable, "simulate", "--port", str(sim_port), "--contracts", str(args.contracts)]
    simulator_command += ["--rate", str(rate), "--prerender", "--bad-frame-ratio", str(bad_frame_ratio)]
    logs = (workdir / f"{name}-simulator.log", workdir / f"{name}-bridge.log")
    with (
        process(simulator_command, logs[0]),
        process([executable, "run", "--config", str(config_path)], logs[1]),
    ):
        wait_until(lambda: scrape(metrics_port).published > 0, f"{name}: first record acknowledged", logs, within=60)
        time.sleep(args.warmup)
        before = scrape(metrics_port)
        time.sleep(args.seconds)
        after = scrape(metrics_port)
    dead_letters = after.dead_letters - before.dead_letters
    acknowledged = after.published - before.published + dead_letters
    elapsed = after.at - before.at
    return {
        "msgs_per_s": acknowledged / elapsed,
        "cpu_us_per_msg": (after.cpu_seconds - before.cpu_seconds) / max(acknowledged, 1) * 1e6,
        "bad_share": dead_letters / max(acknowledged, 1),
        "rejection_log_lines": float(logs[1].read_text(errors="replace").count("event=frame_rejected ")),
        "cpu_share": (after.cpu_seconds - before.cpu_seconds) / elapsed,
        "p50_ms": window_quantile(0.5, before.latency_buckets, after.latency_buckets) * 1e3,
        "p99_ms": window_quantile(0.99, before.latency_buckets, after.latency_buckets) * 1e3,
        "backlog": after.received - after.published,
    }


def main() -> None:
    """Run every phase and print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contracts", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--paced-rate", type=float, default=5000.0)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--bad-frame-ratio", type=float, default=0.1, help="share of bad frames in their phase")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ime-bridge-bench-") as directory, EmbeddedBroker() as broker:
        workdir = Path(directory)
        bad_phase = f"  {args.bad_frame_ratio:.0%} bad frames"
        results = {
            "full speed": run_phase("full", 0, args, broker, workdir),
            bad_phase: run_phase("full-bad", 0, args, broker, workdir, bad_frame_ratio=args.bad_frame_ratio),
            "  no state topic": run_phase("full-no-state", 0, args, broker, workdir, state_topic=False),
            "  raw capture": run_phase("full-raw", 0, args, broker, workdir, raw_topic=True),
            f"paced {args.paced_rate:g}/s": run_phase("paced", args.paced_rate, args, broker, workdir),
        }
    print(f"\nime-bridge bench: {args.contracts} contracts, {args.seconds:g}s windows, {os.cpu_count()} cores")
    print(f"{'phase':<16}{'msgs/s':>10}{'CPU µs/msg':>12}{'CPU share':>11}{'p50 ms':>9}{'p99 ms':>9}")
    for phase, figures in results.items():
        print(
            f"{phase:<16}{figures['msgs_per_s']:>10,.0f}{figures['cpu_us_per_msg']:>12.1f}"
            f"{figures['cpu_share']:>10.0%}{figures['p50_ms']:>9.2f}{figures['p99_ms']:>9.2f}"
        )
    bad, clean = results[bad_phase], results["full speed"]
    print(
        f"\n{bad_phase.strip()}: CPU µs/msg {bad['cpu_us_per_msg'] / clean['cpu_us_per_msg']:.2f}x the clean full-speed"
        f" phase's ({bad['bad_share']:.1%} of the records were dead letters; the bridge logged"
        f" {bad['rejection_log_lines']:.0f} frame_rejected lines in the whole phase)"
    )
    raw = results["  raw capture"]
    print(
        f"raw capture: {raw['cpu_us_per_msg'] - clean['cpu_us_per_msg']:+.1f} CPU µs per frame against the clean"
        f" full-speed phase ({raw['cpu_us_per_msg'] / clean['cpu_us_per_msg']:.2f}x)"
    )


if __name__ == "__main__":
    main()
