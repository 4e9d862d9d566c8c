"""The embedded store: one SQLite file (aiosqlite), WAL mode, durable commits.

``synchronous=FULL`` by default: a commit is on disk when it returns, so a journal record the gateway
waited for survives kill -9 and power loss. The journal writer batches records (group commit), so the
cost of the fsync is shared by every request in the batch. A batch nobody waits for (outcome records)
commits at ``NORMAL`` instead: no fsync of its own, yet it survives kill -9, and the next FULL commit's
fsync of the WAL file covers it. When the gateway is otherwise idle, an append runs on the event loop's
thread rather than round-tripping through aiosqlite's (but never waits there for another process's lock).

WAL checkpoints never run on a commit: SQLite's automatic checkpoint (every 1,000 pages, inside the
commit that crosses the mark, fsync of the database file included) made one request in a few hundred
wait tens of milliseconds. It is off (``wal_autocheckpoint=0``); a thread of the store's own
(:class:`_Checkpointer`, its own connection) copies the WAL into the database a few times a second,
alongside the commits, and once the WAL holds :data:`WAL_SOFT_FRAMES` frames the journal writer
finishes the job between two batches (:meth:`SQLiteStore.journal_maintenance`: the few frames committed
meanwhile), so that the next commit starts the WAL over from its beginning. The WAL stays bounded: past :data:`WAL_HARD_BYTES` that
last step waits (briefly) for other processes' transactions to get it done.

All writes go through one connection and one lock, and every multi-statement change runs inside
``BEGIN IMMEDIATE`` so that several gateway processes sharing the file (``--workers``) still extend a
single hash chain: the chain head is read inside the write transaction.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import aiosqlite
import orjson

from ..chain import GENESIS, INDEXED_FIELDS, StoredRecord, link
from .base import Store, StoreUnavailable
from .rows import REVIEW_COLS as _REVIEW_COLS
from .rows import STEP_COLS as _STEP_COLS
from .rows import TX_COLS as _TX_COLS
from .rows import (
    PreparedRow,
    advance,
    from_row,
    prepare_review,
    summary_bytes,
    summary_changed,
    summary_from_row,
)
from .rows import review_stats as _review_stats
from .rows import split as _split

_MIGRATIONS: list[str] = [
    # 1: journal
    """
    CREATE TABLE journal (
        seq INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        kind TEXT NOT NULL,
        request_id TEXT,
        agent TEXT,
        on_behalf_of TEXT,
        capability TEXT,
        decision TEXT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        record BLOB NOT NULL
    );
    CREATE INDEX journal_agent ON journal(agent, seq);
    CREATE INDEX journal_request ON journal(request_id);
    CREATE INDEX journal_ts ON journal(ts);
    CREATE TABLE journal_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        anchor_seq INTEGER NOT NULL,
        anchor_hash TEXT NOT NULL,
        head_seq INTEGER NOT NULL,
        head_hash TEXT NOT NULL
    );
    INSERT INTO journal_meta VALUES (1, 0, '%s', 0, '%s');
    """ % (GENESIS, GENESIS),
    # 2: review items, transactions and steps, governance, leases
    """
    CREATE TABLE review_items (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        expires_at REAL,
        agent TEXT NOT NULL,
        capability TEXT NOT NULL,
        upstream TEXT NOT NULL,
        doc BLOB NOT NULL
    );
    CREATE INDEX review_state ON review_items(state, created_at);
    CREATE INDEX review_agent ON review_items(agent, capability, state);
    CREATE TABLE transactions (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        agent TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        deadline REAL,
        doc BLOB NOT NULL
    );
    CREATE INDEX tx_state ON transactions(state, deadline);
    CREATE TABLE tx_steps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tx_id TEXT NOT NULL REFERENCES transactions(id),
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        doc BLOB NOT NULL
    );
    CREATE INDEX steps_tx ON tx_steps(tx_id, id);
    CREATE TABLE promotions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        capability TEXT NOT NULL,
        mode TEXT NOT NULL,
        at REAL NOT NULL,
        doc BLOB NOT NULL
    );
    CREATE INDEX promotions_grant ON promotions(agent, capability, id);
    CREATE TABLE quarantine (
        agent TEXT PRIMARY KEY,
        since REAL NOT NULL,
        doc BLOB NOT NULL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until REAL NOT NULL
    );
    """,
    # 3: review summaries (lists never load bodies) and sizes (per-agent pending caps)
    """
    ALTER TABLE review_items ADD COLUMN summary BLOB;
    ALTER TABLE review_items ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE review_items SET bytes = length(doc);
    CREATE INDEX review_agent_state ON review_items(agent, state, bytes);
    """,
    # 4: shared state for many processes: rate-limit buckets, error-budget counts and their epochs,
    # upstream quota state
    """
    CREATE TABLE rl_buckets (
        key TEXT PRIMARY KEY,
        tokens REAL NOT NULL,
        stamp REAL NOT NULL
    );
    CREATE TABLE gov_sli (
        agent TEXT NOT NULL,
        start REAL NOT NULL,
        kind TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (agent, start, kind)
    );
    CREATE TABLE gov_epochs (
        agent TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL
    );
    CREATE TABLE upstream_quota (
        upstream TEXT PRIMARY KEY,
        updated_at REAL NOT NULL,
        blocked_until REAL NOT NULL,
        doc BLOB NOT NULL
    );
    """,
    # 5: pending review items by expiry: the expiry sweep reads the due ones through the index instead
    # of every pending row (with 100,000 captured items the scan held the store for 0.5 s every sweep)
    """
    CREATE INDEX review_due ON review_items(state, expires_at);
    """,
]



_INSERT_REVIEW = (f"INSERT INTO review_items ({', '.join(_REVIEW_COLS)}, doc, summary, bytes) "
                  f"VALUES ({', '.join('?' * (len(_REVIEW_COLS) + 3))})")


def _review_params(row: PreparedRow) -> tuple[Any, ...]:
    return (*row.cols, row.doc, row.summary, row.size)
_INSERT_JOURNAL = ("INSERT INTO journal (seq, ts, kind, request_id, agent, on_behalf_of, capability, decision, "
                   "prev_hash, hash, record) VALUES (?,?,?,?,?,?,?,?,?,?,?)")


@contextmanager
def _pragma(conn: sqlite3.Connection, setting: str, value: Any, restore: Any) -> Iterator[None]:
    """``PRAGMA setting=value`` for the duration of the block, then ``restore`` whatever happened."""
    conn.execute(f"PRAGMA {setting}={value}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA {setting}={restore}")


def _append_batch(conn: sqlite3.Connection, payloads: list[bytes], columns: list[dict[str, Any]],
                  sides: Any = (), relax_to: str | None = None, wait: bool = True) -> list[tuple[int, str, str]]:
    """Runs in aiosqlite's thread (or the event loop's: :func:`_append_inline`). The head is read inside
    the write transaction, so several processes sharing the file still extend one chain.

    ``relax_to``: the connection's own ``synchronous`` level, when this batch may commit without the
    fsync (WAL frames reach the OS, so they survive the process's kill -9; the next durable commit's
    fsync of the WAL file covers them too). The level is put back before returning.

    ``wait=False``: one attempt at the write lock (:func:`_append_inline`); else :func:`_begin`."""
    if relax_to is not None:
        with _pragma(conn, "synchronous", "NORMAL", relax_to):
            return _append_batch(conn, payloads, columns, sides, None, wait)
    if wait:
        _begin(conn)
    else:
        conn.execute("BEGIN IMMEDIATE")
    try:
        head_seq, head_hash = conn.execute("SELECT head_seq, head_hash FROM journal_meta WHERE id = 1").fetchone()
        linked = link(head_seq, head_hash, payloads)
        # the hash as its 32 bytes; prev_hash is not stored (''): it is the hash of the record before,
        # which reading fills in (_SELECT), so storing it again cost 64 bytes a record for nothing
        conn.executemany(_INSERT_JOURNAL, [
            (seq, c.get("ts"), c.get("kind"), c.get("request_id"), c.get("agent"), c.get("on_behalf_of"),
             c.get("capability"), c.get("decision"), "", bytes.fromhex(h), p)
            for (seq, _, h), c, p in zip(linked, columns, payloads)])
        last_seq, _, last_hash = linked[-1]
        conn.execute("UPDATE journal_meta SET head_seq = ?, head_hash = ? WHERE id = 1", (last_seq, last_hash))
        for kind, row in sides:
            if kind != "review_insert":
                raise ValueError(f"unknown side write {kind!r}")
            conn.execute(_INSERT_REVIEW, _review_params(row))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return linked


_BUSY_TIMEOUT_MS = 5000


def _noop() -> None:
    """Queued behind whatever the database thread is doing (SQLiteStore._settle)."""


def _rollback(conn: sqlite3.Connection) -> None:
    """ROLLBACK, quietly: the transaction may already be gone (the error that brought us here ended it)."""
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _hex(value: Any) -> str:
    """A stored hash as hex: rows written since the compact form keep its 32 bytes, older ones the text."""
    if isinstance(value, (bytes, memoryview)):
        return bytes(value).hex()
    return value or ""
_BEGIN_PAUSES = (0.0001, 0.0002, 0.0005, 0.001)  # seconds between two attempts at the write lock; then 1 ms


def _begin(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, waiting for another process's write transaction (``--workers``) by trying
    again every millisecond at most, up to the busy timeout.

    Why not SQLite's busy handler (``busy_timeout``): between attempts it sleeps 1, 2, 5, 10, 15, 20,
    25, 25, 25, 50, 50, then 100 ms. A worker whose commit found the other worker's (~1 ms) transaction
    in the way slept on while that worker committed batch after batch: commits of one worker waited
    100–430 ms, and with them every request in their batch (``--workers 2``: GET p99 133 ms in the last
    full benchmark, 300 ms here under load)."""
    try:
        with _pragma(conn, "busy_timeout", 0, _BUSY_TIMEOUT_MS):
            conn.execute("BEGIN IMMEDIATE")
        return
    except sqlite3.OperationalError as exc:
        if (exc.sqlite_errorcode & 0xFF) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000.0
    n = 0
    with _pragma(conn, "busy_timeout", 0, _BUSY_TIMEOUT_MS):
        while True:
            time.sleep(_BEGIN_PAUSES[min(n, len(_BEGIN_PAUSES) - 1)])
            n += 1
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if (exc.sqlite_errorcode & 0xFF) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                        or time.monotonic() > deadline:
                    raise


