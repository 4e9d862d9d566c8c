"""How the journal writer commits to the embedded SQLite store.

Two things keep a lone request's journal cost low without giving up what issue 3 asks for:

* a batch nobody waits for (outcomes) commits at ``synchronous=NORMAL``: its WAL frames reach the OS (so
  it survives kill -9) without an fsync of its own; the connection is back at FULL afterwards, so the
  next awaited record is flushed to disk, and with it everything before it;
* when the gateway has nothing else to serve (``quiet``), a batch is committed on the event loop's own
  thread instead of a round trip through aiosqlite's thread, but never waits there for another
  process's write lock: that case goes to the thread, and the loop keeps running.

The statements SQLite executes are watched with the connection's trace callback, from whichever thread
runs them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any, AsyncIterator

import pytest

from proxy.journal.writer import JournalWriter, base_record, verify
from proxy.store.sqlite import SQLiteStore


class Trace:
    """Statements run on the store's connection, with the thread that ran each."""

    def __init__(self, store: SQLiteStore) -> None:
        self.seen: list[tuple[int, str]] = []
        store._conn()._conn.set_trace_callback(lambda sql: self.seen.append((threading.get_ident(), sql)))

    def clear(self) -> None:
        self.seen.clear()

    def sql(self) -> list[str]:
        return [s for _, s in self.seen]

    def threads_of(self, prefix: str) -> set[int]:
        return {t for t, s in self.seen if s.startswith(prefix)}

    def pragmas(self, name: str) -> list[str]:
        return [s for s in self.sql() if s.startswith(f"PRAGMA {name}")]


async def open_sqlite(path: str, synchronous: str = "full") -> SQLiteStore:
    s = SQLiteStore(path, synchronous=synchronous)
    await s.open()
    return s


@pytest.fixture
async def store(tmp_path: Any) -> AsyncIterator[SQLiteStore]:
    s = await open_sqlite(str(tmp_path / "j.db"))
    yield s
    await s.close()


async def started(store: SQLiteStore, **kw: Any) -> JournalWriter:
    w = JournalWriter(store, **kw)
    w.start()
    return w


async def current_synchronous(store: SQLiteStore) -> int:
    return int((await store._fetchall("PRAGMA synchronous"))[0][0])


async def test_an_outcome_only_batch_commits_without_its_own_fsync_and_full_comes_back(store):
    w = await started(store)
    trace = Trace(store)
    w.submit(base_record("outcome", request_id="r1"))
    await w.flush(5)
    assert trace.pragmas("synchronous") == ["PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL"]
    assert await current_synchronous(store) == 2  # FULL: what the next awaited commit runs at
    trace.clear()
    seq = await w.write(base_record("request", request_id="r2"))
    assert trace.pragmas("synchronous") == []  # an awaited record commits at FULL, with its fsync
    assert any(s.startswith("INSERT INTO journal") for s in trace.sql())
    await w.close()
    assert seq == 2 and (await verify(store)).ok
    assert [r.columns["request_id"] for r in await store.journal_query()] == ["r1", "r2"]


async def test_a_batch_holding_an_awaited_record_is_durable_even_with_outcomes_in_it(store):
    w = await started(store)
    trace = Trace(store)
    async with store._lock:  # hold the store so that what follows queues up behind the first batch
        w.submit(base_record("outcome", request_id="o1"))
        await asyncio.sleep(0.05)  # the writer took [o1] and waits for the store
        fut = asyncio.ensure_future(w.write(base_record("request", request_id="i3")))
        w.submit(base_record("outcome", request_id="o2"))  # queued before the write's task runs
        await asyncio.sleep(0.05)
    assert await fut == 3
    await w.flush(5)
    await w.close()
    # [o1] alone commits relaxed; [o2, i3] commits at FULL (an outcome riding along gets the fsync too)
    assert trace.pragmas("synchronous") == ["PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL"]
    assert len([s for s in trace.sql() if s == "COMMIT"]) == 2
    assert [r.columns["request_id"] for r in await store.journal_query()] == ["o1", "o2", "i3"]


async def test_a_store_running_at_normal_never_switches(tmp_path):
    s = await open_sqlite(str(tmp_path / "n.db"), synchronous="normal")
    try:
        w = await started(s)
        trace = Trace(s)
        w.submit(base_record("outcome", request_id="o1"))
        await w.write(base_record("request", request_id="i2"))
        await w.close()
        assert trace.pragmas("synchronous") == []
        assert await current_synchronous(s) == 1
    finally:
        await s.close()


