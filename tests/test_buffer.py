"""buffer: conflation, spooling behind older records, re-queueing, a full spool, in memory and tmp files."""

from __future__ import annotations

import asyncio
import io
import itertools
from pathlib import Path

from fastavro import schemaless_reader

from bridge.buffer import DeliveryBuffer, Overflow, Round
from bridge.encode import load_schema
from bridge.metrics import Metrics
from bridge.normalize import ContractInfo, ContractUpdate
from bridge.sink import OutgoingRecord
from bridge.spool import Spool

SCHEMA = load_schema()


def update(contract: str, sequence: int) -> ContractUpdate:
    return ContractUpdate(
        contract, None, "ID", "IME Stream", 0, 0, [], None, None, ContractInfo(sequence, 0), sequence, "s"
    )


def decoded(record: OutgoingRecord) -> tuple[str, int, int]:
    value = schemaless_reader(io.BytesIO(record.value), SCHEMA.parsed, SCHEMA.parsed)
    assert isinstance(value, dict)
    return value["contract_id"], value["sequence"], value["skipped"]


def add(buffer: DeliveryBuffer, contract: str, sequence: int) -> None:
    buffer.add_update(update(contract, sequence), "t", [], 0.0)


async def take(buffer: DeliveryBuffer, limit: int = 1000) -> Round:
    return await asyncio.wait_for(buffer.take(limit), timeout=5)


def gauge(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_below_capacity_everything_is_kept_in_order() -> None:
    buffer = DeliveryBuffer(capacity=10, overflow=Overflow.CONFLATE, metrics=Metrics())
    for sequence in range(1, 6):
        add(buffer, "A", sequence)
    assert [decoded(r) for r in (await take(buffer)).records] == [("A", n, 0) for n in range(1, 6)]


async def test_conflation_keeps_the_latest_per_contract_and_counts_what_it_replaced() -> None:
    metrics = Metrics()
    buffer = DeliveryBuffer(capacity=3, overflow=Overflow.CONFLATE, metrics=metrics)
    for sequence in range(1, 4):
        add(buffer, "A", sequence)  # fills the buffer
    for sequence in range(4, 9):
        add(buffer, "A", sequence)  # conflated into A's newest pending record
    add(buffer, "B", 1)  # a contract with nothing pending is always kept
    add(buffer, "B", 2)
    records = [decoded(r) for r in (await take(buffer)).records]
    assert records == [("A", 1, 0), ("A", 2, 0), ("A", 8, 5), ("B", 2, 1)]
    assert gauge(metrics, "ime_bridge_conflated_total") == 6
    # What a consumer checks: every gap in the sequence is accounted for by skipped.
    a = [r for r in records if r[0] == "A"]
    assert all(now[1] - before[1] - 1 == now[2] for before, now in itertools.pairwise(a))


async def test_memory_stays_within_capacity_plus_one_per_contract() -> None:
    metrics = Metrics()
    buffer = DeliveryBuffer(capacity=50, overflow=Overflow.CONFLATE, metrics=metrics)
    for sequence in range(1, 2001):
        add(buffer, f"C{sequence % 20}", sequence)
        assert gauge(metrics, "ime_bridge_buffer_records") <= 50 + 20


async def test_a_failed_round_goes_back_to_the_head_in_order() -> None:
    buffer = DeliveryBuffer(capacity=100, overflow=Overflow.CONFLATE, metrics=Metrics())
    for sequence in range(1, 5):
        add(buffer, "A", sequence)
    first = await take(buffer, 3)
    add(buffer, "A", 5)
    assert buffer.settle(first, [True, False, False]) == 2
    assert [decoded(r)[1] for r in (await take(buffer)).records] == [2, 3, 4, 5]


async def test_spool_takes_over_past_the_threshold_and_order_holds_across_memory_and_disk(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(capacity=100, overflow=Overflow.SPOOL, metrics=metrics, spool=spool, spool_after=3)
    for sequence in range(1, 11):
        add(buffer, "A", sequence)
    # At the threshold, what waited in memory moved to the spool first: memory holds nothing a crash could take.
    assert gauge(metrics, "ime_bridge_buffer_records") == 0
    assert gauge(metrics, "ime_bridge_spool_records") == 10
    assert gauge(metrics, "ime_bridge_spool_bytes") > 0

    got: list[int] = []
    arrived = 10
    while len(got) < 10:
        taken = await take(buffer, 4)
        got += [decoded(r)[1] for r in taken.records]
        arrived += 1
        add(buffer, "A", arrived)  # arrivals while draining queue behind the spool
        buffer.settle(taken, [True] * len(taken.records))
    while spool.records or len(buffer):
        taken = await take(buffer, 4)
        got += [decoded(r)[1] for r in taken.records]
        buffer.settle(taken, [True] * len(taken.records))
    assert got == list(range(1, arrived + 1))


async def test_a_failed_spool_round_is_read_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(capacity=100, overflow=Overflow.SPOOL, metrics=Metrics(), spool=spool, spool_after=2)
    for sequence in range(1, 5):
        add(buffer, "A", sequence)
    from_spool = await take(buffer)
    assert len(from_spool.spooled) == 4
    assert buffer.settle(from_spool, [True, True, False, True]) == 1
    again = await take(buffer)
    assert [decoded(r)[1] for r in again.records] == [3]
    buffer.settle(again, [True])
    assert spool.records == 0


async def test_a_full_spool_holds_the_latest_per_contract_and_releases_it_first(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(capacity=100, overflow=Overflow.SPOOL, metrics=metrics, spool=spool, spool_after=1)
    add(buffer, "A", 1)
    add(buffer, "A", 2)  # spooled
    spool.max_bytes = spool.bytes  # the disk is full from here on
    for sequence in range(3, 7):
        add(buffer, "A", sequence)
    assert buffer.spool_full
    assert gauge(metrics, "ime_bridge_spool_full") == 1
    spool.max_bytes = 1 << 20
    got: list[tuple[str, int, int]] = []
    while len(got) < 3:
        taken = await take(buffer)
        got += [decoded(r) for r in taken.records]
        buffer.settle(taken, [True] * len(taken.records))
    assert got == [("A", 1, 0), ("A", 2, 0), ("A", 6, 3)]
    assert not buffer.spool_full


async def test_close_in_spool_mode_keeps_memory_and_in_flight_records_for_the_next_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(capacity=100, overflow=Overflow.SPOOL, metrics=Metrics(), spool=spool, spool_after=3)
    add(buffer, "A", 1)
    add(buffer, "A", 2)
    in_flight = await take(buffer, 2)  # a round from memory, then Kafka stops answering
    for sequence in range(3, 8):
        add(buffer, "A", sequence)
    assert buffer.close(in_flight) == 7

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.open().records == 7
    assert [decoded(s.record)[1] for s in reopened.read(10)] == list(range(1, 8))
