"""Long-lived tasks that no unexpected exception ends silently.

`supervised` runs a coroutine function until it returns; an exception is logged as `task_failed` with its
traceback, counted in `ime_bridge_task_failures_total{task}`, and the function is started again after a
jittered backoff (reset once a run has lasted a minute). `every` runs a step on a schedule; a failing step is
logged and counted the same way and the schedule goes on. Cancellation is never caught: stopping a task
stays the owner's business. Failures that restarting cannot fix are not exceptions here: their owners end
the process (the publisher, a fatal source or sink error).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.logs import log_exception
from bridge.metrics import Metrics
from bridge.retry import Backoff

logger = logging.getLogger(__name__)

# A run that lasted this long was healthy: the next failure starts the backoff from its base again.
HEALTHY_RUN_SECONDS = 60.0


async def supervised(
    task: str, run: Callable[[], Awaitable[None]], *, metrics: Metrics, backoff: Backoff | None = None
) -> None:
    """Run `run()` until it returns, restarting it after each unexpected exception (see the module docstring)."""
    failures = metrics.task_failures.labels(task)  # a series from the start, at 0
    backoff = backoff or Backoff(1.0, 60.0)
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except Exception:
            failures.inc()
            if time.monotonic() - started >= HEALTHY_RUN_SECONDS:
                backoff.reset()
            delay = backoff.next_delay()
            log_exception(logger, "task_failed", task=task, restart_in=round(delay, 3))
        await asyncio.sleep(delay)


async def every(
    interval: float,
    step: Callable[[], Awaitable[None] | None],
    *,
    task: str,
    metrics: Metrics,
    immediately: bool = False,
) -> None:
    """Call `step` (plain or async) every `interval` seconds until cancelled, the first time at once when
    `immediately`; a failing step is logged with its traceback and counted, and the schedule goes on: one bad
    tick must not stop, say, the spool's fsync."""
    failures = metrics.task_failures.labels(task)
    if not immediately:
        await asyncio.sleep(interval)
    while True:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception:
            failures.inc()
            log_exception(logger, "task_failed", task=task, next_in=interval)
        await asyncio.sleep(interval)
