"""The keeper's journal of exit records: whole lines only, also when a write fails."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from wfd import keeper as k


def record(attempt: int) -> k.ExitRecord:
    return k.ExitRecord(run_id="20261203T000000Z-00000001", step="s", attempt=attempt,
                        exit_code=0, why="exited")


def test_a_failed_append_is_cut_back_and_the_retry_writes_whole_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = k.Journal(tmp_path / "exits-1.jsonl")
    journal.append([record(1)])
    calls = {"n": 0}
    real = os.fdatasync

    def failing(fd: int) -> None:  # the data reached the file, its sync did not
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(k.os, "fdatasync", failing)
    with pytest.raises(OSError):
        journal.append([record(2)])
    assert set(journal.unacked) == {record(1).key}  # not told, not kept as written
    journal.append([record(2)])  # the retry
    assert k.read_journals(tmp_path) == {r.key: r for r in (record(1), record(2))}
    assert (tmp_path / "exits-1.jsonl").read_bytes().count(b"\n") == 2  # no torn line


def test_a_journal_whose_records_are_all_acknowledged_goes_at_close(tmp_path: Path) -> None:
    journal = k.Journal(tmp_path / "exits-2.jsonl")
    journal.append([record(1), record(2)])
    journal.ack([k.key_tuple(record(1).key)])
    journal.close()
    assert (tmp_path / "exits-2.jsonl").exists()  # one is still needed
    again = k.Journal(tmp_path / "exits-3.jsonl")
    again.append([record(3)])
    again.ack([k.key_tuple(record(3).key)])
    again.close()
    assert not (tmp_path / "exits-3.jsonl").exists()
