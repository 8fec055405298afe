"""Stop signals: the first SIGTERM or SIGINT asks for an orderly stop, a second one exits at once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

EXIT_INTERRUPTED = 130


def install_stop_signals(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: set `stop` (orderly stop). Second: exit at once with EXIT_INTERRUPTED."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(EXIT_INTERRUPTED)
        print(f"received {signal.Signals(signum).name}, stopping (again to exit at once)", file=sys.stderr)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
