"""`ime-bridge simulate`: the simulator's command-line options and how they make a running simulator."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bridge.devtools.simulator.model import SimulatorConfig
from bridge.devtools.simulator.server import Simulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to `parser` (defaults from SimulatorConfig)."""
    defaults = SimulatorConfig()
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="port to listen on; 0 picks a free one (default %(default)s)"
    )
    parser.add_argument(
        "--contracts",
        type=int,
        default=defaults.contracts,
        help="number of contracts in the simulated market (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="snapshots per second across the market; 0 = as fast as clients read (default %(default)s)",
    )
    parser.add_argument(
        "--dialect",
        choices=("ht", "legacy"),
        default=defaults.dialect,
        help="frame dialect: ht (contractId, UTC timestamps with Z) or legacy (ContractId, naive timestamps)",
    )
    parser.add_argument("--username", default=defaults.username, help="accepted username (default %(default)s)")
    parser.add_argument("--password", default=defaults.password, help="accepted password (default %(default)s)")
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=defaults.token_ttl,
        help="lifetime of issued tokens in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed of the market generator (default %(default)s)"
    )
    parser.add_argument(
        "--prerender",
        action="store_true",
        help="cycle through frames rendered at start, for benchmarks (the simulator then costs little CPU)",
    )
    parser.add_argument(
        "--bad-frame-ratio",
        type=float,
        default=defaults.bad_frame_ratio,
        help="with --prerender: share of malformed frames, e.g. 0.1 for every 10th (default %(default)s)",
    )
    parser.add_argument(
        "--replay",
        type=Path,
        metavar="PATH",
        help="play a capture file series (ime-bridge capture) instead of the generated market; its contracts are "
        "the catalogue",
    )
    parser.add_argument(
        "--replay-speed",
        type=float,
        default=defaults.replay_speed,
        help="with --replay: the captured pace times this; 0 = as fast as clients read (default %(default)s)",
    )
    parser.add_argument("--replay-loop", action="store_true", help="with --replay: start again at the end")


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The SimulatorConfig for options added by `add_arguments`."""
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        contracts=args.contracts,
        rate=args.rate,
        dialect=args.dialect,
        username=args.username,
        password=args.password,
        token_ttl=args.token_ttl,
        seed=args.seed,
        prerender=args.prerender,
        bad_frame_ratio=args.bad_frame_ratio,
        replay=args.replay,
        replay_speed=args.replay_speed,
        replay_loop=args.replay_loop,
    )


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve a simulator configured by `args` until cancelled, after printing where and how to log in."""
    async with Simulator(config_from_args(args)) as simulator:
        config = simulator.config
        print(
            f"IME simulator: http {simulator.base_url} ws {simulator.ws_url} "
            f"username={config.username} password={config.password} "
            f"contracts={len(simulator.contracts)} rate={config.rate:g}/s dialect={config.dialect}"
            + (f" replay={config.replay} speed={config.replay_speed:g}" if config.replay else ""),
            flush=True,
        )
        await asyncio.Event().wait()
