"""The simulator's market from a capture file (`ime-bridge simulate --replay PATH`): real sessions as test
scenarios and benchmark loads.

The catalogue is the contracts the capture's subscription markers name (without markers: every id its frames
are keyed by), with the names the markers knew (a generated one otherwise), so the static lookups and
subscriptions by name work as they did. The frames go out byte for byte (text when they are UTF-8, binary
otherwise) at the captured pace times `replay_speed` (0: as fast as the connections drain), to the connections
subscribed to their contract; any other frame (no readable id, or a contract nobody subscribed: what a hostile
server sends) goes to every connection of the endpoint it came on, as it did live.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bridge.capture import read_capture
from bridge.devtools.market import Contract, build_catalogue
from bridge.protocol import Endpoint
from bridge.raw import CapturedFrame


@dataclass(frozen=True, slots=True)
class ReplayedFrame:
    """One frame to play: when (seconds after the first), to whom, and its bytes."""

    at: float
    contract_id: str | None  # None: to every connection of `endpoint`
    endpoint: Endpoint
    payload: bytes
    text: bool


@dataclass(frozen=True)
class CapturedMarket:
    """A capture file, read for playing: its contracts and its frames in order."""

    contracts: list[Contract]
    frames: list[ReplayedFrame]

    @classmethod
    def load(cls, path: Path) -> CapturedMarket:
        """Read the capture series at `path`; ValueError when it holds no frame."""
        items = [item for item in read_capture(path) if isinstance(item, CapturedFrame)]
        frames = [item for item in items if item.marker is None]
        if not frames:
            raise ValueError(f"{path}: no captured frame to replay")
        names: dict[str, str] = {}
        subscribed: dict[str, None] = {}  # ids, in order of appearance
        for item in items:
            if item.marker is not None:
                names |= item.marker.names
                identifiers = item.marker.connection.subscription.contracts
                by_name = {name: contract_id for contract_id, name in item.marker.names.items()}
                if item.endpoint is Endpoint.ID:
                    subscribed |= dict.fromkeys(identifiers)
                else:
                    subscribed |= dict.fromkeys(by_name[name] for name in identifiers if name in by_name)
        if not subscribed:  # no marker (a capture made by hand): every key is a contract
            subscribed = {item.key.decode(errors="replace"): None for item in frames if item.key is not None}
        generated = build_catalogue(max(1, len(subscribed)))
        contracts = [
            dataclasses.replace(template, id=contract_id, name=names.get(contract_id, template.name))
            for template, contract_id in zip(generated, subscribed, strict=False)
        ]
        start = frames[0].receive_time
        return cls(contracts, [_replayed(item, start, subscribed) for item in frames])


def _replayed(item: CapturedFrame, start: int, subscribed: dict[str, None]) -> ReplayedFrame:
    """A frame keyed by a contract of the catalogue goes to its subscribers; any other to its endpoint's connections."""
    try:
        item.value.decode("utf-8")
        text = True
    except UnicodeDecodeError:
        text = False
    contract_id = item.key.decode(errors="replace") if item.key is not None else None
    if contract_id not in subscribed:
        contract_id = None
    return ReplayedFrame(max(0.0, (item.receive_time - start) / 1e6), contract_id, item.endpoint, item.value, text)
