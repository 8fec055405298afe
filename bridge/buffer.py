"""The buffer between the WebSocket readers and Kafka. Adding never blocks and never waits.

While Kafka keeps up it is a FIFO in memory. When it does not, `buffer.overflow` decides, per contract
and in order:

- `conflate`: past `capacity_records`, a contract's newest snapshot replaces its newest pending one
  (snapshots are complete, so the latest state is never lost) and carries the count of snapshots it
  replaced in `skipped`. Memory holds at most capacity + one record per contract.
- `spool`: when Kafka stops keeping up, that is when `spool_after_records` wait in memory or a record has
  waited unacknowledged for `spool_after_seconds`, the round in flight and everything in memory move to the
  on-disk spool, in order, and so does everything after them until the spool's backlog has been taken; a
  contract's new snapshots queue behind its spooled ones. What a crash can lose is then bounded by time:
  about `spool_after_seconds` of feed. As soon as a round takes the last unread spooled record, new records
  go to memory again; if that round fails, what went to memory meanwhile is newer than the rewound spooled
  records and moves to the spool's end, so order holds. A full spool (or a failing disk) is an alerted state
  in which the newest snapshot of each contract is held in memory, conflated, and written to the spool
  before anything newer as soon as it has room.

Raw frames (kafka.raw_topic) wait apart, a block per burst of one connection's frames (`RawFrames`), bounded in bytes,
never conflated; a round takes them beside its records. In spool mode each is a record of its own, spooled
like the others.

A publish round is taken with `take()` and settled with `settle()`: delivered records are done (and
committed in the spool); the others go back to the head of the queue, in order, to be sent again.
`maintain()`, called on a timer, spills records that waited too long while no new ones arrive, and fsyncs.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from bridge.config import BufferSettings
from bridge.encode import encode_update
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import ContractUpdate
from bridge.records import KIND_UPDATE, Headers, OutgoingRecord, RawFrames, RecordKind, frame_count, raw_frame
from bridge.spool import Spool, SpooledRecord, SpoolError, SpoolFull

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    """A pending record; updates stay unencoded until taken, so conflation can still replace them."""

    record: OutgoingRecord
    update: ContractUpdate | None = None

    def encode(self) -> None:
        """Encode the update into the record's value: the one place an update becomes bytes."""
        if self.update is not None:
            self.record.value = encode_update(self.update)


@dataclass(slots=True)
class _MemoryBudget:
    """Bytes of one kind of never-conflated record (dead letters, raw frames) waiting in memory, under `limit`:
    past it new ones are dropped, each counted by `count_dropped`, and logged once per episode."""

    limit: int
    name: str  # of the log events: <name>_dropped, <name>_admitted_again
    count_dropped: Callable[[OutgoingRecord], None]
    used: int = 0
    dropping: bool = False

    def admit(self, record: OutgoingRecord) -> bool:
        """Take `record`'s bytes; False, counted and logged, when that would pass the limit."""
        size = len(record.value)
        if self.used + size > self.limit:
            self.count_dropped(record)
            self.refuse(size)
            return False
        self.used += size
        return True

    def refuse(self, size: int) -> None:
        """`size` bytes did not fit: log the first refusal of an episode (counting is the caller's)."""
        if not self.dropping:
            self.dropping = True
            log_event(logger, logging.ERROR, f"{self.name}_dropped", waiting_bytes=self.used, limit_bytes=self.limit)

    def release(self, size: int) -> None:
        """`size` bytes left memory; below half the limit, new records are admitted again."""
        self.used -= size
        if self.dropping and self.used <= self.limit // 2:
            self.dropping = False
            log_event(logger, logging.INFO, f"{self.name}_admitted_again", waiting_bytes=self.used)


@dataclass
class Round:
    """One publish round: the records, and where each came from."""

    records: list[OutgoingRecord] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    spooled: list[SpooledRecord] = field(default_factory=list)
    raw: list[RawFrames] = field(default_factory=list)  # published after the records, one outcome per frame
    # The entries' copies in the spool, once they waited too long in flight (all of them, or none).
    persisted: list[SpooledRecord] = field(default_factory=list)


