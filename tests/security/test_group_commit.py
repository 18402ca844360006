"""The group commit of read records: every request returns once its own records are stored,
a thread writes at most one batch, and a failed batch fails each of its requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cityhealth.fhir.access import SYSTEM
from cityhealth.security.auditing import Seen, _GroupCommit, _Read


def reads(n: int) -> list[_Read]:
    return [_Read(SYSTEM, "read", Seen(), None, f"Patient/{i}") for i in range(n)]


def test_concurrent_reads_share_batches_and_each_waits_for_its_own() -> None:
    batches: list[list[str]] = []
    writers: list[str] = []

    def write(batch: list[_Read]) -> None:
        time.sleep(0.01)
        batches.append([r.what for r in batch])
        writers.append(threading.current_thread().name)  # unique, unlike thread idents

    group = _GroupCommit(write)
    done: dict[str, bool] = {}
    together = threading.Barrier(24)

    def run(read: _Read) -> None:
        together.wait()  # all submit at once, as busy request threads do
        group.submit(read)
        done[read.what] = any(read.what in b for b in batches)  # stored before returning

    threads = [threading.Thread(target=run, args=(r,)) for r in reads(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(w for b in batches for w in b) == sorted(f"Patient/{i}" for i in range(24))
    assert all(done.values()) and len(done) == 24
    assert len(batches) < 24  # reads were written together
    assert len(writers) == len(set(writers))  # no thread wrote two batches


def test_a_failed_batch_fails_each_of_its_reads() -> None:
    def write(_batch: list[Any]) -> None:
        raise RuntimeError("database down")

    group = _GroupCommit(write)
    with pytest.raises(RuntimeError, match="database down"):
        group.submit(reads(1)[0])
