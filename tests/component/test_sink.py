"""KafkaSink's start at its boundary: Kafka's errors translated, nothing left open when it fails."""

from __future__ import annotations

import gc
import warnings

import pytest

from bridge.config import KafkaSettings
from bridge.devtools.broker import free_port
from bridge.records import SinkUnavailable
from bridge.sink import KafkaSink


@pytest.mark.parametrize("create_topics", [True, False])
async def test_a_start_that_cannot_reach_kafka_is_unavailable_and_leaves_no_client_open(create_topics: bool) -> None:
    settings = KafkaSettings(
        bootstrap_servers=[f"127.0.0.1:{free_port()}"], request_timeout_ms=1000, create_topics=create_topics
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = ""
        try:
            await KafkaSink(settings).start()
        except SinkUnavailable as exc:
            message = str(exc)
        gc.collect()  # the failed start's clients are unreachable now: an unclosed one warns when collected
    assert "KafkaConnectionError" in message
    assert [str(warning.message) for warning in caught if "Unclosed" in str(warning.message)] == []
