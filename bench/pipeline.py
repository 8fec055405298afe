"""`make bench`: simulator → bridge → broker, at full speed (with and without the latest-state topic, with a
share of bad frames, and raw capture's cost: two bridges at once, without and with it) and paced
(in the throughput and the latency profile, with 1,000 contracts, and raw capture's cost again), and the
straightforward implementation of bench/reference.py paced, for the ratio (`--phases` selects).

Three processes on 127.0.0.1: tansu, the simulator (pre-rendered frames, so it is not the bottleneck) and
`ime-bridge run` (two simulators and two bridges in the raw-capture phases). Figures come from the bridge's
/metrics over a measurement window after a warm-up: records acknowledged per second (updates and dead letters),
the bridge process's CPU µs per record (process_cpu_seconds_total), and receive→ack latency quantiles of the
updates interpolated from the ime_bridge_publish_latency_seconds histogram (as PromQL's histogram_quantile does),
the p99 of a publish round itself (ime_bridge_publish_round_seconds), the bridge's peak RSS (VmHWM) and records
per publish round. The bad-frame phase also prints its CPU per record against the clean full-speed phase's: a
flood of bad frames must stay cheap.

On a shared machine one run's figures move by a fifth or more: `--repeat N` runs the selected phases N times in
turn (so that the host's drift reaches every phase alike), shows each phase's median run and prints the range.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.devtools.broker import EmbeddedBroker, free_port, stop_process
from bridge.devtools.demo import quantile
from bridge.devtools.simulator.replay import CapturedMarket

Key = TypeVar("Key")


@dataclass(frozen=True)
class Scrape:
    """The counters the benchmark reads, at one instant."""

    at: float
    cpu_seconds: float
    received: float
    published: float
    dead_letters: float
    rounds: float
    latency_buckets: dict[float, float]
    round_buckets: dict[float, float]  # ime_bridge_publish_round_seconds (empty before the bridge had it)


def scrape(port: int) -> Scrape:
    """Read the bridge's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    at = time.monotonic()
    values: dict[str, float] = {}
    buckets: dict[float, float] = {}
    round_buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ime_bridge_publish_latency_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == "ime_bridge_publish_round_seconds_bucket":
                round_buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == "ime_bridge_messages_published_total" and sample.labels.get("topic") == "bench":
                values["published"] = sample.value
            elif sample.name in (
                "process_cpu_seconds_total",
                "ime_bridge_messages_received_total",
                "ime_bridge_dead_letters_total",
                "ime_bridge_publish_rounds_total",
            ):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Scrape(
        at,
        values.get("process_cpu_seconds_total", 0.0),
        values.get("ime_bridge_messages_received_total", 0.0),
        values.get("published", 0.0),
        values.get("ime_bridge_dead_letters_total", 0.0),
        values.get("ime_bridge_publish_rounds_total", 0.0),
        buckets,
        round_buckets,
    )


def window_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """histogram_quantile over the bucket increments between two scrapes (NaN without observations)."""
    increments = ((bound, count - before.get(bound, 0.0)) for bound, count in after.items())
    found = quantile(increments, q)
    return float("nan") if found is None else found


