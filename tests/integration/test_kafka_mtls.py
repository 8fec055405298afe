"""Kafka over mutual TLS: the bridge's producer through a TLS endpoint that demands a client certificate.

tansu speaks plain TCP here; a TLS-terminating proxy in front of it (tests/support/tlsproxy.py) verifies the
client certificate against a throwaway CA, and the broker advertises the proxy's port so that every
connection the clients open, bootstrap and partition leaders alike, goes through it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from bridge.config import KafkaSettings
from bridge.devtools.broker import EmbeddedBroker, free_port
from bridge.records import OutgoingRecord, RecordKind, SinkUnavailable
from bridge.sink import KafkaSink, client_options
from tests.support.tlsproxy import MutualTlsProxy, Pki, make_pki

pytestmark = pytest.mark.integration


@dataclass
class TlsBroker:
    """A broker reachable only through the mutual-TLS proxy, and the files to reach it."""

    broker: EmbeddedBroker
    proxy: MutualTlsProxy
    pki: Pki

    def settings(self, **tls: Any) -> KafkaSettings:
        """Kafka settings for the proxy over SSL, verifying it with the test CA, plus `tls` (the client's files)."""
        return KafkaSettings(
            bootstrap_servers=[f"127.0.0.1:{self.proxy.port}"],
            security_protocol="SSL",
            ssl_cafile=self.pki.ca,
            enable_idempotence=False,  # tansu has no InitProducerId
            partitions=1,
            replication_factor=1,
            state_topic_enabled=False,
            request_timeout_ms=3000,
            **tls,
        )


@pytest.fixture
async def tls_broker(tmp_path: Path) -> AsyncIterator[TlsBroker]:
    pki = make_pki(tmp_path / "pki")
    proxy_port = free_port()
    broker = EmbeddedBroker(advertised_port=proxy_port)
    broker.start()
    proxy = MutualTlsProxy(pki, "127.0.0.1", broker.port, listen_port=proxy_port)
    proxy.start()
    try:
        yield TlsBroker(broker, proxy, pki)
    finally:
        proxy.stop()
        broker.close()


def update(key: bytes, value: bytes) -> OutgoingRecord:
    return OutgoingRecord(RecordKind.UPDATE, key, value, [], time.monotonic())


async def read_back(settings: KafkaSettings, count: int) -> list[tuple[bytes | None, bytes | None]]:
    """`count` records of settings.topic, read through the proxy with the same client options as tail."""
    consumer = AIOKafkaConsumer(
        settings.topic, **client_options(settings), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[tuple[bytes | None, bytes | None]] = []
    deadline = time.monotonic() + 30
    try:
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend((record.key, record.value) for record in batch)
    finally:
        await consumer.stop()
    return records


async def test_with_a_client_certificate_the_producer_publishes_through_mutual_tls(tls_broker: TlsBroker) -> None:
    settings = tls_broker.settings(ssl_certfile=tls_broker.pki.client_cert, ssl_keyfile=tls_broker.pki.client_key)
    sink = KafkaSink(settings)
    await sink.start()
    try:
        outcomes = await sink.publish([update(b"1001", b"first"), update(b"1002", b"second")])
    finally:
        await sink.stop()
    assert outcomes == [None, None]
    assert await read_back(settings, 2) == [(b"1001", b"first"), (b"1002", b"second")]
    # Every connection went through the proxy, each with the bridge's certificate.
    assert tls_broker.proxy.clients
    assert set(tls_broker.proxy.clients) == {"ime-bridge"}


async def test_without_a_client_certificate_the_start_fails_saying_so(tls_broker: TlsBroker) -> None:
    sink = KafkaSink(tls_broker.settings())
    with pytest.raises(SinkUnavailable) as failed:
        await sink.start()
    message = str(failed.value)
    assert "cannot create the topics" in message
    assert f"TLS to 127.0.0.1:{tls_broker.proxy.port}" in message
    assert "certificate required" in message
    assert tls_broker.proxy.clients == []  # the proxy forwarded nothing
    assert tls_broker.proxy.refused


async def test_a_certificate_from_another_ca_is_refused(tls_broker: TlsBroker) -> None:
    settings = tls_broker.settings(
        ssl_certfile=tls_broker.pki.stranger_cert, ssl_keyfile=tls_broker.pki.stranger_key, create_topics=False
    )
    with pytest.raises(SinkUnavailable) as failed:
        await KafkaSink(settings).start()
    message = str(failed.value)
    assert "cannot start the Kafka producer" in message
    assert "unknown ca" in message.lower()
    assert tls_broker.proxy.clients == []
