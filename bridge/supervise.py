"""Long-lived tasks that an unexpected exception must not end silently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bridge.logs import log_exception
from bridge.metrics import Metrics

logger = logging.getLogger(__name__)


async def every(interval: float, step: Callable[[], None], *, task: str, metrics: Metrics) -> None:
    """Call `step` every `interval` seconds until cancelled.

    An exception from `step` is logged with its traceback and counted in `ime_bridge_task_failures_total{task}`,
    and the schedule goes on: one bad tick must not stop, say, the spool's fsync for good.
    """
    failures = metrics.task_failures.labels(task)  # a series from the start, at 0
    while True:
        await asyncio.sleep(interval)
        try:
            step()
        except Exception:
            failures.inc()
            log_exception(logger, "task_failed", task=task)