@contextlib.contextmanager
def process(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` (in `env`, else this process's environment), stopping exactly that process (by PID)
    afterwards."""
    with log.open("wb") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
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


def peak_rss_bytes(pid: int) -> float:
    """The process's peak resident set size (VmHWM of /proc/PID/status; NaN where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    return float("nan")


@dataclass(frozen=True)
class RunningBridge:
    """A bridge started by `running_bridge`: where to scrape it, its process, its log files."""

    metrics_port: int
    pid: int
    logs: tuple[Path, Path]


@contextlib.contextmanager
def running_bridge(
    name: str,
    rate: float,
    args: argparse.Namespace,
    broker: EmbeddedBroker,
    workdir: Path,
    *,
    state_topic: bool = True,
    bad_frame_ratio: float = 0.0,
    contracts: int | None = None,
    profile: str = "throughput",
    raw_topic: bool = False,
    code: Path | None = None,
) -> Iterator[RunningBridge]:
    """A fresh simulator at `rate` snapshots/s (0 = as fast as possible) and a bridge reading it, once the bridge
    has had its first record acknowledged: with or without the latest-state topic (its fan-out is part of the
    cost of every round), with `bad_frame_ratio` of the frames malformed (each a dead letter), with or without
    raw capture (every frame also to a raw topic, zstd); the bridge runs the `bridge` package of `code` (a
    checkout) when given, else this one's."""
    executable = str(Path(sys.executable).parent / "ime-bridge")
    sim_port, metrics_port = free_port(), free_port()
    count = contracts or args.contracts
    contract_ids = [str(1001 + n) for n in range(count)] if args.capture is None else args.capture_contracts
    config = {
        "ime": {
            "base_url": f"http://127.0.0.1:{sim_port}",
            "ws_url": f"ws://127.0.0.1:{sim_port}",
            "allow_insecure": True,
            "username": "demo",
            "password": "demo-password",
            "contract_ids": contract_ids,
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
            **({} if profile == "throughput" else {"profile": profile}),  # the default: also for older commits
            **({} if args.linger_ms is None else {"linger_ms": args.linger_ms}),
        },
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "log": {"level": "WARNING"},
    }
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    simulator_command = [executable, "simulate", "--port", str(sim_port), "--contracts", str(count)]
    if args.capture is None:
        simulator_command += ["--rate", str(rate), "--prerender", "--bad-frame-ratio", str(bad_frame_ratio)]
    else:  # a real session as the load: as fast as the bridge reads it, or at its own pace for paced phases
        simulator_command += ["--replay", str(args.capture), "--replay-loop", "--replay-speed", "1" if rate else "0"]
    logs = (workdir / f"{name}-simulator.log", workdir / f"{name}-bridge.log")
    with (
        process(simulator_command, logs[0]),
        process(
            [executable, "run", "--config", str(config_path)],
            logs[1],
            env=None if code is None else os.environ | {"PYTHONPATH": str(code)},
        ) as bridge,
    ):
        wait_until(lambda: scrape(metrics_port).published > 0, f"{name}: first record acknowledged", logs, within=60)
        yield RunningBridge(metrics_port, bridge.pid, logs)


def run_phase(
    name: str, rate: float, args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path, **options: Any
) -> dict[str, float]:
    """One measurement: a window of `args.seconds` after `args.warmup`, of a bridge started by `running_bridge`
    (`options` are its). With `--against`, a second simulator and a bridge of that commit run beside it over the
    same window (started first every other repetition), and its figures come back as `against_<figure>`."""
    starts: list[tuple[Path | None, str, dict[str, Any]]] = [(None, name, options)]
    if args.against_code:
        starts.append((args.against_code, f"{name}-against", options | {"code": args.against_code}))
    if args.repetition % 2:
        starts.reverse()
    with contextlib.ExitStack() as stack:
        (window,) = windows(start_bridges(stack, starts, rate, args, broker, workdir), args, 1)
        found = window[None]
        if args.against_code:
            found |= {f"against_{key}": value for key, value in window[args.against_code].items()}
        return found


def windows(
    bridges: dict[Key, RunningBridge], args: argparse.Namespace, count: int
) -> Iterator[dict[Key, dict[str, float]]]:
    """After `args.warmup`, `count` consecutive windows of `args.seconds` over all `bridges` at once: each bridge's
    figures in each window."""
    time.sleep(args.warmup)
    before = {key: scrape(bridge.metrics_port) for key, bridge in bridges.items()}
    for _ in range(count):
        time.sleep(args.seconds)
        after = {key: scrape(bridge.metrics_port) for key, bridge in bridges.items()}
        yield {key: window_figures(before[key], after[key], bridge) for key, bridge in bridges.items()}
        before = after


def window_figures(before: Scrape, after: Scrape, bridge: RunningBridge) -> dict[str, float]:
    """The figures of one window between two scrapes of `bridge`."""
    dead_letters = after.dead_letters - before.dead_letters
    acknowledged = after.published - before.published + dead_letters
    elapsed = after.at - before.at
    return {
        "msgs_per_s": acknowledged / elapsed,
        "cpu_us_per_msg": (after.cpu_seconds - before.cpu_seconds) / max(acknowledged, 1) * 1e6,
        "bad_share": dead_letters / max(acknowledged, 1),
        "rejection_log_lines": float(bridge.logs[1].read_text(errors="replace").count("event=frame_rejected ")),
        "cpu_share": (after.cpu_seconds - before.cpu_seconds) / elapsed,
        "p50_ms": window_quantile(0.5, before.latency_buckets, after.latency_buckets) * 1e3,
        "p99_ms": window_quantile(0.99, before.latency_buckets, after.latency_buckets) * 1e3,
        "p999_ms": window_quantile(0.999, before.latency_buckets, after.latency_buckets) * 1e3,
        "round_p99_ms": window_quantile(0.99, before.round_buckets, after.round_buckets) * 1e3,
        "peak_rss_mb": peak_rss_bytes(bridge.pid) / 2**20,
        "round_records": acknowledged / max(after.rounds - before.rounds, 1),
        "backlog": after.received - after.published,
    }


def run_raw_pairs(args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path, rate: float) -> dict[str, float]:
    """Raw capture's cost per frame: two bridges at `rate` (0: full speed) at once, each with its own simulator, one
    without raw capture and one with it, over `args.raw_pairs` windows. Both share the machine's moments (a noisy
    neighbour slows both alike), which runs one after the other do not: their difference per window is the cost.
    The figures of the raw bridge's median window, with every window's difference (`raw_delta_<n>`), their median
    (`raw_delta`) and each as a share of the clean bridge's CPU per record in its window (`raw_share_<n>`: a host
    that slows every record slows both alike, so the share moves less than the µs); with `--against`, also raw
    capture against that revision's (`run_raw_against`)."""
    starts: list[tuple[bool, str, dict[str, Any]]] = [
        (False, "clean", {"raw_topic": False}),
        (True, "raw", {"raw_topic": True}),
    ]
    pairs = [
        (raw["cpu_us_per_msg"] - clean["cpu_us_per_msg"], clean["cpu_us_per_msg"], raw)
        for clean, raw in (
            (window[False], window[True]) for window in alternating_windows(starts, rate, args, broker, workdir)
        )
    ]
    pairs.sort(key=lambda pair: pair[0])
    delta, _, median_window = pairs[len(pairs) // 2]
    deltas = {f"raw_delta_{n}": pair_delta for n, (pair_delta, _, _) in enumerate(pairs)}
    shares = {f"raw_share_{n}": pair_delta / clean for n, (pair_delta, clean, _) in enumerate(pairs)}
    return median_window | deltas | shares | {"raw_delta": delta} | run_raw_against(args, broker, workdir, rate)


def run_raw_against(args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path, rate: float) -> dict[str, float]:
    """With `--against`: two bridges capturing raw at `rate` at once, this one and that revision's, over
    `args.raw_pairs` windows; each window's CPU per frame of this one less the other's (`raw_against_<n>`)."""
    if args.against_code is None:
        return {}
    starts: list[tuple[Path | None, str, dict[str, Any]]] = [
        (None, "raw-this", {"raw_topic": True}),
        (args.against_code, "raw-against", {"raw_topic": True, "code": args.against_code}),
    ]
    deltas = sorted(
        window[None]["cpu_us_per_msg"] - window[args.against_code]["cpu_us_per_msg"]
        for window in alternating_windows(starts, rate, args, broker, workdir)
    )
    return {f"raw_against_{n}": delta for n, delta in enumerate(deltas)}


def alternating_windows(
    starts: list[tuple[Key, str, dict[str, Any]]],
    rate: float,
    args: argparse.Namespace,
    broker: EmbeddedBroker,
    workdir: Path,
) -> Iterator[dict[Key, dict[str, float]]]:
    """`args.raw_pairs` windows of the bridges of `starts` ((key, name, `running_bridge` options) each) at `rate`
    (0: full speed) at once: half of them with the bridges started in that order, half in the reverse, so that
    neither is favoured."""
    for session, count in enumerate((args.raw_pairs - args.raw_pairs // 2, args.raw_pairs // 2)):
        if not count:
            continue
        named = [(key, f"{'paced' if rate else 'full'}-{name}-{session}", options) for key, name, options in starts]
        with contextlib.ExitStack() as stack:
            bridges = start_bridges(stack, named if session == 0 else named[::-1], rate, args, broker, workdir)
            yield from windows(bridges, args, count)


def start_bridges(
    stack: contextlib.ExitStack,
    starts: list[tuple[Key, str, dict[str, Any]]],
    rate: float,
    args: argparse.Namespace,
    broker: EmbeddedBroker,
    workdir: Path,
) -> dict[Key, RunningBridge]:
    """The bridges of `starts` ((key, name, `running_bridge` options) each) at `rate`, started in that order and
    stopped with `stack`."""
    return {
        key: stack.enter_context(running_bridge(name, rate, args, broker, workdir, **options))
        for key, name, options in starts
    }


def listening(port: int) -> bool:
    """Whether 127.0.0.1:`port` accepts a connection (else OSError, which `wait_until` takes for not yet)."""
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return True


def run_reference(rate: float, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """The straightforward implementation (bench/reference.py) against a fresh simulator at `rate`."""
    executable = str(Path(sys.executable).parent / "ime-bridge")
    port = free_port()
    simulator_command = [executable, "simulate", "--port", str(port), "--contracts", str(args.contracts)]
    simulator_command += ["--rate", str(rate), "--prerender"]
    reference_command = [sys.executable, "-m", "bench.reference", "--base-url", f"http://127.0.0.1:{port}"]
    reference_command += ["--ws-url", f"ws://127.0.0.1:{port}", "--bootstrap-servers", args.broker]
    reference_command += ["--contracts", str(args.contracts), "--linger-ms", str(args.linger_ms or 5)]
    reference_command += ["--warmup", str(args.warmup), "--seconds", str(args.seconds)]
    log = workdir / "reference-simulator.log"
    with process(simulator_command, log):
        wait_until(lambda: listening(port), "simulator", (log,))
        output = subprocess.run(reference_command, check=True, capture_output=True, text=True, timeout=120).stdout
    figures: dict[str, float] = json.loads(output.splitlines()[-1])
    return figures | {"round_records": float("nan")}


PHASES = (
    *("full", "full-bad", "full-no-state", "full-raw"),
    *("paced", "paced-latency", "paced-1000", "paced-raw", "reference"),
)


def main() -> None:
    """Run the selected phases and print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contracts", type=int, default=64)
    parser.add_argument(
        "--capture",
        type=Path,
        help="play this capture (ime-bridge capture) as the load, looped, instead of the generated market: the "
        "full-speed phases as fast as the bridge reads, the paced ones at the captured pace",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--paced-rate", type=float, default=5000.0)
    parser.add_argument("--linger-ms", type=int, help="kafka.linger_ms of every phase (default: the profile's)")
    parser.add_argument(
        "--raw-pairs",
        type=int,
        default=4,
        help="windows of two bridges at once, without and with raw capture, for its cost (at full speed and paced)",
    )
    parser.add_argument("--bad-frame-ratio", type=float, default=0.1, help="share of bad frames in their phase")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the selected phases this many times in turn; show the medians"
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated phases to run, of {', '.join(PHASES)}"
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="run a bridge of this git revision beside this one in each phase but the reference, over the same "
        "windows, and print the ratios (raw capture: both bridges capture raw, and the difference per frame)",
    )
    args = parser.parse_args()
    if args.capture is not None:
        args.capture_contracts = [contract.id for contract in CapturedMarket.load(args.capture).contracts]
    selected = args.phases.split(",")
    if unknown := [phase for phase in selected if phase not in PHASES]:
        parser.error(f"unknown phases: {', '.join(unknown)}")

    paced = args.paced_rate
    with (
        tempfile.TemporaryDirectory(prefix="ime-bridge-bench-") as directory,
        EmbeddedBroker() as broker,
        checkout(args.against, Path(directory) / "against") as args.against_code,
    ):
        workdir = Path(directory)
        phases: dict[str, tuple[str, Callable[[], dict[str, float]]]] = {
            "full": ("full speed", lambda: run_phase("full", 0, args, broker, workdir)),
            "full-bad": (
                f"  {args.bad_frame_ratio:.0%} bad frames",
                lambda: run_phase("full-bad", 0, args, broker, workdir, bad_frame_ratio=args.bad_frame_ratio),
            ),
            "full-no-state": (
                "  no state topic",
                lambda: run_phase("full-no-state", 0, args, broker, workdir, state_topic=False),
            ),
            "full-raw": ("  raw capture", lambda: run_raw_pairs(args, broker, workdir, 0)),
            "paced": (f"paced {paced:g}/s", lambda: run_phase("paced", paced, args, broker, workdir)),
            "paced-latency": (
                "  latency profile",
                lambda: run_phase("paced-latency", paced, args, broker, workdir, profile="latency"),
            ),
            "paced-1000": (
                "  1,000 contracts",
                lambda: run_phase("paced-1000", paced, args, broker, workdir, contracts=1000),
            ),
            "paced-raw": ("  raw capture, paced", lambda: run_raw_pairs(args, broker, workdir, paced)),
            "reference": ("  reference", lambda: run_reference(paced, args, workdir)),
        }
        args.broker = broker.bootstrap_servers
        runs: dict[str, list[dict[str, float]]] = {}
        for repetition in range(max(args.repeat, 1)):
            args.repetition = repetition
            for key in PHASES:
                if key in selected:
                    name, run = phases[key]
                    runs.setdefault(name, []).append(run())
    raw_phases = {phases["full-raw"][0]: "at full speed", phases["paced-raw"][0]: f"paced at {paced:g}/s"}
    reference, paced_name = phases["reference"][0], phases["paced"][0]
    results = {
        name: median_by(phase_runs, "raw_delta" if name in raw_phases else "cpu_us_per_msg")
        for name, phase_runs in runs.items()
    }
    load = (
        f"{args.contracts} contracts"
        if args.capture is None
        else f"the capture {args.capture} ({len(args.capture_contracts)} contracts; paced phases at its pace)"
    )
    repeated = f", each phase's median of {args.repeat} runs" if args.repeat > 1 else ""
    print(f"\nime-bridge bench: {load}, {args.seconds:g}s windows, {os.cpu_count()} cores{repeated}")
    print(
        f"{'phase':<18}{'msgs/s':>9}{'CPU µs/msg':>11}{'CPU share':>10}{'p50 ms':>8}{'p99 ms':>8}{'p999 ms':>8}"
        f"{'round p99':>10}{'peak RSS MB':>12}{'records/round':>14}"
    )
    for phase, figures in results.items():
        print(
            f"{phase:<18}{figures['msgs_per_s']:>9,.0f}{figures['cpu_us_per_msg']:>11.1f}"
            f"{figures['cpu_share']:>10.0%}{figures['p50_ms']:>8.2f}{figures['p99_ms']:>8.2f}{figures['p999_ms']:>8.2f}"
            f"{figures.get('round_p99_ms', float('nan')):>10.2f}{figures['peak_rss_mb']:>12.0f}"
            f"{figures['round_records']:>14.1f}"
        )
    if args.repeat > 1:
        print()
        for phase, phase_runs in runs.items():
            if phase not in raw_phases:
                cpu = [run["cpu_us_per_msg"] for run in phase_runs]
                p99 = [run["p99_ms"] for run in phase_runs]
                print(
                    f"{phase.strip()}: over {len(phase_runs)} runs CPU µs/msg {min(cpu):.1f} to {max(cpu):.1f},"
                    f" p99 {min(p99):.2f} to {max(p99):.2f} ms"
                )
    for name in (paced_name, phases["paced-latency"][0]):
        if name in runs and reference in runs:
            ratios = sorted(
                run["cpu_us_per_msg"] / against["cpu_us_per_msg"]
                for run, against in zip(runs[name], runs[reference], strict=True)
            )
            print(
                f"\n{name.strip()}: CPU µs/msg {median(ratios):.2f}x the straightforward implementation's"
                f" (bench/reference.py){spread(ratios, 'x')}"
            )
    bad_phase = phases["full-bad"][0]
    if bad_phase in runs and "full speed" in runs:
        bad = results[bad_phase]
        ratios = sorted(
            run["cpu_us_per_msg"] / clean["cpu_us_per_msg"]
            for run, clean in zip(runs[bad_phase], runs["full speed"], strict=True)
        )
        print(
            f"\n{bad_phase.strip()}: CPU µs/msg {median(ratios):.2f}x the clean full-speed phase's{spread(ratios, 'x')}"
            f" ({bad['bad_share']:.1%} of the records were dead letters; the bridge logged"
            f" {bad['rejection_log_lines']:.0f} frame_rejected lines in the whole phase)"
        )
    if args.against:
        print_against(args.against, runs, skip=(*raw_phases, reference))
    for raw_phase, how in raw_phases.items():
        print_raw(raw_phase, how, runs.get(raw_phase, []), args)


def print_raw(phase: str, how: str, phase_runs: list[dict[str, float]], args: argparse.Namespace) -> None:
    """Raw capture's cost per frame over the windows of `phase_runs`, and with `--against` its change."""
    row = f"; its row is the raw bridge's median window{' (of the median repetition)' if args.repeat > 1 else ''}"
    for prefix, name, measured in (
        ("raw_against_", f"{phase.strip()} against {args.against}", f"this bridge's less {args.against}'s, both"),
        ("raw_delta_", phase.strip(), "two bridges, one without raw capture and one"),
    ):
        deltas = sorted(run[key] for run in phase_runs for key in run if key.startswith(prefix))
        if not deltas:
            continue
        share = ""
        if prefix == "raw_delta_":
            shares = sorted(run[key] for run in phase_runs for key in run if key.startswith("raw_share_"))
            share = f"; {median(shares):+.1%} of the bridge without it's CPU per record (median, same windows){row}"
        print(
            f"\n{name}: {median(deltas):+.1f} CPU µs per frame, {measured} capturing raw {how} at once, the median"
            f" of {len(deltas)} windows ({', '.join(f'{delta:+.1f}' for delta in deltas)}){share}"
        )


@contextlib.contextmanager
def checkout(revision: str | None, path: Path) -> Iterator[Path | None]:
    """A detached git worktree of `revision` at `path` (removed afterwards); None without a revision."""
    if revision is None:
        yield None
        return
    repository = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repository), "worktree", "add", "--detach", str(path), revision], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(repository), "worktree", "remove", "--force", str(path)], check=True)


def print_against(revision: str, runs: dict[str, list[dict[str, float]]], skip: tuple[str, ...]) -> None:
    """Each phase's figures against `revision`'s bridge in the same windows: CPU per record (the ratio's median
    and range over the repetitions) and p99."""
    shown = {phase: phase_runs for phase, phase_runs in runs.items() if phase not in skip}
    if shown:
        print(f"\nagainst {revision}, the same windows (this / {revision}):")
    for phase, phase_runs in shown.items():
        ratios = sorted(run["cpu_us_per_msg"] / run["against_cpu_us_per_msg"] for run in phase_runs)
        p99 = " ".join(f"{run['p99_ms']:.2f}/{run['against_p99_ms']:.2f}" for run in phase_runs)
        print(f"{phase.strip()}: CPU µs/msg {median(ratios):.2f}x{spread(ratios, 'x')}; p99 ms {p99}")


def median_by(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run whose `key` is the median of `runs` (the lower middle of an even count)."""
    return sorted(runs, key=lambda run: run[key])[(len(runs) - 1) // 2]


def median(values: list[float]) -> float:
    """The median of sorted `values` (the lower middle of an even count, as median_by)."""
    return values[(len(values) - 1) // 2]


def spread(values: list[float], unit: str) -> str:
    """What follows a median: the range of sorted `values`, when there are several."""
    return f", {values[0]:.2f}{unit} to {values[-1]:.2f}{unit} over {len(values)} runs" if len(values) > 1 else ""


if __name__ == "__main__":
    main()
