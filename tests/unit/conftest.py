"""The unit layer stays pure: a test here that opens a network connection or binds a network socket (AF_INET or
AF_INET6, loopback included) or starts a subprocess fails, naming what it tried; such a test belongs in
tests/component (or tests/integration when it needs a broker).

Creating sockets stays allowed, and so does AF_UNIX: asyncio's event loop makes a socketpair for its self-pipe.
The attempt raises `UnitLayerViolation` where it happens, and because code under test may catch that, the test is
failed afterwards as well, from the record of every attempt made during its setup, call and teardown.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

_NETWORK_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_MOVE = "a unit test may not do this; move the test to tests/component (tests/integration if it needs a broker)"


class UnitLayerViolation(RuntimeError):
    """A unit test tried to use the network or start a process."""


def _guarded_socket_method(name: str, original: Callable[..., Any], attempts: list[str]) -> Callable[..., Any]:
    def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if self.family in _NETWORK_FAMILIES:
            what = f"socket.{name}({', '.join(repr(arg) for arg in args)})"
            attempts.append(what)
            raise UnitLayerViolation(f"{what}: {_MOVE}")
        return original(self, *args, **kwargs)

    return guarded


def _refused(name: str, attempts: list[str], *, method: bool = False) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        shown = args[1:] if method else args  # not the half-made instance: its repr may need what __init__ sets
        what = f"{name}({', '.join(repr(arg) for arg in shown)[:200]})"
        attempts.append(what)
        raise UnitLayerViolation(f"{what}: {_MOVE}")

    return refuse


@contextmanager
def _unit_guard(attempts: list[str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("connect", "connect_ex", "bind", "sendto"):
            patch.setattr(socket.socket, name, _guarded_socket_method(name, getattr(socket.socket, name), attempts))
        # Popen covers subprocess.run/call/check_output and asyncio's create_subprocess_exec/shell.
        patch.setattr(subprocess.Popen, "__init__", _refused("subprocess.Popen", attempts, method=True))
        for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp"):
            if hasattr(os, name):
                patch.setattr(os, name, _refused(f"os.{name}", attempts))
        yield


def _fail_on_attempts(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    attempts: list[str] = []
    try:
        with _unit_guard(attempts):
            yield
    except Exception as failure:
        if attempts:
            raise pytest.fail.Exception(_message(item, phase, attempts), pytrace=False) from failure
        raise
    if attempts:
        pytest.fail(_message(item, phase, attempts), pytrace=False)


def _message(item: pytest.Item, phase: str, attempts: list[str]) -> str:
    return f"{item.nodeid} ({phase}) tried {'; '.join(dict.fromkeys(attempts))}: {_MOVE}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _fail_on_attempts(item, "setup")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _fail_on_attempts(item, "call")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _fail_on_attempts(item, "teardown")