class DeliveryBuffer:
    """See the module docstring."""

    def __init__(self, settings: BufferSettings, *, metrics: Metrics, spool: Spool | None = None) -> None:
        """`spool`, opened, is given exactly when `settings.overflow` is spool: it is what spool mode writes to."""
        self.capacity = capacity = settings.capacity_records
        # buffer.overflow: spool when the spool is given, else conflate. A bool, read for every record (see
        # records.KIND_UPDATE for what an enum would cost).
        self.spool_mode = spool is not None
        self.metrics = metrics
        self.spool = spool
        self.spool_after = settings.spool_after_records
        self.spool_after_seconds = settings.spool_after_seconds
        self.fsync_interval = settings.spool_fsync_interval_seconds
        # Dead letters and raw frames are never conflated: past their budget of bytes waiting in memory, new
        # ones are dropped, counted.
        self._budgets = {
            RecordKind.DEAD_LETTER: _MemoryBudget(
                settings.dead_letter_memory_bytes,
                "dead_letters",
                lambda record: metrics.dead_letters_dropped.labels(record.dead_letter_reason or "unknown").inc(),
            ),
            RecordKind.RAW: _MemoryBudget(
                settings.raw_memory_bytes, "raw_frames", lambda record: metrics.raw_frames_dropped.inc()
            ),
        }
        self._raw_budget = self._budgets[RecordKind.RAW]
        self.spool_full = False
        self._spool_failing = ""  # why the last spool operation failed, until one succeeds
        self._synced_at = 0.0
        self._in_flight: Round | None = None
        self._in_flight_since = 0.0  # receive time of the oldest record of the round in flight, if unpersisted
        self._spooling_since: float | None = None  # monotonic start of the current spool episode
        self._memory: deque[_Entry] = deque()
        self._raw: deque[RawFrames] = deque()  # conflate mode's raw frames, oldest block first
        # Newest pending memory entry per contract key: kept only while conflation can happen (from capacity
        # down to half of it), so the common path does no per-record index work.
        self._latest: dict[bytes, _Entry] = {}
        self._indexed = False
        self._held: dict[bytes, _Entry] = {}  # conflated while the spool refuses writes
        self._held_finished = itertools.count()
        self._spooling = False
        self._available = asyncio.Event()
        if spool is not None and spool.records > 0:
            self._start_spooling("replay")
        metrics.buffer_capacity.set(capacity)
        metrics.buffer_records.set_function(lambda: len(self._memory) + len(self._held) + self._raw_frames())
        if spool is not None:
            metrics.spool_records.set_function(lambda: spool.records)
            metrics.spool_bytes.set_function(lambda: spool.bytes)

    def __len__(self) -> int:
        """Records waiting, in memory and in the spool."""
        spooled = self.spool.records if self.spool is not None else 0
        return len(self._memory) + len(self._held) + self._raw_frames() + spooled

    def _raw_frames(self) -> int:
        """Raw frames waiting in memory (counted per block, a block per burst)."""
        return frame_count(self._raw)

    def add_update(self, update: ContractUpdate, headers: Headers, received: float) -> None:
        """Queue a normalized snapshot (its key is its contract id)."""
        key = update.contract_id.encode()
        entry = _Entry(OutgoingRecord(KIND_UPDATE, key, b"", headers, received), update)
        if self._spooling or (self.spool_mode and self._should_spill(received)):
            entry.encode()
            self._to_spool(entry)
            return
        memory = self._memory
        if not self.spool_mode and len(memory) >= self.capacity:
            if not self._indexed:
                self._index(memory)
            if self._conflate(self._latest, key, update, headers, received):
                return
        memory.append(entry)
        if self._indexed:
            self._latest[key] = entry
        if len(memory) == 1:  # the event stays set while anything waits (take() clears it only when empty)
            self._available.set()

    def add_record(self, record: OutgoingRecord) -> None:
        """Queue a finished record (a dead letter or a raw frame): never conflated."""
        if self._spooling or (self.spool_mode and self._should_spill(record.received)):
            self._to_spool(_Entry(record))
            return
        if not self._admit(record):
            return
        self._memory.append(_Entry(record))
        self._available.set()

    def add_raw(self, frames: list[bytes], keys: list[bytes | None], receive_time: int, labels: Headers) -> None:
        """Queue a burst of frames as received (µs since the epoch) for the raw topic, `keys[i]` the key of
        `frames[i]`; `labels` are their connection's headers (bridge/raw.py). The buffer keeps both lists.

        Past the memory budget, the burst's first frames that fit are kept and the rest dropped (counted)."""
        if self.spool_mode:
            for frame, key in zip(frames, keys, strict=True):
                self.add_record(raw_frame(frame, receive_time, labels, key))
            return
        budget = self._raw_budget
        size = sum(map(len, frames))
        if budget.used + size > budget.limit:
            budget.refuse(size)
            sizes = list(itertools.accumulate(map(len, frames)))  # of the burst's first 1, 2, ... frames
            kept = bisect.bisect_right(sizes, budget.limit - budget.used)
            self.metrics.raw_frames_dropped.inc(len(frames) - kept)
            if not kept:
                return
            frames, keys, size = frames[:kept], keys[:kept], sizes[kept - 1]
        budget.used += size
        if not self._raw:
            self._available.set()
        self._raw.append(RawFrames(labels, receive_time, frames, keys, size))

    def _admit(self, record: OutgoingRecord) -> bool:
        """Count a finished record against its kind's memory budget; False (dropped, counted) when over it."""
        budget = self._budgets.get(record.kind)
        return budget is None or budget.admit(record)

    def _release(self, entry: _Entry) -> None:
        """A finished record left memory (taken, spooled or dropped at close): its bytes are free again."""
        if entry.update is None:
            budget = self._budgets.get(entry.record.kind)
            if budget is not None:
                budget.release(len(entry.record.value))

    def _index(self, memory: deque[_Entry]) -> None:
        """Build the newest-pending index once, when the buffer reaches capacity."""
        self._latest.clear()
        for entry in memory:
            if entry.update is not None and entry.record.key is not None:
                self._latest[entry.record.key] = entry
        self._indexed = True

    def _conflate(
        self, pending: dict[bytes, _Entry], key: bytes, update: ContractUpdate, headers: Headers, received: float
    ) -> bool:
        entry = pending.get(key)
        if entry is None or entry.update is None:
            return False
        update.skipped = entry.update.skipped + 1
        update.first_after_subscribe = update.first_after_subscribe or entry.update.first_after_subscribe
        entry.update = update
        entry.record.headers = headers
        entry.record.received = received
        self.metrics.conflated.inc()
        return True

    def _should_spill(self, now: float) -> bool:
        """Spool mode: has Kafka stopped keeping up? Then spill, and say so."""
        if len(self._memory) >= self.spool_after:
            self._spill("records")
            return True
        oldest = self._in_flight_since or (self._memory[0].record.received if self._memory else 0.0)
        if oldest and now - oldest > self.spool_after_seconds:
            self._spill("age")
            return True
        return False

    def _spill(self, reason: str) -> None:
        """Move the round in flight (a copy: it may still be acknowledged) and what waits in memory to the spool,
        oldest first; everything newer follows them there."""
        assert self.spool is not None
        waiting = list(self._memory)
        self._memory.clear()
        self._latest.clear()
        self._indexed = False
        self._start_spooling(reason)
        taken = self._in_flight
        if taken is not None and taken.entries and not taken.spooled and not taken.persisted:
            try:
                taken.persisted = self.spool.append_many([entry.record for entry in taken.entries])
            except (SpoolFull, SpoolError) as exc:  # the round stays in memory only, first in line if it fails
                self._spool_failed(exc)
            self._in_flight_since = 0.0
        for entry in waiting:
            entry.encode()
            if entry.update is None:
                self._release(entry)
            self._to_spool(entry)

    def _start_spooling(self, reason: str) -> None:
        self._spooling = True
        self._available.set()
        if self._spooling_since is None:
            self._spooling_since = time.monotonic()
            self.metrics.spooling.set(1)
            log_event(logger, logging.INFO, "spooling", reason=reason)

    def _stop_spooling_if_drained(self) -> None:
        """The spool's backlog has been taken and acknowledged: log how long it was in use."""
        assert self.spool is not None
        if self._spooling or self._spooling_since is None or self.spool.records:
            return
        seconds = time.monotonic() - self._spooling_since
        self._spooling_since = None
        self.metrics.spooling.set(0)
        log_event(logger, logging.INFO, "spool_drained", seconds=round(seconds, 3))

    def _to_spool(self, entry: _Entry) -> None:
        assert self.spool is not None
        self._available.set()
        if self._held and not self._release_held():
            self._hold(entry)
            return
        try:
            self.spool.append(entry.record)
        except (SpoolFull, SpoolError) as exc:
            self._spool_failed(exc)
            self._hold(entry)

    def _hold(self, entry: _Entry) -> None:
        """The spool refuses writes: keep the newest snapshot of each contract in memory."""
        key = entry.record.key
        update = entry.update
        if key is not None and update is not None:
            if self._conflate(self._held, key, update, entry.record.headers, entry.record.received):
                self._held[key].encode()
                return
            self._held[key] = entry
            return
        # A dead letter or raw frame while the spool is full: keep it too, under a key of its own, within its budget.
        if self._admit(entry.record):
            self._held[b"\x00held-%d" % next(self._held_finished)] = entry

    def _release_held(self) -> bool:
        """Move held records into the spool, oldest first; True when all of them went."""
        assert self.spool is not None
        for key in list(self._held):
            try:
                self.spool.append(self._held[key].record)
            except (SpoolFull, SpoolError) as exc:
                self._spool_failed(exc)
                return False
            self._release(self._held.pop(key))
        self._spool_ok()
        return True

    def _spool_failed(self, exc: SpoolFull | SpoolError) -> None:
        """The spool refused a write, a read, a commit or an fsync: the alerted spool-full state."""
        self._spool_failing = str(exc)
        self._set_spool_full(True, str(exc))

    def _spool_ok(self) -> None:
        """A spool operation succeeded: leave the spool-full state once nothing is held either."""
        self._spool_failing = ""
        if not self._held:
            self._set_spool_full(False, "")

    def _set_spool_full(self, full: bool, reason: str) -> None:
        if full != self.spool_full:
            self.spool_full = full
            self.metrics.spool_full.set(1 if full else 0)
            log_event(
                logger,
                logging.ERROR if full else logging.INFO,
                "spool_full" if full else "spool_accepting_again",
                reason=reason,
            )

    async def take(self, max_records: int, linger: float = 0.0) -> Round:
        """Wait for records; return a round of at most `max_records`, memory first, then the spool.

        With `linger` (seconds), a round smaller than `max_records` waits until its oldest record has waited that
        long, on one timer, so that more records share the round (Kafka's linger.ms, counted per round rather than
        per partition). The round is in flight until `settle()`.
        """
        while True:
            if linger and not self._spooling and len(self._memory) < max_records and self._raw_frames() < max_records:
                oldest = self._oldest_waiting()
                delay = oldest + linger - time.time() if oldest is not None else 0.0
                if delay > 0:
                    await asyncio.sleep(delay)
            taken = Round()
            indexed = self._indexed
            while self._memory and len(taken.records) < max_records:
                entry = self._memory.popleft()
                key = entry.record.key
                if indexed and key is not None and self._latest.get(key) is entry:
                    del self._latest[key]
                entry.encode()
                if entry.update is None:
                    self._release(entry)
                taken.entries.append(entry)
                taken.records.append(entry.record)
            if indexed and len(self._memory) < self.capacity // 2:
                self._latest.clear()
                self._indexed = False
            if self._raw:
                self._take_raw(taken, max_records)
            read_failed = False
            if self._spooling and len(taken.records) < max_records:
                spooled = self._read_spool(max_records - len(taken.records))
                read_failed = spooled is None
                taken.spooled = spooled or []
                taken.records.extend(spooled_record.record for spooled_record in taken.spooled)
                assert self.spool is not None
                if not read_failed and not self.spool.unread and not self._held:
                    self._spooling = False  # the backlog is taken: new records go to memory again
            if taken.records or taken.raw:
                self._in_flight = taken
                self._in_flight_since = taken.entries[0].record.received if taken.entries else 0.0
                return taken
            if read_failed:  # the disk fails: try again later, not in a hot loop
                await asyncio.sleep(self.spool_after_seconds)
                continue
            self._available.clear()
            await self._available.wait()

    def _oldest_waiting(self) -> float | None:
        """The receive time (seconds since the epoch) of the oldest record or raw frame in memory, if any."""
        oldest = self._memory[0].record.received if self._memory else None
        if self._raw:
            raw = self._raw[0].receive_time / 1e6
            oldest = raw if oldest is None else min(oldest, raw)
        return oldest

    def _take_raw(self, taken: Round, max_records: int) -> None:
        """Move up to `max_records` raw frames, oldest first, into the round."""
        pending, room, released = self._raw, max_records, 0
        while pending and room:
            block = pending.popleft() if len(pending[0].frames) <= room else pending[0].split(room)
            taken.raw.append(block)
            room -= len(block.frames)
            released += block.size
        self._raw_budget.release(released)

    def _read_spool(self, max_records: int) -> list[SpooledRecord] | None:
        """The next spooled records, after any held ones; None when the disk fails (the spool-full state)."""
        assert self.spool is not None
        if self._held:
            self._release_held()
        try:
            spooled = self.spool.read(max_records)
        except SpoolError as exc:
            self._spool_failed(exc)
            self.spool.rewind()
            return None
        if self._spool_failing:
            self._spool_ok()
        return spooled

    def settle(self, taken: Round, delivered: list[bool]) -> int:
        """Finish a round: delivered records are done, the others are queued again at the head, in order.

        `delivered` has a flag per record of the round, then one per raw frame. Returns how many were queued again.
        """
        self._in_flight = None
        self._in_flight_since = 0.0
        retry_raw = 0
        if taken.raw:  # the raw frames' flags follow the records'
            retry_raw = self._settle_raw(taken.raw, delivered[len(taken.records) :])
            delivered = delivered[: len(taken.records)]
        if taken.persisted:  # the round's memory records are in the spool too: settled there
            retry: list[_Entry] = []
            spooled, outcomes = taken.persisted, delivered
        else:
            memory_count = len(taken.entries)
            retry = [entry for entry, done in zip(taken.entries, delivered[:memory_count], strict=True) if not done]
            spooled, outcomes = taken.spooled, delivered[memory_count:]
        retry_spooled = 0
        if spooled:
            assert self.spool is not None
            try:
                self.spool.acknowledge([record for record, done in zip(spooled, outcomes, strict=True) if done])
            except SpoolError as exc:
                self._spool_failed(exc)
            retry_spooled = outcomes.count(False)
            if retry_spooled:
                self.spool.rewind()
                if not self._spooling:  # what went to memory meanwhile is newer than the rewound records
                    self._spill("retry")
        for entry in reversed(retry):
            self._memory.appendleft(entry)
            budget = self._budgets.get(entry.record.kind) if entry.update is None else None
            if budget is not None:  # back in memory: counted again, never dropped (it was admitted once)
                budget.used += len(entry.record.value)
            key = entry.record.key
            if self._indexed and entry.update is not None and key is not None and key not in self._latest:
                self._latest[key] = entry
        if retry or retry_spooled or retry_raw:
            self._available.set()
        if self.spool is not None:
            self._stop_spooling_if_drained()
        return len(retry) + retry_spooled + retry_raw

    def _settle_raw(self, blocks: list[RawFrames], delivered: list[bool]) -> int:
        """Queue a round's undelivered raw frames again at the head, in order; how many."""
        if all(delivered):
            return 0
        retry: list[RawFrames] = []
        start = 0
        for block in blocks:
            flags = delivered[start : start + len(block.frames)]
            start += len(block.frames)
            if all(flags):
                continue
            frames = [frame for frame, done in zip(block.frames, flags, strict=True) if not done]
            keys = [key for key, done in zip(block.keys, flags, strict=True) if not done]
            retry.append(RawFrames.of(block.labels, block.receive_time, frames, keys))
        for block in reversed(retry):
            self._raw.appendleft(block)
            self._raw_budget.used += block.size  # back in memory: counted again, never dropped (admitted once)
        return frame_count(retry)

    def pending(self, keys: Collection[bytes], in_flight: Round | None) -> int:
        """Records and raw frames with one of `keys` not yet acknowledged (a shard's contracts, in a handover),
        in memory, in flight and in the spool."""
        waiting = sum(1 for entry in self._memory if entry.record.key in keys)
        waiting += sum(1 for key in self._held if key in keys)
        raw = list(self._raw)
        if in_flight is not None:
            waiting += sum(1 for record in in_flight.records if record.key in keys)
            raw += in_flight.raw
        waiting += sum(1 for block in raw for key in block.keys if key in keys)
        return waiting + (self.spool.pending(keys) if self.spool is not None else 0)

    def close(self, in_flight: Round | None) -> int:
        """At shutdown: returns how many records are undelivered. In spool mode they stay in the spool.

        Records of an unfinished round, and memory while spooling (a failed round's), are older than the
        spooled ones and go first; memory while not spooling is newer than a round in flight from the spool,
        and goes last. A record of the unfinished round may have reached Kafka, so the next start may send
        it twice.
        """
        older = [] if in_flight is None or in_flight.persisted else list(in_flight.entries)
        newer: list[_Entry] = []
        (older if self._spooling else newer).extend(self._memory)
        for entry in (*older, *newer):
            entry.encode()
        held = [entry.record for entry in self._held.values()]
        undelivered = len(older) + len(newer) + len(held) + (self.spool.records if self.spool is not None else 0)
        # Raw frames wait in memory in conflate mode only (spool mode spools them as records): lost here.
        undelivered += self._raw_frames() + (frame_count(in_flight.raw) if in_flight is not None else 0)
        if self.spool is not None:
            for record in [entry.record for entry in newer] + held:  # newest of all: after the spool, if it has room
                try:
                    self.spool.append(record)
                except (SpoolFull, SpoolError):
                    log_event(logger, logging.ERROR, "spool_full_at_shutdown", lost=1)
            try:
                self.spool.close([entry.record for entry in older])
            except SpoolError as exc:
                log_event(logger, logging.ERROR, "spool_close_failed", error=str(exc), lost=len(older))
        self._memory.clear()
        self._held.clear()
        self._raw.clear()
        for budget in self._budgets.values():
            budget.used = 0
        return undelivered

    def maintain(self, now: float) -> None:
        """On a timer: spill records that waited `spool_after_seconds` though nothing new arrived, and fsync the
        spool every `fsync_interval` (a failure is the spool-full state, retried at the next call)."""
        if self.spool is None:
            return
        if not self._spooling:
            self._should_spill(now)
        if now - self._synced_at < self.fsync_interval:
            return
        self._synced_at = now
        try:
            self.spool.sync()
        except SpoolError as exc:
            self._spool_failed(exc)
            return
        if self._spool_failing:
            self._spool_ok()
