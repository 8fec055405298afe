"""app: the bridge assembled, with an in-memory sink, against the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bridge.app import Bridge, PublisherFailed
from bridge.simulator import Simulator, SimulatorConfig
from bridge.sink import MemorySink, OutgoingRecord
from tests.conftest import BrokerInfo
from tests.harness import bridge_settings

NO_BROKER = BrokerInfo("127.0.0.1:9", "none", supports_idempotence=False)


class ExplodingSink(MemorySink):
    """A sink with a bug: publish raises something that is not a Kafka error."""

    async def publish(self, records: Sequence[OutgoingRecord]) -> list[Exception | None]:
        raise RuntimeError("a bug in the sink")


async def test_a_publisher_that_dies_stops_the_bridge_with_an_error_instead_of_leaving_it_mute() -> None:
    async with Simulator(SimulatorConfig(contracts=2, rate=100)) as simulator:
        settings = bridge_settings(simulator, NO_BROKER, ime={"contract_ids": [simulator.contracts[0].id]})
        bridge = Bridge(settings, sink=ExplodingSink())
        stop = asyncio.Event()
        with pytest.raises(PublisherFailed) as caught:
            await asyncio.wait_for(bridge.run(stop), timeout=30)
    assert isinstance(caught.value.__cause__, RuntimeError)
