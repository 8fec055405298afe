"""The delivery checker: which simulated snapshots reached Kafka, lost, duplicated or out of order.

Every snapshot the simulator sent has an identity: its contract, its exchange timestamp and its market
data. A consumed record is matched back to the snapshot it came from, per contract, in topic order.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord

from bridge.devtools.simulator import SentFrame
from tests.support.harness import decode_value

Identity = tuple[Any, ...]


def _levels(book: dict[str, Any]) -> tuple[tuple[float, ...], ...]:
    return tuple(
        (int(level), float(v["buy_quantity"]), float(v["buy_price"]), float(v["sell_quantity"]), float(v["sell_price"]))
        for level, v in sorted(book.items(), key=lambda item: int(item[0]))
    )


def frame_identity(payload: str | bytes) -> tuple[str, Identity]:
    """(contract id, identity) of a snapshot frame the simulator sent (id endpoint, either dialect)."""
    frame = json.loads(payload)
    contract = str(frame.get("contractId", frame.get("ContractId")))
    moment = datetime.fromisoformat(frame["timestamp"])
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    data = frame["data"]
    return contract, (
        moment,
        _levels(data["BestLimit"]),
        float(data["Aggregate"]["last_price"]),
        int(data["Aggregate"]["trade_count"]),
        float(data["ContractInfo"]["open_interest"]),
    )


def record_identity(value: dict[str, Any]) -> Identity:
    """The identity of a decoded ContractUpdate, comparable with frame_identity."""
    levels = tuple(
        (v["level"], float(v["buy_quantity"]), v["buy_price"], float(v["sell_quantity"]), v["sell_price"])
        for v in value["best_limit"]
    )
    return (
        value["exchange_time"],
        levels,
        value["aggregate"]["last_price"],
        value["aggregate"]["trade_count"],
        float(value["contract_info"]["open_interest"]),
    )


@dataclass
class DeliveryReport:
    """Per contract: snapshots sent, delivered, lost, duplicated, out of order; and conflation accounting."""

    sent: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    lost: dict[str, list[int]] = field(default_factory=dict)  # positions in the contract's sent list
    duplicated: dict[str, int] = field(default_factory=dict)
    out_of_order: dict[str, int] = field(default_factory=dict)
    unaccounted_gaps: dict[str, int] = field(default_factory=dict)  # gaps that `skipped` does not explain
    latest_missing: list[str] = field(default_factory=list)
    unknown: int = 0
    skipped: int = 0  # the sum of `skipped` over the records delivered (first occurrences)

    @property
    def total_lost(self) -> int:
        return sum(len(positions) for positions in self.lost.values())

    def summary(self) -> str:
        return (
            f"sent={sum(self.sent.values())} delivered={sum(self.delivered.values())} lost={self.total_lost} "
            f"duplicated={sum(self.duplicated.values())} out_of_order={sum(self.out_of_order.values())} "
            f"unaccounted_gaps={sum(self.unaccounted_gaps.values())} skipped={self.skipped} "
            f"latest_missing={self.latest_missing} "
            f"unknown={self.unknown}{self._where()}"
        )

    def _where(self) -> str:
        """Per contract with a problem: positions lost (the first few), duplicates, reorderings."""
        problems = [
            f"{contract}: sent={self.sent[contract]} lost={self.lost.get(contract, [])[:5]} "
            f"duplicated={self.duplicated.get(contract, 0)} out_of_order={self.out_of_order.get(contract, 0)}"
            for contract in sorted(self.sent)
            if self.lost.get(contract) or self.duplicated.get(contract) or self.out_of_order.get(contract)
        ]
        return f" where: {'; '.join(problems)}" if problems else ""


def check_delivery(sent: list[SentFrame], records: list[ConsumerRecord[Any, Any]]) -> DeliveryReport:
    """Match `records` (one topic, consumed from the beginning) against the snapshots in `sent`."""
    sent_by_contract: dict[str, list[Identity]] = defaultdict(list)
    for frame in sent:
        if frame.contract_id is not None:
            contract, identity = frame_identity(frame.payload)
            sent_by_contract[contract].append(identity)
    # The same snapshot can be sent twice (resent on a resubscription after a reconnect): an identity has every
    # position it was sent at, and a record takes the first one no earlier record took.
    positions: dict[str, dict[Identity, list[int]]] = {}
    for contract, identities in sent_by_contract.items():
        by_identity = positions[contract] = defaultdict(list)
        for index, identity in enumerate(identities):
            by_identity[identity].append(index)
    report = DeliveryReport(sent={contract: len(identities) for contract, identities in sent_by_contract.items()})
    delivered: dict[str, list[tuple[int, int]]] = defaultdict(list)  # (position, skipped) in topic order
    taken: set[tuple[str, int]] = set()
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = decode_value(record)
        contract = value["contract_id"]
        candidates = positions.get(contract, {}).get(record_identity(value))
        if not candidates:
            report.unknown += 1
            continue
        position = next((index for index in candidates if (contract, index) not in taken), candidates[-1])
        taken.add((contract, position))
        delivered[contract].append((position, value["skipped"]))
    for contract, identities in sent_by_contract.items():
        got = delivered.get(contract, [])
        seen: set[int] = set()
        first_occurrences: list[tuple[int, int]] = []
        for position, skipped in got:
            if position not in seen:
                first_occurrences.append((position, skipped))
            seen.add(position)
        report.delivered[contract] = len(got)
        report.duplicated[contract] = len(got) - len(first_occurrences)
        # A bounded replay of already delivered records counts as duplicates; order is judged on first sight.
        report.out_of_order[contract] = sum(1 for (a, _), (b, _) in itertools.pairwise(first_occurrences) if b < a)
        got = first_occurrences
        report.skipped += sum(skipped for _, skipped in got)
        report.lost[contract] = [index for index in range(len(identities)) if index not in seen]
        report.unaccounted_gaps[contract] = sum(
            1 for (a, _), (b, skipped) in itertools.pairwise(got) if b > a and b - a - 1 != skipped
        )
        if identities and (not got or max(position for position, _ in got) != len(identities) - 1):
            report.latest_missing.append(contract)
    return report
