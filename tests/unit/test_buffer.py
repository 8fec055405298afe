"""buffer: conflation, spooling behind older records, re-queueing, a full spool, in memory and tmp files."""

from __future__ import annotations

import asyncio
import io
import itertools
import shutil
import time
from pathlib import Path

from fastavro import schemaless_reader
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.buffer import DeliveryBuffer, Round
from bridge.config import BufferSettings
from bridge.encode import load_schema
from bridge.metrics import Metrics
from bridge.normalize import ContractInfo, ContractUpdate
from bridge.records import Headers, OutgoingRecord, RecordKind
from bridge.spool import Spool, SpooledRecord, SpoolError

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
    buffer.add_update(update(contract, sequence), [], 0.0)


async def take(buffer: DeliveryBuffer, limit: int = 1000) -> Round:
    return await asyncio.wait_for(buffer.take(limit), timeout=5)


def spooling(spool: Spool, **settings: float) -> BufferSettings:
    """Spool mode over `spool`, with `settings` beside the defaults."""
    return BufferSettings(overflow="spool", spool_dir=spool.directory, **settings)  # type: ignore[arg-type]


def gauge(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


async def test_below_capacity_everything_is_kept_in_order() -> None:
    buffer = DeliveryBuffer(BufferSettings(capacity_records=10), metrics=Metrics())
    for sequence in range(1, 6):
        add(buffer, "A", sequence)
    assert [decoded(r) for r in (await take(buffer)).records] == [("A", n, 0) for n in range(1, 6)]


async def test_conflation_keeps_the_latest_per_contract_and_counts_what_it_replaced() -> None:
    metrics = Metrics()
    buffer = DeliveryBuffer(BufferSettings(capacity_records=3), metrics=metrics)
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
    buffer = DeliveryBuffer(BufferSettings(capacity_records=50), metrics=metrics)
    for sequence in range(1, 2001):
        add(buffer, f"C{sequence % 20}", sequence)
        assert gauge(metrics, "ime_bridge_buffer_records") <= 50 + 20


async def test_a_failed_round_goes_back_to_the_head_in_order() -> None:
    buffer = DeliveryBuffer(BufferSettings(capacity_records=100), metrics=Metrics())
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
    buffer = DeliveryBuffer(spooling(spool, spool_after_records=3), metrics=metrics, spool=spool)
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
    buffer = DeliveryBuffer(spooling(spool, spool_after_records=2), metrics=Metrics(), spool=spool)
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
    buffer = DeliveryBuffer(spooling(spool, spool_after_records=1), metrics=metrics, spool=spool)
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
    buffer = DeliveryBuffer(spooling(spool, spool_after_records=3), metrics=Metrics(), spool=spool)
    add(buffer, "A", 1)
    add(buffer, "A", 2)
    in_flight = await take(buffer, 2)  # a round from memory, then Kafka stops answering
    for sequence in range(3, 8):
        add(buffer, "A", sequence)
    assert buffer.close(in_flight) == 7

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.open().records == 7
    assert [decoded(s.record)[1] for s in reopened.read(10)] == list(range(1, 8))


def spool_buffer(tmp_path: Path, metrics: Metrics | None = None, **kwargs: float) -> DeliveryBuffer:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    settings = {"spool_after_records": 3, **kwargs}
    return DeliveryBuffer(spooling(spool, **settings), metrics=metrics or Metrics(), spool=spool)


def add_at(buffer: DeliveryBuffer, contract: str, sequence: int, received: float) -> None:
    buffer.add_update(update(contract, sequence), [], received)


async def test_spool_mode_ends_when_a_round_takes_the_backlog_and_new_records_stay_in_memory(tmp_path: Path) -> None:
    metrics = Metrics()
    buffer = spool_buffer(tmp_path, metrics)
    for sequence in range(1, 6):
        add(buffer, "A", sequence)  # past spool_after: spooled
    backlog = await take(buffer)
    assert len(backlog.spooled) == 5
    add(buffer, "A", 6)  # arrives while the last of the backlog is in flight: memory again
    assert gauge(metrics, "ime_bridge_buffer_records") == 1
    buffer.settle(backlog, [True] * 5)
    assert gauge(metrics, "ime_bridge_spool_records") == 0
    assert gauge(metrics, "ime_bridge_spooling") == 0
    fresh = await take(buffer)
    assert [decoded(r)[1] for r in fresh.records] == [6]
    assert fresh.spooled == []


async def test_a_failed_last_backlog_round_puts_what_came_meanwhile_behind_it(tmp_path: Path) -> None:
    buffer = spool_buffer(tmp_path)
    for sequence in range(1, 6):
        add(buffer, "A", sequence)
    backlog = await take(buffer)
    add(buffer, "A", 6)
    add(buffer, "A", 7)
    buffer.settle(backlog, [True, True, False, False, False])
    got: list[int] = []
    while len(got) < 5:
        taken = await take(buffer)
        got += [decoded(r)[1] for r in taken.records]
        buffer.settle(taken, [True] * len(taken.records))
    assert got == [3, 4, 5, 6, 7]
    assert buffer.spool is not None
    assert buffer.spool.records == 0


async def test_a_record_unacknowledged_past_spool_after_seconds_spills_with_the_round_in_flight(
    tmp_path: Path,
) -> None:
    buffer = spool_buffer(tmp_path, spool_after_records=1000, spool_after_seconds=1.0)
    add_at(buffer, "A", 1, 100.0)
    add_at(buffer, "A", 2, 100.1)
    in_flight = await take(buffer)  # Kafka stops answering
    add_at(buffer, "A", 3, 100.5)
    assert buffer.spool is not None
    assert buffer.spool.records == 0
    add_at(buffer, "A", 4, 101.2)  # the round has waited 1.2 s: it and everything behind it go to disk
    assert buffer.spool.records == 4
    assert in_flight.persisted

    # A crash now loses nothing: the spool alone replays all four, in order.
    replica = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, replica)
    copy = Spool(replica, max_bytes=1 << 20)
    assert copy.open().records == 4
    assert [decoded(s.record)[1] for s in copy.read(10)] == [1, 2, 3, 4]

    # The round was acknowledged after all: it is not sent again.
    buffer.settle(in_flight, [True, True])
    rest = await take(buffer)
    assert [decoded(r)[1] for r in rest.records] == [3, 4]


