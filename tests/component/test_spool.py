"""spool: append, read, commit, reopen, damage, limits, on real files in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

from bridge.spool import Spool
from tests.unit.test_spool import opened, record, values


def crash_while_committing(directory: Path, crash_in: str) -> None:
    """In a child: spool 0..11 over several segments, read them all, acknowledge 0..7, and die (os._exit)
    inside `crash_in` ("unlink": after committed.json is replaced, before old segments go; "replace": after
    the temporary file is written, before it replaces committed.json)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            spool = opened(directory, segment_bytes=200)
            for n in range(12):
                spool.append(record(n, size=40))
            read = spool.read(12)
            spool.acknowledge(read[:2])  # an earlier commit that completes
            original = getattr(Path, crash_in)

            def die(self: Path, *args: object, **kwargs: object) -> object:
                if self.name.startswith("segment-") or self.name.endswith(".tmp"):
                    os._exit(17)
                return original(self, *args, **kwargs)

            setattr(Path, crash_in, die)
            spool.acknowledge(read[2:8])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17, f"the child did not reach Path.{crash_in}"


def test_a_crash_between_commit_and_unlink_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    crash_while_committing(tmp_path, "unlink")
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    recovery = spool.open()
    assert values(spool.read(20)) == [str(n).encode() for n in range(8, 12)]
    assert recovery.possible_duplicates == 0
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_a_crash_before_the_new_commit_replaces_the_old_replays_since_the_old_one(tmp_path: Path) -> None:
    crash_while_committing(tmp_path, "replace")
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    spool.open()
    # Nothing lost; the duplicates are what was acknowledged after the last commit that completed (2..7).
    assert values(spool.read(20)) == [str(n).encode() for n in range(2, 12)]
    assert not (tmp_path / "committed.json.tmp").exists()
