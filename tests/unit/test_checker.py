"""The delivery checker itself: a checker that miscounts makes delivery tests pass or fail for nothing."""

from __future__ import annotations

import json
from typing import Any

from aiokafka.structs import ConsumerRecord

from bridge.devtools.simulator import SentFrame
from bridge.encode import encode_update, load_schema
from bridge.normalize import ContractUpdate, Normalizer
from bridge.protocol import Endpoint
from tests.support.checker import check_delivery
from tests.unit.test_normalize import HT_DOCUMENT_EXAMPLE

SCHEMA = load_schema()


def snapshot(open_interest: int) -> str:
    """The HT document's example frame (contract 1001); snapshots differ by their open interest."""
    frame = json.loads(HT_DOCUMENT_EXAMPLE)
    frame["data"]["ContractInfo"]["open_interest"] = open_interest
    return json.dumps(frame)


def published(frames: list[str]) -> list[ConsumerRecord[Any, Any]]:
    """What the bridge publishes for `frames`, in this order, as a consumer reads it."""
    normalize = Normalizer(session_id="s")
    records = []
    for offset, frame in enumerate(frames):
        update = normalize(frame, Endpoint.ID, 1)
        assert isinstance(update, ContractUpdate)
        headers = [("schema", SCHEMA.name.encode())]
        records.append(ConsumerRecord("t", 0, offset, 0, 0, b"1001", encode_update(update), None, 0, 0, headers))
    return records


def test_a_snapshot_sent_twice_is_two_positions_not_a_reordering() -> None:
    """After a reconnect the simulator resends the current snapshot: the same identity at a later position."""
    a, b = snapshot(1), snapshot(2)
    sent = [SentFrame(1, "1001", a), SentFrame(1, "1001", b), SentFrame(2, "1001", b)]
    report = check_delivery(sent, published([a, b, b]))
    assert (report.total_lost, sum(report.duplicated.values()), sum(report.out_of_order.values())) == (0, 0, 0)


def test_a_real_reordering_a_loss_and_a_duplicate_are_seen() -> None:
    a, b, c = snapshot(1), snapshot(2), snapshot(3)
    sent = [SentFrame(1, "1001", frame) for frame in (a, b, c)]
    report = check_delivery(sent, published([b, a, a]))
    assert report.lost == {"1001": [2]}
    assert report.duplicated == {"1001": 1}
    assert report.out_of_order == {"1001": 1}
