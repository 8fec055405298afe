"""Waiting for conditions in tests, never with a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], *, within: float = 30.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `within` seconds. Never a fixed sleep."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or condition}")
        await asyncio.sleep(interval)


async def assert_holds(
    condition: Callable[[], bool | Awaitable[bool]], *, seconds: float, interval: float = 0.05, what: str = ""
) -> None:
    """Check `condition` throughout `seconds`; fail at the first sample where it does not hold. For conditions that
    must stay true while traffic flows, rather than a value caught at one instant."""
    start = time.monotonic()
    while time.monotonic() < start + seconds:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if not result:
            raise AssertionError(f"{what or condition} stopped holding after {time.monotonic() - start:.2f}s")
        await asyncio.sleep(interval)