def _checkpoint(conn: sqlite3.Connection, mode: str) -> None:
    """``PRAGMA wal_checkpoint(mode)`` on the writing connection (its thread); a RESTART waits for other
    processes' transactions at most 0.2 s (then it did what it could, like PASSIVE)."""
    if mode == "PASSIVE":
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return
    with _pragma(conn, "busy_timeout", 200, _BUSY_TIMEOUT_MS):
        conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()


def _append_inline(conn: sqlite3.Connection, payloads: list[bytes], columns: list[dict[str, Any]],
                   sides: Any, relax_to: str | None) -> list[tuple[int, str, str]] | None:
    """:func:`_append_batch` on the caller's thread, never waiting for another process's write lock
    (busy timeout 0 for the attempt): None when the lock is taken, so the caller hands the batch to the
    database thread, which may wait for it without stalling the event loop."""
    try:
        with _pragma(conn, "busy_timeout", 0, _BUSY_TIMEOUT_MS):
            return _append_batch(conn, payloads, columns, sides, relax_to, wait=False)
    except sqlite3.OperationalError as exc:
        # sqlite_errorcode is the extended code (SQLITE_BUSY_SNAPSHOT, ...): its low byte is the primary
        if (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return None
        raise


WAL_SOFT_FRAMES = 1000  # the WAL starts over once it holds this many frames (SQLite's own autocheckpoint mark)
WAL_HARD_BYTES = 64 * 1024 * 1024  # beyond: the writer's catch-up waits for other processes to get it done
_CHECKPOINT_POLL = 0.25  # seconds between two looks at the WAL


class _Checkpointer(threading.Thread):
    """Copies the WAL into the database on a connection and a thread of its own, off every commit's
    path (a PASSIVE checkpoint: it never waits for, nor blocks, readers and writers): each time it looks
    (every :data:`_CHECKPOINT_POLL` seconds) and the WAL was written since. Once the WAL holds
    :data:`WAL_SOFT_FRAMES` frames, ``store._catchup`` tells the journal writer to finish the job
    between two batches, so that the WAL starts over.

    It watches the WAL with ``stat`` only: opening and closing a file of the database here (its
    ``-shm`` index, say) would drop every POSIX lock this process holds on that file — another process
    sharing the store (``--workers``) would then checkpoint or restart the WAL under our connection's
    feet, and the database would be corrupt."""

    def __init__(self, store: "SQLiteStore") -> None:
        super().__init__(name="tether-sqlite-checkpoint", daemon=True)
        self.store = store
        self.wal = f"{store.path}-wal"
        self.halt = threading.Event()
        self.runs = 0
        self.last_error: str | None = None

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        seen: tuple[int, int] | None = None
        try:
            while not self.halt.wait(_CHECKPOINT_POLL):
                try:
                    st = os.stat(self.wal)
                    if (st.st_mtime_ns, st.st_size) == seen:
                        continue  # nothing written since the last look
                    seen = (st.st_mtime_ns, st.st_size)
                    if conn is None:
                        conn = sqlite3.connect(self.store.path, isolation_level=None)
                        conn.execute(f"PRAGMA synchronous={self.store.synchronous}")
                        conn.execute("PRAGMA busy_timeout=0")
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                    self.last_error = None
                    if frames >= WAL_SOFT_FRAMES:
                        self.store._catchup = True
                except (OSError, sqlite3.Error) as exc:  # no WAL yet, a busy lock: the next look tries again
                    self.last_error = str(exc)
        finally:
            if conn is not None:
                conn.close()


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "full") -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self.synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self.migrated_from: int | None = None
        self.signal_path = f"{path}-signal"
        self._watch_task: asyncio.Task[None] | None = None
        self._checkpointer: _Checkpointer | None = None
        self._catchup = False  # set by the checkpointer's thread: journal_maintenance is due

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise StoreUnavailable(f"{self.path}: folder {parent} does not exist")
        try:
            # check_same_thread=False: journal appends may run on the event loop's thread (inline=True),
            # always under self._lock, so the connection is never used by two threads at once
            self._db = await aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
            # busy_timeout first: several processes opening one file at once (workers, replicas) wait
            # for each other's journal_mode switch and migration instead of failing
            await self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            await self._wal()
            await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            await self._db.execute("PRAGMA foreign_keys=ON")
            # checkpoints off the commit path (see the module doc); a WAL restarted after one is cut back
            await self._db.execute("PRAGMA wal_autocheckpoint=0")
            await self._db.execute(f"PRAGMA journal_size_limit={16 * 1024 * 1024}")
            await self._migrate()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None
        self._checkpointer = _Checkpointer(self)
        self._checkpointer.start()

    async def _wal(self) -> None:
        """``PRAGMA journal_mode=WAL``, waiting for other openers. On a fresh file the switch can fail with
        "database is locked" *without* consulting the busy handler (several processes or connections
        opening it at once: ``--workers``, replicas, the store tests), so the wait is done here, up to
        the busy timeout."""
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000.0
        pause = 0.002
        while True:
            try:
                await self._conn().execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if (exc.sqlite_errorcode & 0xFF) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
                        or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _migrate(self) -> None:
        async with self._write():
            db = self._conn()
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur = await db.execute("SELECT version FROM schema_version")
            row = await cur.fetchone()
            current = row[0] if row else 0
            if row is None:
                await db.execute("INSERT INTO schema_version VALUES (0)")
            self.migrated_from = current
            for i, script in enumerate(_MIGRATIONS[current:], start=current + 1):
                for stmt in [s.strip() for s in script.split(";") if s.strip()]:
                    await db.execute(stmt)
                await db.execute("UPDATE schema_version SET version = ?", (i,))

    async def schema_version(self) -> int:
        rows = await self._fetchall("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        if self._checkpointer is not None:
            self._checkpointer.halt.set()
            await asyncio.to_thread(self._checkpointer.join, 10.0)
            self._checkpointer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def ping(self) -> None:
        try:
            await self._fetchall("SELECT 1")
        except ValueError as exc:
            raise StoreUnavailable(str(exc)) from None

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        return self._db

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The connection, for one caller at a time. A caller cancelled while the database thread works
        for it (a background loop stopped at shutdown, a client gone) does not let go of the connection
        until that work is over: aiosqlite cannot take back what its thread started, and the next holder
        — possibly on the event loop's own thread (inline journal commits) — would otherwise run on the
        same connection at once ("cannot start a transaction within a transaction", a journal commit
        lost at shutdown)."""
        async with self._lock:
            try:
                yield
            except asyncio.CancelledError:
                await self._settle()
                raise

    async def _settle(self) -> None:
        """Wait until the database thread has done all it was given (its queue is first in, first out);
        then roll back a transaction the cancelled caller left open (cancelled right after its BEGIN)."""
        db = self._db
        if db is None:
            return
        await self._on_thread(_noop)
        conn = db._conn
        if conn is not None and conn.in_transaction:
            await self._on_thread(_rollback, conn)

    async def _on_thread(self, fn: Any, *args: Any) -> None:
        """``fn(*args)`` on the database thread, waited for even through further cancellations."""
        try:
            done = asyncio.ensure_future(self._conn()._execute(fn, *args))
        except (ValueError, StoreUnavailable):  # the connection is closed
            return
        while not done.done():
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                continue  # cancelled again: still the connection must not be shared while the thread works
            except Exception:  # noqa: BLE001 - only the wait matters
                break
        if not done.cancelled():
            done.exception()  # retrieved: nothing to report, the caller's own error is what propagates

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One write transaction at a time on this connection; BEGIN IMMEDIATE across processes."""
        async with self._locked():
            db = self._conn()
            try:
                await db._execute(_begin, db._conn)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"{self.path}: {exc}") from None
            try:
                yield
            except BaseException:
                await db._execute(_rollback, db._conn)
                raise
            else:
                try:
                    await db.execute("COMMIT")
                except sqlite3.Error as exc:
                    await db._execute(_rollback, db._conn)
                    raise StoreUnavailable(f"{self.path}: commit failed: {exc}") from None

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._locked():
                cur = await self._conn().execute(sql, tuple(params))
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    # -- journal --------------------------------------------------------------------------------

    async def journal_append(self, payloads: list[bytes], columns: list[dict[str, Any]],
                             sides: list[tuple[str, dict[str, Any]]] | None = None, *,
                             durable: bool = True, inline: bool = False) -> list[tuple[int, str]]:
        """One batch in one trip to the database thread: BEGIN IMMEDIATE, read the head, link, insert,
        move the head, COMMIT. (Each await on aiosqlite is a thread hand-off; the hot path takes one.)
        ``durable=False`` commits at ``synchronous=NORMAL`` (no fsync) when the store runs at FULL.
        ``inline=True`` runs it on the calling thread instead, unless another process holds the write
        lock (then it goes to the thread and waits there, as usual). Every other use of the connection
        holds ``self._lock``, so the database thread is idle while the loop thread uses it."""
        db = self._conn()
        relax_to = None if durable or self.synchronous not in ("FULL", "EXTRA") else self.synchronous
        try:
            async with self._locked():
                linked = _append_inline(db._conn, payloads, columns, sides or (), relax_to) if inline else None
                if linked is None:
                    linked = await db._execute(_append_batch, db._conn, payloads, columns, sides or (), relax_to)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None
        return [(seq, h) for seq, _, h in linked]

    def journal_maintenance_due(self) -> bool:
        return self._catchup

    async def journal_maintenance(self) -> None:
        """The WAL checkpoint's last step, run by the journal writer between two batches: a PASSIVE
        checkpoint on the writing connection copies the frames committed since the background one (a
        few), so that the next commit starts the WAL over. A WAL past :data:`WAL_HARD_BYTES` (other
        processes kept it busy) gets a RESTART checkpoint instead, which waits up to 0.2 s for them."""
        self._catchup = False
        db = self._conn()
        try:
            big = os.stat(f"{self.path}-wal").st_size > WAL_HARD_BYTES
        except OSError:
            return
        try:
            async with self._locked():
                await db._execute(_checkpoint, db._conn, "RESTART" if big else "PASSIVE")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: checkpoint: {exc}") from None

    async def journal_head(self) -> tuple[int, str]:
        rows = await self._fetchall("SELECT head_seq, head_hash FROM journal_meta WHERE id = 1")
        return int(rows[0][0]), str(rows[0][1])

    async def journal_anchor(self) -> tuple[int, str]:
        rows = await self._fetchall("SELECT anchor_seq, anchor_hash FROM journal_meta WHERE id = 1")
        return int(rows[0][0]), str(rows[0][1])

    @staticmethod
    def _record(row: sqlite3.Row | tuple[Any, ...]) -> StoredRecord:
        cols = dict(zip(INDEXED_FIELDS, row[4:11]))
        raw = row[3]
        payload = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        return StoredRecord(seq=row[0], prev_hash=_hex(row[1]), hash=_hex(row[2]), payload=payload, columns=cols)

    # A record's prev_hash is the hash of the record before it (or the anchor's, after an archive); rows
    # written since the compact form store '' and get it here. Rows written before keep theirs, and so
    # does a row someone edited: verify compares it with the record before, as it always did.
    _SELECT = ("SELECT j.seq, CASE WHEN j.prev_hash = '' THEN COALESCE("
               "(SELECT p.hash FROM journal p WHERE p.seq = j.seq - 1), "
               "(SELECT m.anchor_hash FROM journal_meta m WHERE m.id = 1 AND m.anchor_seq = j.seq - 1)) "
               "ELSE j.prev_hash END, j.hash, j.record, j.ts, j.kind, j.request_id, j.agent, j.on_behalf_of, "
               "j.capability, j.decision FROM journal j")

    async def journal_query(self, *, after_seq: int = 0, before_seq: int | None = None, limit: int = 1000,
                            filters: dict[str, Any] | None = None, since: str | None = None,
                            until: str | None = None, descending: bool = False) -> list[StoredRecord]:
        where = ["seq > ?"]
        params: list[Any] = [after_seq]
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        for col, val in (filters or {}).items():
            if col not in INDEXED_FIELDS:
                raise ValueError(f"cannot filter on {col}")
            where.append(f"{col} = ?")
            params.append(val)
        if since:
            where.append("ts >= ?")
            params.append(since)
        if until:
            where.append("ts < ?")
            params.append(until)
        order = "DESC" if descending else "ASC"
        sql = f"{self._SELECT} WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?"
        params.append(limit)
        return await self.with_intents([self._record(r) for r in await self._fetchall(sql, params)])

    async def journal_payloads(self, seqs: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            for seq, raw in await self._fetchall(
                    f"SELECT seq, record FROM journal WHERE seq IN ({', '.join('?' * len(chunk))})", chunk):
                out[int(seq)] = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
        return out

    async def journal_scan(self, batch: int = 5000) -> AsyncIterator[StoredRecord]:  # type: ignore[override]
        after = (await self.journal_anchor())[0]
        while True:
            rows = await self._fetchall(f"{self._SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", (after, batch))
            if not rows:
                return
            for r in await self.with_intents([self._record(r) for r in rows]):
                yield r
            after = rows[-1][0]

    async def journal_archive(self, upto_seq: int) -> list[StoredRecord]:
        async with self._write():
            db = self._conn()
            cur = await db.execute(f"{self._SELECT} WHERE seq <= ? ORDER BY seq", (upto_seq,))
            rows = [self._record(r) for r in await cur.fetchall()]
            if rows:
                last = rows[-1]
                await db.execute("DELETE FROM journal WHERE seq <= ?", (last.seq,))
                await db.execute("UPDATE journal_meta SET anchor_seq = ?, anchor_hash = ? WHERE id = 1",
                                 (last.seq, last.hash))
        return rows

    # -- review items ---------------------------------------------------------------------------

    async def review_insert(self, item: dict[str, Any]) -> None:
        row = prepare_review(item)
        async with self._write():
            await self._conn().execute(_INSERT_REVIEW, _review_params(row))

    async def review_get(self, item_id: str) -> dict[str, Any] | None:
        rows = await self._fetchall(f"SELECT {', '.join(_REVIEW_COLS)}, doc FROM review_items WHERE id = ?", (item_id,))
        return from_row(_REVIEW_COLS, rows[0]) if rows else None

    async def review_list(self, *, state: str | None = None, agent: str | None = None,
                          capability: str | None = None, upstream: str | None = None,
                          older_than: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, params = ["1=1"], []
        for col, val in (("state", state), ("agent", agent), ("capability", capability), ("upstream", upstream)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if older_than is not None:
            where.append("created_at <= ?")
            params.append(older_than)
        rows = await self._fetchall(
            f"SELECT {', '.join(_REVIEW_COLS)}, summary, CASE WHEN summary IS NULL THEN doc END FROM review_items "
            f"WHERE {' AND '.join(where)} ORDER BY created_at DESC LIMIT ?", (*params, limit))
        return [summary_from_row(r) for r in rows]

    async def review_transition(self, item_id: str, expect: Iterable[str], to: str, updates: dict[str, Any], *,
                                unexpired_at: float | None = None) -> bool:
        return await self._transition("review_items", _REVIEW_COLS, item_id, expect, to, updates,
                                      unexpired_at=unexpired_at)

    async def _transition(self, table: str, cols: tuple[str, ...], row_id: str, expect: Iterable[str], to: str,
                          updates: dict[str, Any] | None, *, unexpired_at: float | None = None) -> bool:
        """Compare-and-set a row's state inside one write transaction; True when this caller won."""
        expect = tuple(expect)
        alive = "" if unexpired_at is None else " AND (expires_at IS NULL OR expires_at > ?)"
        async with self._write():
            db = self._conn()
            cur = await db.execute(
                f"SELECT {', '.join(cols)}, doc FROM {table} WHERE id = ? AND state IN "
                f"({', '.join('?' * len(expect))}){alive}",
                (row_id, *expect) + (() if unexpired_at is None else (unexpired_at,)))
            row = await cur.fetchone()
            if row is None:
                return False
            new = advance(from_row(cols, row), to, updates)
            values, doc = _split(new, cols)
            settable = [c for c in cols if c != "id"]
            await db.execute(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in settable)}, doc = ? WHERE id = ?",
                             (*(values[c] for c in settable), doc, row_id))
            if table == "review_items" and summary_changed(updates):  # lists show the summary: keep it true
                await db.execute("UPDATE review_items SET summary = ? WHERE id = ?",
                                 (summary_bytes(new), row_id))
            return True

    async def review_count(self, state: str = "pending") -> int:
        rows = await self._fetchall("SELECT COUNT(*) FROM review_items WHERE state = ?", (state,))
        return int(rows[0][0])

    async def review_usage(self, agent: str) -> tuple[int, int]:
        rows = await self._fetchall("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM review_items "
                                    "WHERE agent = ? AND state = 'pending'", (agent,))
        return int(rows[0][0]), int(rows[0][1])

    async def review_due(self, now: float, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self._fetchall(
            f"SELECT {', '.join(_REVIEW_COLS)}, doc FROM review_items WHERE state = 'pending' "
            f"AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?", (now, limit))
        return [from_row(_REVIEW_COLS, r) for r in rows]

    async def review_stats(self, agent: str, capability: str, since: float) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT state, doc FROM review_items WHERE agent = ? AND capability = ? AND updated_at >= ?",
            (agent, capability, since))
        return _review_stats(rows)

    # -- transactions ---------------------------------------------------------------------------

    async def tx_insert(self, tx: dict[str, Any]) -> None:
        cols, doc = _split(tx, _TX_COLS)
        async with self._write():
            await self._conn().execute(
                f"INSERT INTO transactions ({', '.join(_TX_COLS)}, doc) VALUES ({', '.join('?' * (len(_TX_COLS) + 1))})",
                (*cols.values(), doc))

    async def tx_get(self, tx_id: str) -> dict[str, Any] | None:
        rows = await self._fetchall(f"SELECT {', '.join(_TX_COLS)}, doc FROM transactions WHERE id = ?", (tx_id,))
        return from_row(_TX_COLS, rows[0]) if rows else None

    async def tx_list(self, *, state: str | None = None, agent: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, params = ["1=1"], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        rows = await self._fetchall(
            f"SELECT {', '.join(_TX_COLS)}, doc FROM transactions WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC LIMIT ?", (*params, limit))
        return [from_row(_TX_COLS, r) for r in rows]

    async def tx_count(self, state: str = "open") -> int:
        rows = await self._fetchall("SELECT COUNT(*) FROM transactions WHERE state = ?", (state,))
        return int(rows[0][0])

    async def tx_transition(self, tx_id: str, expect: Iterable[str], to: str,
                            updates: dict[str, Any] | None = None) -> bool:
        return await self._transition("transactions", _TX_COLS, tx_id, expect, to, updates)

    async def tx_due(self, now: float) -> list[dict[str, Any]]:
        rows = await self._fetchall(
            f"SELECT {', '.join(_TX_COLS)}, doc FROM transactions WHERE state = 'open' AND deadline IS NOT NULL "
            f"AND deadline <= ? ORDER BY deadline", (now,))
        return [from_row(_TX_COLS, r) for r in rows]

    async def step_insert(self, step: dict[str, Any]) -> int:
        step = dict(step)
        step.pop("id", None)
        cols = ("tx_id", "state", "created_at", "updated_at")
        doc = orjson.dumps({k: v for k, v in step.items() if k not in cols})
        async with self._write():
            cur = await self._conn().execute(
                "INSERT INTO tx_steps (tx_id, state, created_at, updated_at, doc) VALUES (?,?,?,?,?)",
                (step["tx_id"], step["state"], step["created_at"], step.get("updated_at", step["created_at"]), doc))
            return int(cur.lastrowid)  # type: ignore[arg-type]

    async def step_update(self, step_id: int, updates: dict[str, Any]) -> None:
        async with self._write():
            db = self._conn()
            cur = await db.execute(f"SELECT {', '.join(_STEP_COLS)}, doc FROM tx_steps WHERE id = ?", (step_id,))
            row = await cur.fetchone()
            if row is None:
                raise KeyError(step_id)
            step = from_row(_STEP_COLS, row)
            step.update(updates)
            step["updated_at"] = time.time()
            cols, doc = _split(step, _STEP_COLS)
            await db.execute("UPDATE tx_steps SET state = ?, updated_at = ?, doc = ? WHERE id = ?",
                             (cols["state"], cols["updated_at"], doc, step_id))

    async def steps_for(self, tx_id: str) -> list[dict[str, Any]]:
        rows = await self._fetchall(f"SELECT {', '.join(_STEP_COLS)}, doc FROM tx_steps WHERE tx_id = ? ORDER BY id",
                                    (tx_id,))
        return [from_row(_STEP_COLS, r) for r in rows]

    # -- governance -----------------------------------------------------------------------------

    async def promotion_add(self, row: dict[str, Any]) -> None:
        doc = orjson.dumps(row)
        async with self._write():
            await self._conn().execute(
                "INSERT INTO promotions (agent, capability, mode, at, doc) VALUES (?,?,?,?,?)",
                (row["agent"], row["capability"], row["mode"], row["at"], doc))

    async def promotions(self, *, agent: str | None = None, capability: str | None = None,
                         history: bool = False) -> list[dict[str, Any]]:
        where, params = ["1=1"], []
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        if capability is not None:
            where.append("capability = ?")
            params.append(capability)
        if history:
            sql = f"SELECT doc FROM promotions WHERE {' AND '.join(where)} ORDER BY id"
        else:
            sql = (f"SELECT doc FROM promotions WHERE id IN (SELECT MAX(id) FROM promotions WHERE "
                   f"{' AND '.join(where)} GROUP BY agent, capability) ORDER BY id")
        return [orjson.loads(r[0]) for r in await self._fetchall(sql, params)]

    async def quarantine_set(self, agent: str, row: dict[str, Any]) -> bool:
        async with self._write():
            db = self._conn()
            if row.get("epoch") is not None:  # judged on counts of that epoch: a release since voids it
                cur = await db.execute("SELECT epoch FROM gov_epochs WHERE agent = ?", (agent,))
                found = await cur.fetchone()
                if (found[0] if found else 0) != row["epoch"]:
                    return False
            cur = await db.execute(
                "INSERT OR IGNORE INTO quarantine (agent, since, doc) VALUES (?,?,?)",
                (agent, row.get("since", time.time()), orjson.dumps(row)))
            return cur.rowcount == 1

    async def quarantine_release(self, agent: str, by: str, reason: str) -> bool:
        async with self._write():
            db = self._conn()
            cur = await db.execute("DELETE FROM quarantine WHERE agent = ?", (agent,))
            released = cur.rowcount == 1
            # the error-budget window restarts for every process: its counts go, its epoch moves on
            await db.execute("DELETE FROM gov_sli WHERE agent = ?", (agent,))
            await db.execute("INSERT INTO gov_epochs (agent, epoch) VALUES (?, 1) "
                             "ON CONFLICT(agent) DO UPDATE SET epoch = epoch + 1", (agent,))
            return released

    async def quarantines(self) -> dict[str, dict[str, Any]]:
        rows = await self._fetchall("SELECT agent, doc FROM quarantine")
        return {r[0]: orjson.loads(r[1]) for r in rows}

    # -- leases ---------------------------------------------------------------------------------

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        now = time.time()
        async with self._write():
            db = self._conn()
            cur = await db.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "holder = excluded.holder, until = excluded.until WHERE leases.holder = excluded.holder "
                "OR leases.until < ?", (name, holder, now + ttl, now))
            return cur.rowcount == 1

    async def lease_release(self, name: str, holder: str) -> None:
        async with self._write():
            await self._conn().execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))


    # -- many processes: rate-limit buckets, error-budget counts, quota, signals -----------------------

    async def bucket_take(self, reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]:
        if not reqs:
            return []
        db = self._conn()
        try:
            async with self._locked():
                return await db._execute(_bucket_take, db._conn, time.time(), reqs)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    async def sli_sync(self, increments: list[tuple[str, int, float, str, int]], since: dict[str, float],
                       prune_before: float | None = None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        db = self._conn()
        try:
            async with self._locked():
                return await db._execute(_sli_sync, db._conn, increments, since, prune_before)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    async def sli_epochs(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetchall("SELECT agent, epoch FROM gov_epochs")}

    async def quota_update(self, upstream: str, doc: dict[str, Any], now: float) -> tuple[bool, float]:
        async with self._write():
            db = self._conn()
            cur = await db.execute("SELECT blocked_until FROM upstream_quota WHERE upstream = ?", (upstream,))
            found = await cur.fetchone()
            prev = float(found[0]) if found else 0.0
            until, started = _merge_block(prev, float(doc.get("blocked_until") or 0.0), now)
            doc = {**doc, "blocked_until": until}
            await db.execute(
                "INSERT INTO upstream_quota (upstream, updated_at, blocked_until, doc) VALUES (?,?,?,?) "
                "ON CONFLICT(upstream) DO UPDATE SET updated_at = excluded.updated_at, "
                "blocked_until = excluded.blocked_until, doc = excluded.doc",
                (upstream, now, until, orjson.dumps(doc)))
            return started, until

    async def quota_states(self) -> dict[str, dict[str, Any]]:
        rows = await self._fetchall("SELECT upstream, blocked_until, doc FROM upstream_quota")
        return {r[0]: {**orjson.loads(r[2]), "blocked_until": float(r[1])} for r in rows}

    async def signal(self, topic: str) -> None:
        """Tell the other processes on this file that shared state changed: a byte appended to
        ``<file>-signal``, whose size and time every watcher polls (a stat call every 20 ms)."""
        def bump() -> None:
            fd = os.open(self.signal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if os.fstat(fd).st_size > 4096:
                    os.ftruncate(fd, 0)
                os.write(fd, topic.encode("utf-8", "replace")[:64] + b"\n")
            finally:
                os.close(fd)

        try:
            bump()
        except OSError as exc:
            raise StoreUnavailable(f"{self.signal_path}: {exc}") from None

    async def watch(self, callback: Callable[[str | None], None]) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.ensure_future(self._poll_signal(callback))

    async def _poll_signal(self, callback: Callable[[str | None], None]) -> None:
        def key() -> tuple[int, int, int] | None:
            try:
                st = os.stat(self.signal_path)
            except OSError:
                return None
            return (st.st_mtime_ns, st.st_size, st.st_ino)

        last = key()
        while True:
            await asyncio.sleep(_SIGNAL_POLL)
            cur = key()
            if cur != last:
                last = cur
                callback(None)


_SIGNAL_POLL = 0.02  # seconds between two looks at the signal file


def _merge_block(prev: float, new: float, now: float) -> tuple[float, bool]:
    """A quota block only ends by expiring (an answer that was already on its way must not lift it):
    (the block in force, whether this one started a new episode)."""
    if prev > now:
        return max(prev, new), False
    return new, new > now


def _bucket_take(conn: sqlite3.Connection, now: float,
                 reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]:
    """Token buckets shared through the file: for each (key, rate/s, capacity, need, want), refill, then
    grant ``want`` (at most what is there) if at least ``need`` is there, else nothing. Returns
    (granted, tokens left) per key. One write transaction: other processes wait for it."""
    _begin(conn)
    try:
        out = []
        for key, rate, cap, need, want in reqs:
            row = conn.execute("SELECT tokens, stamp FROM rl_buckets WHERE key = ?", (key,)).fetchone()
            if row is None:
                avail, stamp = cap, now
            else:
                avail = min(cap, row[0] + max(0.0, now - row[1]) * rate)
                stamp = max(now, row[1])
            granted = min(avail, want) if avail >= need else 0.0
            conn.execute("INSERT INTO rl_buckets (key, tokens, stamp) VALUES (?,?,?) ON CONFLICT(key) DO UPDATE "
                         "SET tokens = excluded.tokens, stamp = excluded.stamp", (key, avail - granted, stamp))
            out.append((granted, avail - granted))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return out


def _sli_sync(conn: sqlite3.Connection, increments: list[tuple[str, int, float, str, int]],
              since: dict[str, float], prune_before: float | None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Add a process's error-budget counts (only those observed in the agent's current epoch: a release
    voids older ones) and read back every process's totals since each agent's cutoff, in one write
    transaction, so that two processes syncing at once see each other's counts."""
    _begin(conn)
    try:
        epochs = {a: int(e) for a, e in conn.execute("SELECT agent, epoch FROM gov_epochs")}
        conn.executemany(
            "INSERT INTO gov_sli (agent, start, kind, n) VALUES (?,?,?,?) "
            "ON CONFLICT(agent, start, kind) DO UPDATE SET n = n + excluded.n",
            [(a, st, k, n) for a, ep, st, k, n in increments if epochs.get(a, 0) == ep])
        if prune_before is not None:
            conn.execute("DELETE FROM gov_sli WHERE start < ?", (prune_before,))
        totals: dict[str, dict[str, int]] = {}
        if since:  # one query for every agent, each with its own window (a JSON list of [agent, cutoff])
            for agent, kind, n in conn.execute(
                    "SELECT s.agent, s.kind, SUM(s.n) FROM gov_sli s JOIN json_each(?) w "
                    "ON s.agent = json_extract(w.value, '$[0]') WHERE s.start > json_extract(w.value, '$[1]') "
                    "GROUP BY s.agent, s.kind", (orjson.dumps(list(since.items())).decode(),)):
                totals.setdefault(agent, {})[kind] = int(n)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return totals, epochs