async def test_a_quiet_gateway_commits_on_the_loop_thread_a_busy_one_on_the_store_thread(store):
    quiet = True
    w = await started(store, quiet=lambda: quiet)
    trace = Trace(store)
    loop_thread = threading.get_ident()
    await w.write(base_record("request", request_id="alone"))
    assert trace.threads_of("INSERT INTO journal") == {loop_thread}
    trace.clear()
    w.submit(base_record("outcome", request_id="alone"))
    await w.flush(5)
    assert trace.threads_of("INSERT INTO journal") == {loop_thread}
    assert await current_synchronous(store) == 2
    trace.clear()
    quiet = False
    await w.write(base_record("request", request_id="busy"))
    threads = trace.threads_of("INSERT INTO journal")
    assert len(threads) == 1 and loop_thread not in threads
    await w.close()
    assert (await verify(store)).ok
    # the attempt's busy timeout of 0 was put back
    assert int((await store._fetchall("PRAGMA busy_timeout"))[0][0]) == 5000


async def test_an_inline_commit_never_waits_on_the_loop_for_another_process_lock(store, tmp_path):
    w = await started(store, quiet=lambda: True)
    await w.write(base_record("request", request_id="first"))
    trace = Trace(store)
    # another process (here: another connection) holds the write lock for a while
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.ensure_future(ticker())
    loop = asyncio.get_running_loop()
    loop.call_later(0.4, lambda: other.execute("COMMIT"))
    try:
        seq = await asyncio.wait_for(w.write(base_record("request", request_id="waited")), 10)
    finally:
        t.cancel()
        other.close()
    assert seq == 2
    assert ticks >= 10, f"the event loop stalled while another process held the lock ({ticks} ticks)"
    inserts = trace.threads_of("INSERT INTO journal")
    assert inserts and threading.get_ident() not in inserts  # the wait happened on the store's thread
    await w.close()
    assert (await verify(store)).ok


async def test_wal_checkpoints_run_beside_commits_never_in_one_and_the_wal_stays_bounded(tmp_path, monkeypatch):
    """SQLite's own checkpoint (inside the commit that crosses 1,000 WAL pages) is off; the store's thread
    copies the WAL beside the commits, and the writer finishes between two batches, so the WAL starts
    over instead of growing: ~6.5 MB through the journal, a WAL file that stays below 1.5 MB."""
    import os

    import proxy.store.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "WAL_SOFT_FRAMES", 64)  # cross the mark often in a short test
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_POLL", 0.005)
    store = await open_sqlite(str(tmp_path / "j.db"))
    assert int((await store._fetchall("PRAGMA wal_autocheckpoint"))[0][0]) == 0
    trace = Trace(store)
    w = await started(store)
    wal = f"{store.path}-wal"
    high = 0
    for i in range(300):  # commits back to back: the background checkpoint alone never catches up
        await asyncio.gather(*(w.write(base_record("request", request_id=f"{i}-{j}", intent="x" * 2000))
                               for j in range(10)))
        high = max(high, os.path.getsize(wal))
    assert store._checkpointer is not None and store._checkpointer.runs >= 1, store._checkpointer.last_error
    assert high < 1536 * 1024, f"the WAL grew to {high} bytes"
    # on the writing connection, a checkpoint only ever ran between two commits
    inside = False
    ran = 0
    for sql in trace.sql():
        if sql == "BEGIN IMMEDIATE":
            inside = True
        elif sql in ("COMMIT", "ROLLBACK"):
            inside = False
        elif sql.startswith("PRAGMA wal_checkpoint"):
            assert not inside, "a checkpoint ran inside a commit"
            ran += 1
    assert ran >= 1
    await w.close()
    assert (await verify(store)).ok
    assert (await store.journal_head())[0] == 3000
    await store.close()


_WRITER_PROCESS = """
import asyncio, sys
import proxy.store.sqlite as s
from proxy.journal.writer import JournalWriter, base_record
s.WAL_SOFT_FRAMES, s._CHECKPOINT_POLL = 32, 0.005  # checkpoints and WAL restarts all the time

async def main(path, name):
    store = s.SQLiteStore(path)
    await store.open()
    w = JournalWriter(store)
    w.start()
    for i in range(150):
        await asyncio.gather(*(w.write(base_record("request", request_id=f"{name}-{i}-{j}", intent="x" * 500))
                               for j in range(10)))
    await w.close()
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_processes_writing_through_checkpoints_keep_the_database_whole(tmp_path):
    """Two processes append to one file (``--workers``) while their checkpoint threads and writers copy
    and restart the WAL under each other: the database stays intact and the chain whole. (A checkpoint
    that watched the WAL through a file descriptor of its own dropped the process's POSIX locks when it
    closed it, and this corrupted the file within seconds.)"""
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = str(tmp_path / "shared.db")
    first = await open_sqlite(path)  # creates the schema before two processes race for it
    await first.close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER_PROCESS, path, name], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for name in ("a", "b")]
    outs = [await asyncio.to_thread(p.communicate, timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[0].decode()[-2000:] for o in outs]
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    store = await open_sqlite(path)
    try:
        assert (await store.journal_head())[0] == 3000
        assert (await verify(store)).ok
    finally:
        await store.close()
