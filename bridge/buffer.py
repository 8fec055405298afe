"""The buffer between the WebSocket readers and Kafka. Adding never blocks and never waits.

While Kafka keeps up it is a FIFO in memory. When it does not, `buffer.overflow` decides, per contract
and in order:

- `conflate`: past `capacity_records`, a contract's newest snapshot replaces its newest pending one
  (snapshots are complete, so the latest state is never lost) and carries the count of snapshots it
  replaced in `skipped`. Memory holds at most capacity + one record per contract.
- `spool`: when `spool_after_records` wait in memory, they move to the on-disk spool, in order, and so does
  everything after them until the spool has drained; a contract's new snapshots queue behind its spooled
  ones. Memory then holds only a failed round waiting to be sent again, so a crash loses at most one round.
  A full spool (or a failing disk) is an alerted state in which the newest snapshot of each contract is
  held in memory, conflated, and written to the spool before anything newer as soon as it has room.

A publish round is taken with `take()` and settled with `settle()`: delivered records are done (and
committed in the spool); the others go back to the head of the queue, in order, to be sent again.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

from bridge.encode import encode_update
from bridge.logs import log_event
from bridge.metrics import Metrics
from bridge.normalize import ContractUpdate
from bridge.sink import Headers, OutgoingRecord
from bridge.spool import Spool, SpooledRecord, SpoolError, SpoolFull

logger = logging.getLogger(__name__)


class Overflow(enum.StrEnum):
    """What the buffer does when Kafka is slower than the feed."""

    CONFLATE = "conflate"
    SPOOL = "spool"


@dataclass(slots=True)
class _Entry:
    """A pending record; updates stay unencoded until taken, so conflation can still replace them."""

    record: OutgoingRecord
    update: ContractUpdate | None = None


@dataclass
class Round:
    """One publish round: the records, and where each came from."""

    records: list[OutgoingRecord] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    spooled: list[SpooledRecord] = field(default_factory=list)


class DeliveryBuffer:
    """See the module docstring."""

    def __init__(
        self,
        *,
        capacity: int,
        overflow: Overflow,
        metrics: Metrics,
        spool: Spool | None = None,
        spool_after: int = 1000,
        topics: tuple[str, str] | None = None,
    ) -> None:
        if overflow is Overflow.SPOOL and spool is None:
            raise ValueError("spool overflow needs a spool")
        self.capacity = capacity
        self.overflow = overflow
        self.metrics = metrics
        self.spool = spool
        self.spool_after = spool_after
        # (updates, dead letters): a spool written under another configuration replays into today's topics.
        self.topics = topics
        self.spool_full = False
        self._memory: deque[_Entry] = deque()
        # Newest pending memory entry per contract key: kept only while conflation can happen (from capacity
        # down to half of it), so the common path does no per-record index work.
        self._latest: dict[bytes, _Entry] = {}
        self._indexed = False
        self._held: dict[bytes, _Entry] = {}  # conflated while the spool refuses writes
        self._held_dead_letters = itertools.count()
        self._spooling = spool is not None and spool.records > 0
        self._available = asyncio.Event()
        if self._spooling:
            self._available.set()
        metrics.buffer_capacity.set(capacity)
        metrics.buffer_records.set_function(lambda: len(self._memory) + len(self._held))
        if spool is not None:
            metrics.spool_records.set_function(lambda: spool.records)
            metrics.spool_bytes.set_function(lambda: spool.bytes)

    def __len__(self) -> int:
        """Records waiting, in memory and in the spool."""
        return len(self._memory) + len(self._held) + (self.spool.records if self.spool is not None else 0)

    def add_update(self, update: ContractUpdate, topic: str, headers: Headers, received: float) -> None:
        """Queue a normalized snapshot (its key is its contract id)."""
        key = update.contract_id.encode()
        if self._spooling or (self.overflow is Overflow.SPOOL and self._should_spill()):
            record = OutgoingRecord(topic, key, encode_update(update), headers, received)
            self._to_spool(_Entry(record, update))
            return
        memory = self._memory
        if self.overflow is Overflow.CONFLATE and len(memory) >= self.capacity:
            if not self._indexed:
                self._index(memory)
            if self._conflate(self._latest, key, update, headers, received):
                return
        entry = _Entry(OutgoingRecord(topic, key, b"", headers, received), update)
        memory.append(entry)
        if self._indexed:
            self._latest[key] = entry
        if len(memory) == 1:  # the event stays set while anything waits (take() clears it only when empty)
            self._available.set()

    def add_record(self, record: OutgoingRecord) -> None:
        """Queue a finished record (a dead letter): never conflated."""
        if self._spooling or (self.overflow is Overflow.SPOOL and self._should_spill()):
            self._to_spool(_Entry(record))
            return
        self._memory.append(_Entry(record))
        self._available.set()

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

    def _should_spill(self) -> bool:
        """Kafka is not keeping up (spool mode): move what waits in memory to the spool, oldest first."""
        if len(self._memory) < self.spool_after:
            return False
        waiting = list(self._memory)
        self._memory.clear()
        self._latest.clear()
        self._spooling = True
        for entry in waiting:
            if entry.update is not None:
                entry.record.value = encode_update(entry.update)
            self._to_spool(entry)
        return True

    def _to_spool(self, entry: _Entry) -> None:
        assert self.spool is not None
        self._spooling = True
        self._available.set()
        if self._held and not self._release_held():
            self._hold(entry)
            return
        try:
            self.spool.append(entry.record)
        except (SpoolFull, SpoolError) as exc:
            self._set_spool_full(True, str(exc))
            self._hold(entry)

    def _hold(self, entry: _Entry) -> None:
        """The spool refuses writes: keep the newest snapshot of each contract in memory."""
        key = entry.record.key
        update = entry.update
        if key is not None and update is not None:
            if self._conflate(self._held, key, update, entry.record.headers, entry.record.received):
                self._held[key].record.value = encode_update(update)
                return
            self._held[key] = entry
            return
        # A dead letter while the spool is full: keep it too, under a key of its own.
        self._held[b"\x00dead-letter-%d" % next(self._held_dead_letters)] = entry

    def _release_held(self) -> bool:
        """Move held records into the spool, oldest first; True when all of them went."""
        assert self.spool is not None
        for key in list(self._held):
            try:
                self.spool.append(self._held[key].record)
            except (SpoolFull, SpoolError):
                return False
            del self._held[key]
        self._set_spool_full(False, "")
        return True

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

    async def take(self, max_records: int) -> Round:
        """Wait for records; return a round of at most `max_records`, memory first, then the spool."""
        while True:
            taken = Round()
            indexed = self._indexed
            while self._memory and len(taken.records) < max_records:
                entry = self._memory.popleft()
                key = entry.record.key
                if indexed and key is not None and self._latest.get(key) is entry:
                    del self._latest[key]
                if entry.update is not None:
                    entry.record.value = encode_update(entry.update)
                taken.entries.append(entry)
                taken.records.append(entry.record)
            if indexed and len(self._memory) < self.capacity // 2:
                self._latest.clear()
                self._indexed = False
            if self._spooling and len(taken.records) < max_records:
                assert self.spool is not None
                if self._held:
                    self._release_held()
                spooled = self.spool.read(max_records - len(taken.records))
                taken.spooled = spooled
                for spooled_record in spooled:
                    record = spooled_record.record
                    if self.topics is not None:
                        record.topic = self.topics[record.dead_letter_reason is not None]
                    taken.records.append(record)
                if not spooled and not self.spool.records and not self._held:
                    self._spooling = False
            if taken.records:
                return taken
            self._available.clear()
            await self._available.wait()

    def settle(self, taken: Round, delivered: list[bool]) -> int:
        """Finish a round: delivered records are done, the others are queued again at the head, in order.

        Returns how many were queued again.
        """
        memory_count = len(taken.entries)
        retry = [entry for entry, done in zip(taken.entries, delivered[:memory_count], strict=True) if not done]
        for entry in reversed(retry):
            self._memory.appendleft(entry)
            key = entry.record.key
            if self._indexed and entry.update is not None and key is not None and key not in self._latest:
                self._latest[key] = entry
        if taken.spooled:
            assert self.spool is not None
            outcomes = delivered[memory_count:]
            self.spool.acknowledge([spooled for spooled, done in zip(taken.spooled, outcomes, strict=True) if done])
            if not all(outcomes):
                self.spool.rewind()
                retry_spooled = outcomes.count(False)
            else:
                retry_spooled = 0
        else:
            retry_spooled = 0
        if retry or retry_spooled:
            self._available.set()
        return len(retry) + retry_spooled

    def close(self, in_flight: Round | None) -> int:
        """At shutdown: returns how many records are undelivered. In spool mode they stay in the spool.

        Memory records (and those of an unfinished round) are older than the spooled ones and go first;
        a record of the unfinished round may have reached Kafka, so the next start may send it twice.
        """
        unsent = list(in_flight.entries) if in_flight is not None else []
        unsent.extend(self._memory)
        for entry in unsent:
            if entry.update is not None:
                entry.record.value = encode_update(entry.update)
        records = [entry.record for entry in unsent]
        if in_flight is not None and in_flight.spooled and self.spool is not None:
            self.spool.rewind()
        held = [entry.record for entry in self._held.values()]
        undelivered = len(records) + len(held) + (self.spool.records if self.spool is not None else 0)
        if self.spool is not None:
            for record in held:  # newest of all: after the spool, if it has room now
                try:
                    self.spool.append(record)
                except (SpoolFull, SpoolError):
                    log_event(logger, logging.ERROR, "spool_full_at_shutdown", lost=1)
            self.spool.close(records)
        self._memory.clear()
        self._held.clear()
        return undelivered

    def sync(self) -> None:
        """fsync the spool, if any (called on a timer)."""
        if self.spool is not None:
            self.spool.sync()
