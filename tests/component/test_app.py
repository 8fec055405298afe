"""app: the bridge assembled, with an in-memory sink, against the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from bridge.app import Bridge, PublisherFailed
from bridge.devtools.simulator import Simulator, SimulatorConfig
from bridge.records import MemorySink, OutgoingRecord, RawFrames
from bridge.spool import SpoolError
from tests.support.broker import BrokerInfo
from tests.support.harness import bridge_settings

NO_BROKER = BrokerInfo("127.0.0.1:9", "none", supports_idempotence=False)


class ExplodingSink(MemorySink):
    """A sink with a bug: publish raises something that is not a Kafka error."""

    async def publish(self, records: Sequence[OutgoingRecord], raw: Sequence[RawFrames] = ()) -> list[Exception | None]:
        raise RuntimeError("a bug in the sink")


async def test_a_publisher_that_dies_stops_the_bridge_with_an_error_instead_of_leaving_it_mute() -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        settings = bridge_settings(simulator, NO_BROKER, ime={"contract_ids": [simulator.contracts[0].id]})
        bridge = Bridge(settings, sink=ExplodingSink())
        stop = asyncio.Event()
        with pytest.raises(PublisherFailed) as caught:
            await asyncio.wait_for(bridge.run(stop), timeout=30)
    assert isinstance(caught.value.__cause__, RuntimeError)


async def test_a_spool_directory_that_cannot_be_used_stops_the_start_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        settings = bridge_settings(
            simulator,
            NO_BROKER,
            ime={"contract_ids": [simulator.contracts[0].id]},
            buffer={"overflow": "spool", "spool_dir": str(blocker / "spool")},
        )
        with pytest.raises(SpoolError, match="cannot open the spool"):
            await asyncio.wait_for(Bridge(settings, sink=MemorySink()).run(asyncio.Event()), timeout=30)
    (critical,) = [record for record in caplog.records if record.getMessage() == "spool_unusable"]
    assert critical.levelname == "CRITICAL"
