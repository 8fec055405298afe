"""Supervision: an exception injected into any long-lived task is logged with its traceback, counted, and the
task runs again; backoff arithmetic never overflows."""

from __future__ import annotations

import asyncio
import functools
import inspect
from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.auth import IssuedToken
from bridge.buffer import DeliveryBuffer
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.handover import ShardKeeper
from bridge.records import MemorySink
from bridge.source import WebSocketSource
from bridge.subscriptions import SubscriptionManager
from tests.component.test_app import NO_BROKER
from tests.support.harness import bridge_settings
from tests.support.waiting import wait_for


def fail_once(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Make `owner.name` raise on its first call and behave as before after; returns the call counter."""
    original = getattr(owner, name)
    calls = [0]

    def first_fails() -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(f"injected into {owner.__name__}.{name}")

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def patched(*args: Any, **kwargs: Any) -> Any:
            first_fails()
            return await original(*args, **kwargs)

    else:

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            first_fails()
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return calls


TASKS = [
    ("reader", WebSocketSource, "_keep_connected", {}),
    ("watchdog", WebSocketSource, "_watch", {"ime": {"stale_after_seconds": 60}}),
    ("token-refresh", IssuedToken, "refresh_ahead", {}),
    ("reload", Bridge, "_reload_on_request", {}),
    ("reprobe", SubscriptionManager, "reprobe", {"ime": {"quarantine_reprobe_seconds": 0.2}}),
    ("name-refresh", SubscriptionManager, "_refresh_names", {"ime": {"name_refresh_seconds": 0.2}}),
    ("spool-maintenance", DeliveryBuffer, "maintain", {"buffer": {"overflow": "spool"}}),
    ("bisection", SubscriptionManager, "_isolate", {}),
    ("shards", ShardKeeper, "run", {}),
]


@pytest.mark.parametrize(("task", "owner", "method", "sections"), TASKS, ids=[task for task, *_ in TASKS])
async def test_an_exception_in_a_background_task_is_logged_counted_and_the_task_runs_again(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    task: str,
    owner: type,
    method: str,
    sections: dict[str, dict[str, Any]],
) -> None:
    calls = fail_once(monkeypatch, owner, method)
    async with Simulator(SimulatorConfig(contracts=4, rate=50)) as simulator:
        contracts = [contract.id for contract in simulator.contracts]
        if task == "bisection":
            await simulator.invalidate_contracts([contracts[-1]])  # a 1008 on a fresh token starts the search
        if "buffer" in sections:
            sections = {"buffer": {**sections["buffer"], "spool_dir": str(tmp_path / "spool")}}
        settings = bridge_settings(
            simulator, NO_BROKER, **{**sections, "ime": {"contract_ids": contracts, **sections.get("ime", {})}}
        )
        bridge = Bridge(settings, sink=MemorySink(), config_path=None)
        stop = asyncio.Event()
        running = asyncio.create_task(bridge.run(stop))
        try:

            def failures() -> float | None:
                return bridge.metrics.registry.get_sample_value("ime_bridge_task_failures_total", {"task": task})

            await wait_for(lambda: failures() == 1, within=30, what=f"the failure of {task} counted")
            await wait_for(lambda: calls[0] >= 2, within=30, what=f"{task} to run again")
            if task == "bisection":
                await wait_for(lambda: bool(bridge.readiness()[1].get("quarantined")), within=30, what="quarantine")
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=30)
    failed = [record for record in caplog.records if record.getMessage() == "task_failed"]
    assert failed, f"no task_failed log line for {task}"
    assert failed[0].exc_info is not None, "logged with its traceback"
    assert f"{owner.__name__}.{method}" in str(failed[0].exc_info[1])
