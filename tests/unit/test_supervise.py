"""Supervision: an exception injected into any long-lived task is logged with its traceback, counted, and the
task runs again; backoff arithmetic never overflows."""

from __future__ import annotations

import asyncio

import pytest

from bridge.metrics import Metrics
from bridge.retry import Backoff
from bridge.supervise import every, supervised
from tests.support.waiting import wait_for


def test_the_backoff_after_100000_failures_is_within_zero_and_the_cap() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next_delay() for _ in range(100_000)]
    assert all(0 <= delay <= 30.0 for delay in delays)
    assert max(delays[-1000:]) > 15, "still jittered up to the cap"


async def test_supervised_restarts_a_run_that_raised_and_returns_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("injected")

    await asyncio.wait_for(supervised("test", run, metrics=metrics, backoff=Backoff(0.01, 0.01)), timeout=5)
    assert runs == 2
    assert metrics.registry.get_sample_value("ime_bridge_task_failures_total", {"task": "test"}) == 1
    (failed,) = [record for record in caplog.records if record.getMessage() == "task_failed"]
    assert failed.exc_info is not None
    assert isinstance(failed.exc_info[1], RuntimeError)


async def test_every_goes_on_after_a_failing_step() -> None:
    metrics = Metrics()
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1
        if steps == 1:
            raise RuntimeError("injected")

    schedule = asyncio.create_task(every(0.01, step, task="test", metrics=metrics))
    await wait_for(lambda: steps >= 3, within=5)
    schedule.cancel()
    await asyncio.gather(schedule, return_exceptions=True)
    assert metrics.registry.get_sample_value("ime_bridge_task_failures_total", {"task": "test"}) == 1


async def test_every_immediately_takes_its_first_step_before_the_first_interval() -> None:
    """immediately=True: a gauge kept by the schedule has its value before anyone can read it."""
    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1

    schedule = asyncio.create_task(every(3600, step, task="test", metrics=Metrics(), immediately=True))
    await asyncio.sleep(0)
    assert steps == 1
    later = asyncio.create_task(every(3600, step, task="test", metrics=Metrics()))
    await asyncio.sleep(0)
    assert steps == 1  # the default waits an interval first
    for task in (schedule, later):
        task.cancel()
    await asyncio.gather(schedule, later, return_exceptions=True)