async def test_a_persisted_round_that_fails_is_read_again_from_the_spool_once(tmp_path: Path) -> None:
    buffer = spool_buffer(tmp_path, spool_after_records=1000, spool_after_seconds=1.0)
    add_at(buffer, "A", 1, 100.0)
    add_at(buffer, "A", 2, 100.0)
    in_flight = await take(buffer)
    add_at(buffer, "A", 3, 102.0)
    assert buffer.settle(in_flight, [True, False]) == 1
    again = await take(buffer)
    assert [decoded(r)[1] for r in again.records] == [2, 3]
    buffer.settle(again, [True, True])
    assert buffer.spool is not None
    assert buffer.spool.records == 0
    assert len(buffer) == 0


async def test_maintain_spills_records_that_waited_too_long_though_nothing_new_arrives(tmp_path: Path) -> None:
    buffer = spool_buffer(tmp_path, spool_after_records=1000, spool_after_seconds=1.0)
    add_at(buffer, "A", 1, 100.0)
    in_flight = await take(buffer)
    add_at(buffer, "A", 2, 100.2)
    buffer.maintain(100.9)
    assert buffer.spool is not None
    assert buffer.spool.records == 0
    buffer.maintain(101.1)
    assert buffer.spool.records == 2
    assert in_flight.persisted


async def test_close_while_the_last_backlog_round_is_in_flight_keeps_memory_after_it(tmp_path: Path) -> None:
    buffer = spool_buffer(tmp_path)
    for sequence in range(1, 5):
        add(buffer, "A", sequence)
    in_flight = await take(buffer)
    add(buffer, "A", 5)  # memory: newer than the round in flight from the spool
    assert buffer.close(in_flight) == 5
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    reopened.open()
    assert [decoded(s.record)[1] for s in reopened.read(10)] == [1, 2, 3, 4, 5]


class FailingSpool(Spool):
    """A spool whose disk fails on demand (reads, commits, fsyncs), as EIO would."""

    failing = False

    def read(self, max_records: int) -> list[SpooledRecord]:
        if self.failing:
            raise SpoolError("cannot read the spool: [Errno 5] Input/output error")
        return super().read(max_records)

    def acknowledge(self, delivered: list[SpooledRecord]) -> None:
        super().acknowledge(delivered)
        if self.failing:
            raise SpoolError("cannot commit the spool position: [Errno 5] Input/output error")

    def sync(self) -> None:
        if self.failing:
            raise SpoolError("cannot sync the spool: [Errno 5] Input/output error")
        super().sync()


