"""Shards: which replica subscribes which contracts, pure arithmetic (docs/scaling.md).

A contract belongs to shard `crc32(contract id) mod shards`, the same in every process and every version.
Replicas own shards; the group leader decides who owns what with `assign_shards`, which keeps every member's
shards up to its fair share (so a member joining or leaving moves as few shards as possible), and names a
handover token for every shard that moves from one live member to another: the taker says when it is
subscribed (a handover between members that confirm), the giver then stops, writes a release marker with that
token once it has delivered what it held, and the taker publishes only after reading it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field


def shard_of(contract_id: str, shards: int) -> int:
    """The shard of a contract: stable across processes, restarts and versions."""
    return zlib.crc32(contract_id.encode("utf-8")) % shards


@dataclass(frozen=True)
class MemberPlan:
    """One member's part of an assignment: its shards, the handovers it takes part in (shard → token), and the
    assignment's epoch (one more than any claim's, so that a later claim always says which plan it holds).

    `confirmed`: released shards whose taker says when it is subscribed (a `SubscribedMarker`): the giver serves
    them until then, so that no change of the exchange falls between its last frame and the taker's first. The
    giver is assigned their control partitions too, to read that marker.
    `superseded`: shards of this member's claim that another member has served since (it was expelled, a pause
    longer than the session timeout): what it still holds of them is stale and must not be published; those
    given back to it in this plan come by handover from that member.
    """

    shards: frozenset[int]
    acquire: Mapping[int, str] = field(default_factory=dict)  # wait for the giver's marker with this token
    release: Mapping[int, str] = field(default_factory=dict)  # deliver, then write the marker with this token
    epoch: int = 0
    confirmed: frozenset[int] = frozenset()
    superseded: frozenset[int] = frozenset()

    @property
    def partitions(self) -> list[int]:
        """The control-topic partitions this member reads: its shards' and those of confirmed releases."""
        return sorted(self.shards | self.confirmed)

    def encode(self) -> bytes:
        """The handovers as the assignment's user data (the shards travel as the assigned partitions)."""
        document = {
            "acquire": self.acquire,
            "release": self.release,
            "epoch": self.epoch,
            "confirmed": sorted(self.confirmed),
            "superseded": sorted(self.superseded),
        }
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def decode(cls, partitions: Collection[int], user_data: bytes) -> MemberPlan:
        """The plan of a member assigned `partitions` with `user_data`; data that does not parse means no
        handover."""
        try:
            document = json.loads(user_data) if user_data else {}
            acquire = {int(shard): str(token) for shard, token in document.get("acquire", {}).items()}
            release = {int(shard): str(token) for shard, token in document.get("release", {}).items()}
            epoch = int(document.get("epoch", 0))
            confirmed = frozenset(int(shard) for shard in document.get("confirmed", ()) if int(shard) in release)
            superseded = frozenset(int(shard) for shard in document.get("superseded", ()))
        except (ValueError, TypeError, AttributeError):
            acquire, release, epoch, confirmed, superseded = {}, {}, 0, frozenset(), frozenset()
        return cls(frozenset(partitions) - confirmed, acquire, release, epoch, confirmed, superseded)


@dataclass(frozen=True)
class MemberClaim:
    """What a member says when it joins: the shards it serves now, the epoch of the plan that gave them,
    whether it is leaving (a SIGTERM), and whether it confirms its subscriptions when it takes a shard over
    (members of earlier versions do not: a handover between two members that do is confirmed)."""

    owned: frozenset[int] = frozenset()
    leaving: bool = False
    epoch: int = 0
    confirms: bool = False

    def encode(self) -> bytes:
        """The claim as the join's user data."""
        document = {"owned": sorted(self.owned), "leaving": self.leaving, "epoch": self.epoch}
        return json.dumps({**document, "confirms": self.confirms}).encode()

    @classmethod
    def decode(cls, user_data: bytes) -> MemberClaim:
        """A member's claim; data that does not parse claims nothing."""
        try:
            document = json.loads(user_data) if user_data else {}
            owned = frozenset(int(shard) for shard in document.get("owned", []))
            confirms = document.get("confirms") is True
            return cls(owned, bool(document.get("leaving")), int(document.get("epoch", 0)), confirms)
        except (ValueError, TypeError, AttributeError):
            return cls()


def assign_shards(shards: int, claims: Mapping[str, MemberClaim], token: Callable[[], str]) -> dict[str, MemberPlan]:
    """Every shard to exactly one member not leaving (a leaving member gets none), as evenly as possible
    (shares differ by at most one), each keeping as many of its claimed shards as its share allows.

    A shard claimed by a live member and given to another is a handover: both get the same `token()`. A shard
    nobody alive claims (its owner died) is given without one, so its new owner starts at once. A shard two
    members claim belongs to the claim of the later epoch: the other member was expelled (a pause longer than
    the session timeout) while the shard went on without it, so it releases the shard rather than taking it back.
    """
    epoch = max((claim.epoch for claim in claims.values()), default=0) + 1
    staying = sorted(member for member, claim in claims.items() if not claim.leaving)
    if not staying:
        return {member: MemberPlan(frozenset(), epoch=epoch) for member in claims}
    owner: dict[int, str] = {}
    for member in sorted(claims, key=lambda member: (-claims[member].epoch, member)):
        for shard in sorted(claims[member].owned):
            if 0 <= shard < shards:
                owner.setdefault(shard, member)
    held = {member: sorted(s for s, m in owner.items() if m == member) for member in staying}
    base, extra = divmod(shards, len(staying))
    # The larger shares go to those who hold the most already: fewer shards move.
    by_holding = sorted(staying, key=lambda member: (-len(held[member]), member))
    share = {member: base + (1 if rank < extra else 0) for rank, member in enumerate(by_holding)}
    kept = {member: held[member][: share[member]] for member in staying}
    taken = {shard for shards_kept in kept.values() for shard in shards_kept}
    free = iter(shard for shard in range(shards) if shard not in taken)
    assigned = {member: set(kept[member]) for member in staying}
    for member in staying:
        while len(assigned[member]) < share[member]:
            assigned[member].add(next(free))
    acquire: dict[str, dict[int, str]] = {member: {} for member in claims}
    release: dict[str, dict[int, str]] = {member: {} for member in claims}
    confirmed: dict[str, set[int]] = {member: set() for member in claims}
    for member, mine in assigned.items():
        for shard in mine:
            giver = owner.get(shard)
            if giver is not None and giver != member:
                acquire[member][shard] = release[giver][shard] = token()
                if claims[giver].confirms and claims[member].confirms:
                    confirmed[giver].add(shard)
    # A claimant that lost a shard to a later claim releases it too, nobody waiting for it; what it still holds
    # of the shard is stale (the other member has served it since), so it drops that instead of delivering it.
    # Given back to it in this plan, the shard comes by handover from the other member: still, what it holds
    # of it from before is stale.
    superseded: dict[str, set[int]] = {member: set() for member in claims}
    for member, claim in claims.items():
        for shard in claim.owned:
            if shard in owner and owner[shard] != member:
                superseded[member].add(shard)
                if shard not in release[member] and shard not in assigned.get(member, ()):
                    release[member][shard] = token()
    return {
        member: MemberPlan(
            frozenset(assigned.get(member, ())),
            acquire[member],
            release[member],
            epoch,
            frozenset(confirmed[member]),
            frozenset(superseded[member]),
        )
        for member in claims
    }