async def test_a_failing_read_commit_or_fsync_is_the_spool_full_state_until_the_disk_works(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = FailingSpool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(
        spooling(spool, spool_after_records=1, spool_after_seconds=0.05), metrics=metrics, spool=spool
    )
    for sequence in range(1, 4):
        add(buffer, "A", sequence)
    spool.failing = True
    buffer.maintain(1000.0)  # fsync fails
    assert buffer.spool_full
    assert gauge(metrics, "ime_bridge_spool_full") == 1
    spool.failing = False
    buffer.maintain(2000.0)
    assert not buffer.spool_full

    spool.failing = True
    reading = asyncio.create_task(buffer.take(10))  # the read fails: retried later, not a hot loop
    await asyncio.sleep(0.02)
    assert buffer.spool_full
    assert not reading.done()
    spool.failing = False
    taken = await asyncio.wait_for(reading, timeout=5)
    assert [decoded(r)[1] for r in taken.records] == [1, 2, 3]
    assert not buffer.spool_full

    spool.failing = True
    buffer.settle(taken, [True, True, True])  # the commit fails: delivered all the same, kept to retry
    assert buffer.spool_full
    assert spool.records == 0
    spool.failing = False
    buffer.maintain(3000.0)  # the fsync timer writes the pending commit
    assert not buffer.spool_full
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert reopened.open().records == 0


def dead_letter(size: int) -> OutgoingRecord:
    return OutgoingRecord(RecordKind.DEAD_LETTER, None, b"x" * size, [], 0.0, dead_letter_reason="invalid_json")


async def test_dead_letters_in_memory_are_bounded_in_bytes_and_the_drops_counted() -> None:
    metrics = Metrics()
    buffer = DeliveryBuffer(BufferSettings(dead_letter_memory_bytes=1 << 20), metrics=metrics)
    for _ in range(25):
        buffer.add_record(dead_letter(100_000))  # Kafka is away: they wait
    assert len(buffer) == 10
    dropped = {"reason": "invalid_json"}
    assert metrics.registry.get_sample_value("ime_bridge_dead_letters_dropped_total", dropped) == 15
    taken = await take(buffer, 10)
    buffer.add_record(dead_letter(100_000))  # taken ones no longer count
    buffer.settle(taken, [False] * 10)  # a failed round comes back whole, over the budget rather than lost
    assert len(buffer) == 11
    add(buffer, "A", 1)  # updates are bounded by conflation, not by this budget
    assert len(buffer) == 12


LABELS_A: Headers = [("endpoint", b"id"), ("connection", b"id-0/1")]
LABELS_B: Headers = [("endpoint", b"name"), ("connection", b"name-0/1")]


def add_raw(buffer: DeliveryBuffer, frame: bytes, key: bytes | None, receive_time: int, labels: Headers) -> None:
    """A burst of one frame."""
    buffer.add_raw([frame], [key], receive_time, labels)


def frames_of(taken: Round) -> list[tuple[bytes, bytes | None, int]]:
    """(frame, key, receive time) of the round's raw frames, in order."""
    return [
        (frame, key, block.receive_time)
        for block in taken.raw
        for frame, key in zip(block.frames, block.keys, strict=True)
    ]


async def test_raw_frames_are_never_conflated_and_bounded_in_bytes_apart_from_dead_letters() -> None:
    metrics = Metrics()
    settings = BufferSettings(capacity_records=5, raw_memory_bytes=1 << 20, dead_letter_memory_bytes=1 << 20)
    buffer = DeliveryBuffer(settings, metrics=metrics)
    for n in range(12):
        add_raw(buffer, b"x" * 100_000, b"1001", n, LABELS_A)  # Kafka is away: they wait, past the capacity
    assert len(buffer) == 10
    assert metrics.registry.get_sample_value("ime_bridge_raw_frames_dropped_total") == 2
    buffer.add_record(dead_letter(100_000))  # dead letters have their own budget
    assert len(buffer) == 11
    assert gauge(metrics, "ime_bridge_buffer_records") == 11
    taken = await take(buffer, 20)
    assert [record.kind for record in taken.records] == [RecordKind.DEAD_LETTER]
    assert [receive_time for _, _, receive_time in frames_of(taken)] == list(range(10))
    add_raw(buffer, b"x" * 100_000, b"1001", 12, LABELS_A)  # taken ones no longer count
    assert len(buffer) == 1


async def test_raw_frames_wait_in_blocks_per_burst_and_a_round_takes_at_most_its_size_of_them() -> None:
    buffer = DeliveryBuffer(BufferSettings(), metrics=Metrics())
    buffer.add_raw([b"a%d" % n for n in range(5)], [b"1001"] * 4 + [None], 3, LABELS_A)
    buffer.add_raw([b"b"], [None], 5, LABELS_B)
    buffer.add_raw([b"a5"], [b"1002"], 6, LABELS_A)
    add(buffer, "A", 1)
    first = await take(buffer, 3)
    assert [block.labels for block in first.raw] == [LABELS_A]
    assert frames_of(first) == [(b"a0", b"1001", 3), (b"a1", b"1001", 3), (b"a2", b"1001", 3)]
    assert [decoded(record)[:2] for record in first.records] == [("A", 1)]
    buffer.settle(first, [True] * 4)
    second = await take(buffer, 10)
    assert [block.labels for block in second.raw] == [LABELS_A, LABELS_B, LABELS_A]
    assert frames_of(second) == [(b"a3", b"1001", 3), (b"a4", None, 3), (b"b", None, 5), (b"a5", b"1002", 6)]
    assert [block.size for block in second.raw] == [4, 1, 2]


async def test_past_the_raw_budget_a_burst_keeps_its_first_frames_that_fit() -> None:
    metrics = Metrics()
    buffer = DeliveryBuffer(BufferSettings(raw_memory_bytes=1 << 20), metrics=metrics)
    part = 300 << 10  # 300 KiB
    buffer.add_raw([b"x" * part] * 4, [b"1001"] * 4, 1, LABELS_A)
    assert metrics.registry.get_sample_value("ime_bridge_raw_frames_dropped_total") == 1
    buffer.add_raw([b"y" * (200 << 10)], [b"1001"], 2, LABELS_A)
    assert metrics.registry.get_sample_value("ime_bridge_raw_frames_dropped_total") == 2, "900 KiB + 200 KiB > 1 MiB"
    buffer.add_raw([b"z" * (100 << 10)], [b"1001"], 3, LABELS_A)
    taken = await take(buffer)
    assert [(frame[:1], receive_time) for frame, _, receive_time in frames_of(taken)] == [
        (b"x", 1),
        (b"x", 1),
        (b"x", 1),
        (b"z", 3),
    ]


async def test_undelivered_raw_frames_go_back_to_the_head_in_order_and_count_again() -> None:
    metrics = Metrics()
    buffer = DeliveryBuffer(BufferSettings(raw_memory_bytes=1 << 20), metrics=metrics)
    buffer.add_raw([b"a%d" % n for n in range(4)], [b"1001"] * 4, 3, LABELS_A)
    add_raw(buffer, b"b0", None, 4, LABELS_B)
    add(buffer, "A", 1)
    taken = await take(buffer)
    add_raw(buffer, b"a4", b"1001", 5, LABELS_A)  # newer: behind the ones sent again
    assert buffer.settle(taken, [True, True, False, True, False, False]) == 3
    assert buffer._raw_budget.used == 2 + 2 + 2 + 2, "the frames back from the round, and a4"
    assert len(buffer) == 4
    again = await take(buffer)
    assert again.records == []
    assert frames_of(again) == [(b"a1", b"1001", 3), (b"a3", b"1001", 3), (b"b0", None, 4), (b"a4", b"1001", 5)]
    assert [block.labels for block in again.raw] == [LABELS_A, LABELS_B, LABELS_A]


# Steps of a raw-capture run: a burst of frames of keys 0, 1 or 2 arrives on connection A or B, or a round goes out
# in which each key's frames are delivered up to a cut (a partition's batch fails whole; past a full batch nothing
# is sent).
RAW_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("burst"), st.lists(st.integers(0, 2), min_size=1, max_size=4), st.booleans()),
        st.tuples(st.just("round"), st.integers(1, 8), st.lists(st.integers(0, 8), min_size=3, max_size=3)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(RAW_STEPS)
def test_raw_frames_reach_the_sink_once_each_and_in_order_per_key_whatever_fails(
    steps: list[tuple[object, ...]],
) -> None:
    async def run() -> None:
        buffer = DeliveryBuffer(BufferSettings(), metrics=Metrics())
        sent: dict[bytes, list[bytes]] = {b"0": [], b"1": [], b"2": []}
        delivered: dict[bytes, list[bytes]] = {key: [] for key in sent}
        count = 0

        def settle(taken: Round, cuts: list[int]) -> None:
            flags, seen = [], dict.fromkeys(sent, 0)
            for frame, key, _ in frames_of(taken):
                assert key is not None
                seen[key] += 1
                flags.append(seen[key] <= cuts[int(key)])
                if flags[-1]:
                    delivered[key].append(frame)
            buffer.settle(taken, [True] * len(taken.records) + flags)

        for step in steps:
            if step[0] == "burst":
                frames, keys = [], []
                for number in step[1]:
                    key = str(number).encode()
                    count += 1
                    sent[key].append(b"%d" % count)
                    frames.append(b"%d" % count)
                    keys.append(key)
                buffer.add_raw(frames, keys, count, LABELS_A if step[2] else LABELS_B)
            elif len(buffer):
                _, size, cuts = step
                settle(await take(buffer, int(size)), cuts)  # type: ignore[arg-type]
            for key, frames in delivered.items():
                assert frames == sent[key][: len(frames)], "per key, nothing skipped, doubled or reordered"
        while len(buffer):
            settle(await take(buffer), [count] * 3)
        assert delivered == sent

    asyncio.run(run())


async def test_only_raw_frames_waiting_linger_too_and_close_counts_them_undelivered() -> None:
    buffer = DeliveryBuffer(BufferSettings(), metrics=Metrics())
    add_raw(buffer, b"a0", b"1001", time.time_ns() // 1000, LABELS_A)
    started = time.monotonic()
    taken = await asyncio.wait_for(buffer.take(1000, linger=0.05), timeout=5)
    assert time.monotonic() - started >= 0.04
    add_raw(buffer, b"a1", b"1001", time.time_ns() // 1000, LABELS_A)
    assert buffer.pending({b"1001"}, taken) == 2
    assert buffer.pending({b"1002"}, taken) == 0
    assert buffer.close(taken) == 2


async def test_in_spool_mode_a_handover_counts_only_its_own_contracts_spooled_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(spooling(spool, spool_after_records=1), metrics=Metrics(), spool=spool)
    for contract, sequence in (("A", 1), ("B", 1), ("A", 2)):
        add(buffer, contract, sequence)
    assert spool.records == 3
    assert (buffer.pending({b"A"}, None), buffer.pending({b"B"}, None), buffer.pending({b"C"}, None)) == (2, 1, 0)
    taken = await take(buffer, 2)
    assert buffer.pending({b"A"}, taken) == 2 + 1, "in flight from the spool, and still in it until acknowledged"
    buffer.settle(taken, [True, True])
    assert (buffer.pending({b"A"}, None), buffer.pending({b"B"}, None)) == (1, 0)


async def test_in_spool_mode_raw_frames_are_spooled_as_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    buffer = DeliveryBuffer(spooling(spool, spool_after_records=2), metrics=Metrics(), spool=spool)
    for n in range(3):
        add_raw(buffer, b"a%d" % n, b"1001", n, LABELS_A)
    assert spool.records == 3, "records of their own: past spool_after_records, all of them went to the spool"
    taken = await take(buffer)
    assert taken.raw == []
    assert [(record.kind, record.value) for record in taken.records] == [(RecordKind.RAW, b"a%d" % n) for n in range(3)]
    assert dict(taken.records[2].headers) == {**dict(LABELS_A), "receive-time-us": b"2"}


async def test_a_lingering_round_waits_for_its_oldest_record_to_have_waited_and_takes_what_came_meanwhile() -> None:
    buffer = DeliveryBuffer(BufferSettings(), metrics=Metrics())
    buffer.add_update(update("A", 1), [], time.time())
    asyncio.get_running_loop().call_later(0.01, lambda: buffer.add_update(update("B", 1), [], time.time()))
    started = time.monotonic()
    taken = await asyncio.wait_for(buffer.take(1000, linger=0.1), timeout=5)
    assert time.monotonic() - started >= 0.08
    assert [decoded(record)[:2] for record in taken.records] == [("A", 1), ("B", 1)]


async def test_a_round_whose_oldest_record_waited_long_enough_or_that_is_full_does_not_linger() -> None:
    buffer = DeliveryBuffer(BufferSettings(), metrics=Metrics())
    buffer.add_update(update("A", 1), [], time.time() - 20)  # waited longer than the linger already
    assert len((await asyncio.wait_for(buffer.take(1000, linger=10), timeout=5)).records) == 1
    for contract in "ABC":
        buffer.add_update(update(contract, 2), [], time.time())
    assert len((await asyncio.wait_for(buffer.take(3, linger=10), timeout=5)).records) == 3  # a full round
