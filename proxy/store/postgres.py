"""The shared store: PostgreSQL via asyncpg, for many Tether replicas behind one review queue and journal.

URL format (``server.store``, ``--store``, ``$TETHER_STORE``)::

    postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?PARAM=VALUE&...]

Tether's own parameters (removed before the URL reaches asyncpg):

``schema``
    the PostgreSQL schema holding Tether's tables (default ``public``). One database can hold several
    independent Tether deployments (or test runs), one per schema. ``options=-csearch_path=NAME`` is
    understood too when ``schema`` is absent. Names: letters, digits and ``_``, at most 63.
``pool_min``, ``pool_max``
    connection pool bounds (default 1 and 10). The journal writer uses one connection at a time; the
    rest serve reviews, transactions and governance.
``connect_timeout``
    seconds to establish a connection (default 5).
``command_timeout``
    seconds any one statement may take before the store is reported unavailable (default 10), so a
    server that stops answering makes requests fail with 503 ``journal_unavailable`` instead of hanging.
``migrate``
    ``true`` (default): apply pending schema migrations when the store opens; ``false``: refuse to start
    on an out-of-date schema (run ``tether store migrate`` with a role allowed to change the schema).

Every other parameter (``sslmode``, ``application_name``, ``sslrootcert``, ...) goes to asyncpg as is. The
password may also come from ``$PGPASSWORD`` or ``~/.pgpass`` as usual for libpq-style clients. Example::

    postgresql://tether:secret@db.internal:5432/tether?schema=tether&sslmode=verify-full&pool_max=20

How each guarantee of the store interface is kept when several processes share the database:

* **One hash chain.** ``journal_append`` runs one transaction: ``SELECT ... FROM journal_meta WHERE id = 1
  FOR UPDATE`` locks the single head row (so every other appender, in any process, waits here), the
  batch is linked to the head with :func:`proxy.chain.link`, then one statement inserts the whole batch
  (``unnest`` of arrays), moves the head and ``pg_notify``s the last sequence number, and the commit
  releases the lock. The record payload is stored as ``bytea`` — the exact bytes the hash covers.
  Commits are durable on return (the server's ``synchronous_commit=on``; Tether never lowers it). The
  :class:`proxy.journal.writer.JournalWriter` batches records (group commit), so one commit carries many.
* **Decided exactly once.** ``review_transition`` and ``tx_transition`` read the row with ``SELECT ... FOR
  UPDATE`` filtered on the expected states, then update it in the same transaction. A second caller
  blocks on the row lock; when it gets it, PostgreSQL re-checks the ``WHERE`` against the new row
  version (READ COMMITTED), finds the state changed and returns nothing: it lost.
* **Sweeps on one replica at a time.** ``try_lease`` is a row lease: a conditional upsert on ``leases``
  (``INSERT ... ON CONFLICT DO UPDATE ... WHERE holder = me OR until < now()``) that succeeds only for the
  current holder or once the lease expired, timed by the *database server's* clock so replicas with
  skewed clocks agree. We chose this over ``pg_try_advisory_lock``: a session advisory lock belongs to a
  connection, so it would pin one pool connection per lease forever, be silently dropped when that
  connection is recycled or reset, and never expire if a replica hangs with its connection open; a lease
  row needs no dedicated connection, survives reconnects and expires by itself (``ttl``) when its
  holder dies. Like every TTL lease it is not a fencing token: a holder frozen for longer than ``ttl``
  may overlap its successor, which is why the sweeps' state changes are themselves compare-and-set.
* **Migrations.** Versioned scripts, applied in one transaction that first takes
  ``pg_advisory_xact_lock`` (a key derived from the schema name): replicas starting at once queue up, the
  first one migrates, the others then find nothing to do. The lock is released with the transaction.
* **tail -f without polling.** The append transaction notifies channel ``tether_journal`` (schema
  ``public``) or ``tether_journal_<schema>`` with the last sequence number as payload; ``journal_wait``
  waits on a dedicated ``LISTEN`` connection, its timeout only a fallback.
* **Outages.** Connection failures, server shutdowns, read-only servers, full disks and statement
  timeouts raise :class:`StoreUnavailable`; the pool replaces dead connections on the next use, so the
  gateway answers 503 ``journal_unavailable`` while the server is away and recovers by itself. A
  journal append whose pooled connection fails *before* its commit was sent is retried once on a
  fresh connection (a connection that died while idle in the pool is the common case after a server
  restart); a failure during the commit itself is never retried (its outcome is unknown, and the chain
  stays consistent either way because the head is re-read under the lock). After a connection failure every pooled
  connection is replaced on its next use (a server restart kills them all). A replica that vanishes
  mid-append (partition, frozen VM) cannot hold the chain's head row lock for long: pooled sessions run
  with ``idle_in_transaction_session_timeout`` (twice ``command_timeout``, at least 5 s).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from typing import Any, AsyncIterator, Iterable
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

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

log = logging.getLogger("tether.store.postgres")

try:  # asyncpg is the optional ``postgres`` extra
    import asyncpg
    from asyncpg import exceptions as _pgx
except ImportError:  # pragma: no cover - exercised only without the extra
    asyncpg = None  # type: ignore[assignment]
    _pgx = None  # type: ignore[assignment]

DEFAULT_SCHEMA = "public"
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_OWN_PARAMS = ("schema", "pool_min", "pool_max", "connect_timeout", "command_timeout", "migrate")

# Each migration is a list of statements run in order inside the migration transaction. ``{s}`` is the
# quoted schema name. Text columns use COLLATE "C" so ordering and range filters compare bytes, exactly
# like SQLite (the journal's timestamps are compared as text).
_MIGRATIONS: list[list[str]] = [
    # 1: journal
    [
        """CREATE TABLE {s}.journal (
            seq BIGINT PRIMARY KEY,
            ts TEXT COLLATE "C" NOT NULL,
            kind TEXT COLLATE "C" NOT NULL,
            request_id TEXT COLLATE "C",
            agent TEXT COLLATE "C",
            on_behalf_of TEXT COLLATE "C",
            capability TEXT COLLATE "C",
            decision TEXT COLLATE "C",
            prev_hash TEXT COLLATE "C" NOT NULL,
            hash TEXT COLLATE "C" NOT NULL,
            record BYTEA NOT NULL
        )""",
        "CREATE INDEX journal_agent ON {s}.journal (agent, seq)",
        "CREATE INDEX journal_request ON {s}.journal (request_id)",
        "CREATE INDEX journal_ts ON {s}.journal (ts)",
        """CREATE TABLE {s}.journal_meta (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            anchor_seq BIGINT NOT NULL,
            anchor_hash TEXT COLLATE "C" NOT NULL,
            head_seq BIGINT NOT NULL,
            head_hash TEXT COLLATE "C" NOT NULL
        )""",
        f"INSERT INTO {{s}}.journal_meta VALUES (1, 0, '{GENESIS}', 0, '{GENESIS}')",
    ],
    # 2: review items, transactions and steps, governance, leases
    [
        """CREATE TABLE {s}.review_items (
            id TEXT COLLATE "C" PRIMARY KEY,
            state TEXT COLLATE "C" NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            agent TEXT COLLATE "C" NOT NULL,
            capability TEXT COLLATE "C" NOT NULL,
            upstream TEXT COLLATE "C" NOT NULL,
            doc BYTEA NOT NULL
        )""",
        "CREATE INDEX review_state ON {s}.review_items (state, created_at)",
        "CREATE INDEX review_agent ON {s}.review_items (agent, capability, state)",
        """CREATE TABLE {s}.transactions (
            id TEXT COLLATE "C" PRIMARY KEY,
            state TEXT COLLATE "C" NOT NULL,
            agent TEXT COLLATE "C" NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            deadline DOUBLE PRECISION,
            doc BYTEA NOT NULL
        )""",
        "CREATE INDEX tx_state ON {s}.transactions (state, deadline)",
        """CREATE TABLE {s}.tx_steps (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            tx_id TEXT COLLATE "C" NOT NULL REFERENCES {s}.transactions (id),
            state TEXT COLLATE "C" NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            doc BYTEA NOT NULL
        )""",
        "CREATE INDEX steps_tx ON {s}.tx_steps (tx_id, id)",
        """CREATE TABLE {s}.promotions (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            agent TEXT COLLATE "C" NOT NULL,
            capability TEXT COLLATE "C" NOT NULL,
            mode TEXT COLLATE "C" NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            doc BYTEA NOT NULL
        )""",
        "CREATE INDEX promotions_grant ON {s}.promotions (agent, capability, id)",
        """CREATE TABLE {s}.quarantine (
            agent TEXT COLLATE "C" PRIMARY KEY,
            since DOUBLE PRECISION NOT NULL,
            doc BYTEA NOT NULL
        )""",
        """CREATE TABLE {s}.leases (
            name TEXT COLLATE "C" PRIMARY KEY,
            holder TEXT COLLATE "C" NOT NULL,
            until DOUBLE PRECISION NOT NULL
        )""",
    ],
    # 3: review summaries (lists never load bodies) and sizes (per-agent pending caps)
    [
        "ALTER TABLE {s}.review_items ADD COLUMN summary BYTEA",
        "ALTER TABLE {s}.review_items ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0",
        "UPDATE {s}.review_items SET bytes = octet_length(doc)",
        "CREATE INDEX review_agent_state ON {s}.review_items (agent, state, bytes)",
    ],
    # 4: shared state for many processes: rate-limit buckets, error-budget counts and their epochs,
    # upstream quota state
    [
        """CREATE TABLE {s}.rl_buckets (
            key TEXT COLLATE "C" PRIMARY KEY,
            tokens DOUBLE PRECISION NOT NULL,
            stamp DOUBLE PRECISION NOT NULL,
            granted DOUBLE PRECISION NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE {s}.gov_sli (
            agent TEXT COLLATE "C" NOT NULL,
            start DOUBLE PRECISION NOT NULL,
            kind TEXT COLLATE "C" NOT NULL,
            n BIGINT NOT NULL,
            PRIMARY KEY (agent, start, kind)
        )""",
        """CREATE TABLE {s}.gov_epochs (
            agent TEXT COLLATE "C" PRIMARY KEY,
            epoch INTEGER NOT NULL
        )""",
        """CREATE TABLE {s}.upstream_quota (
            upstream TEXT COLLATE "C" PRIMARY KEY,
            updated_at DOUBLE PRECISION NOT NULL,
            blocked_until DOUBLE PRECISION NOT NULL,
            doc BYTEA NOT NULL
        )""",
    ],
    # 5: pending review items by expiry (the expiry sweep reads only the due ones)
    [
        "CREATE INDEX review_due ON {s}.review_items (state, expires_at)",
    ],
]

LATEST_VERSION = len(_MIGRATIONS)



def _unavailable_types() -> tuple[type[BaseException], ...]:
    if asyncpg is None:  # pragma: no cover
        return (OSError,)
    return (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
            asyncpg.PostgresError)


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_url(url: str) -> tuple[str, dict[str, Any]]:
    """Split a store URL into the DSN for asyncpg and Tether's own settings (see the module doc)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {redact(url)}")
    own: dict[str, Any] = {"schema": None, "pool_min": 1, "pool_max": 10, "connect_timeout": 5.0,
                           "command_timeout": 10.0, "migrate": True}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in _OWN_PARAMS:
            rest.append((k, v))
            continue
        try:
            if k == "schema":
                own[k] = v
            elif k in ("pool_min", "pool_max"):
                own[k] = int(v)
            elif k in ("connect_timeout", "command_timeout"):
                own[k] = float(v)
            else:
                own[k] = _bool(v)
        except ValueError:
            raise ValueError(f"store URL parameter {k}={v!r} is not valid") from None
    if own["schema"] is None:
        for k, v in rest:
            m = re.search(r"-c\s*search_path\s*=\s*\"?([^\s,\"]+)", v) if k == "options" else None
            if m:
                own["schema"] = m.group(1)
    own["schema"] = own["schema"] or DEFAULT_SCHEMA
    if not _SCHEMA_RE.fullmatch(own["schema"]):
        raise ValueError(f"store URL schema {own['schema']!r}: use letters, digits and _ (at most 63)")
    if own["pool_min"] < 0 or own["pool_max"] < 1 or own["pool_min"] > own["pool_max"]:
        raise ValueError("store URL: need 0 <= pool_min <= pool_max and pool_max >= 1")
    if own["connect_timeout"] <= 0 or own["command_timeout"] <= 0:
        raise ValueError("store URL: timeouts must be positive")
    dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest, quote_via=quote), ""))
    return dsn, own


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, banners and ``store info``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = unquote(parts.username or "")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{quote(user, safe='')}:***@{host}", parts.path, parts.query, parts.fragment))


def _lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory lock key per schema."""
    return int.from_bytes(hashlib.sha256(f"tether-migrate:{schema}".encode()).digest()[:8], "big", signed=True)


def _text(value: Any) -> str | None:
    """A value for a TEXT column: PostgreSQL text cannot hold NUL, so NUL becomes U+FFFD (see _record)."""
    if value is None:
        return None
    s = value if isinstance(value, str) else str(value)
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


class PostgresStore(Store):
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        if asyncpg is None:  # pragma: no cover
            raise StoreUnavailable("the PostgreSQL store needs asyncpg: pip install 'tether-gateway[postgres]'")
        try:
            self._dsn, opts = parse_url(url)
        except ValueError as exc:
            raise StoreUnavailable(str(exc)) from None
        self.url = url
        self.schema: str = opts["schema"]
        self.pool_min: int = opts["pool_min"]
        self.pool_max: int = opts["pool_max"]
        self.connect_timeout: float = opts["connect_timeout"]
        self.command_timeout: float = opts["command_timeout"]
        self.auto_migrate: bool = opts["migrate"]
        self.description = redact(url)
        self.channel = "tether_journal" if self.schema == DEFAULT_SCHEMA else f"tether_journal_{self.schema}"[:63]
        # governance signals (quarantines, releases, promotions, quota blocks): per schema, like the journal's
        self.gov_channel = "tether_gov" if self.schema == DEFAULT_SCHEMA else f"tether_gov_{self.schema}"[:63]
        self._watcher: Any = None
        self._watch_cb: Any = None
        self._watch_task: asyncio.Task[None] | None = None
        self.migrated_from: int | None = None  # schema version found by the last migrate()
        self._pool: Any = None
        self._listener: Any = None
        self._listener_lock = asyncio.Lock()
        self._notified = 0
        self._waiters: set[asyncio.Event] = set()
        self._unavailable = _unavailable_types()
        s = f'"{self.schema}"'
        self._s = s
        self._sql = {
            "head_lock": f"SELECT head_seq, head_hash FROM {s}.journal_meta WHERE id = 1 FOR UPDATE",
            "append": (
                f"WITH ins AS (INSERT INTO {s}.journal (seq, ts, kind, request_id, agent, on_behalf_of, capability, "
                f"decision, prev_hash, hash, record) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], "
                f"$4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[])), "
                f"upd AS (UPDATE {s}.journal_meta SET head_seq = $12, head_hash = $13 WHERE id = 1) "
                f"SELECT pg_notify($14, $15)"),
            # prev_hash is the hash of the record before (or the anchor's): rows written since the compact
            # form store '' and get it here; older rows, and a row someone edited, keep their own
            "select": (f"SELECT j.seq, CASE WHEN j.prev_hash = '' THEN COALESCE("
                       f"(SELECT p.hash FROM {s}.journal p WHERE p.seq = j.seq - 1), "
                       f"(SELECT m.anchor_hash FROM {s}.journal_meta m WHERE m.id = 1 AND m.anchor_seq = j.seq - 1)) "
                       f"ELSE j.prev_hash END, j.hash, j.record, "
                       f"{', '.join('j.' + c for c in INDEXED_FIELDS)} FROM {s}.journal j"),
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (pool) and apply pending migrations, or refuse an old schema with ``migrate=false``."""
        await self.open_pool()
        try:
            if self.auto_migrate:
                await self.migrate()
            else:
                current = await self.schema_version()
                if current < LATEST_VERSION:
                    raise StoreUnavailable(
                        f"{redact(self.url)}: schema version {current}, this Tether needs {LATEST_VERSION}; "
                        f"run `tether store migrate` (the URL says migrate=false)")
        except BaseException:
            await self.close()
            raise

    async def open_pool(self) -> None:
        """Connect without touching the schema (``tether store info``)."""
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=self.pool_min, max_size=self.pool_max, timeout=self.connect_timeout,
                command_timeout=self.command_timeout, max_inactive_connection_lifetime=300.0,
                server_settings=self._server_settings())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused, unknown host, bad password, no database, ...
            raise StoreUnavailable(f"{redact(self.url)}: cannot connect: {_describe(exc)}") from None

    def _server_settings(self) -> dict[str, str]:
        """Session settings for pooled connections.

        ``idle_in_transaction_session_timeout``: if a replica vanishes (partition, frozen VM) in the middle
        of a journal append, its transaction holds the chain's head row lock and every other replica's
        appends wait; the server ends such a session after this long instead of waiting for TCP to notice.
        Tether's transactions never sit idle for more than a few milliseconds."""
        settings = {"idle_in_transaction_session_timeout": str(int(max(5.0, 2 * self.command_timeout) * 1000))}
        if "application_name=" not in self._dsn:
            settings["application_name"] = "tether"
        return settings

    async def migrate(self) -> tuple[int, int]:
        """Apply pending migrations under a transaction-level advisory lock; returns (before, after)."""
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(self.schema))
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._s}")
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {self._s}.schema_version (version INTEGER NOT NULL)")
                current = await conn.fetchval(f"SELECT version FROM {self._s}.schema_version")
                if current is None:
                    current = 0
                    await conn.execute(f"INSERT INTO {self._s}.schema_version VALUES (0)")
                self.migrated_from = current
                if current > LATEST_VERSION:
                    log.warning("store schema version %d is newer than this Tether knows (%d); "
                                "carrying on, but upgrade Tether", current, LATEST_VERSION)
                for version, script in enumerate(_MIGRATIONS[current:], start=current + 1):
                    for stmt in script:
                        await conn.execute(stmt.format(s=self._s))
                    await conn.execute(f"UPDATE {self._s}.schema_version SET version = $1", version)
                    log.info("store schema %s migrated to version %d", self.schema, version)
                return current, max(current, LATEST_VERSION)

    async def schema_version(self) -> int:
        async with self._conn() as conn:
            exists = await conn.fetchval("SELECT to_regclass($1)", f"{self._s}.schema_version")
            if exists is None:
                return 0
            v = await conn.fetchval(f"SELECT version FROM {self._s}.schema_version")
            return int(v) if v is not None else 0

    async def close(self) -> None:
        for ev in self._waiters:
            ev.set()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
            self._watch_task = None
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await asyncio.wait_for(watcher.close(), 2)
            except Exception:  # noqa: BLE001
                watcher.terminate()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await asyncio.wait_for(listener.close(), 2)
            except Exception:  # noqa: BLE001
                listener.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:  # noqa: BLE001 - a dead server: do not wait for it
                pool.terminate()

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1", timeout=min(self.command_timeout, 2.0))

    def _conn(self) -> "_Acquire":
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        return _Acquire(self)

    def _fail(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"{redact(self.url)}: {_describe(exc)}")

    async def _fetch(self, sql: str, *args: Any, timeout: float | None = None) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *args, timeout=timeout))

    async def _write(self, fn: Any) -> Any:
        """Run ``await fn(conn)`` inside one transaction."""
        async with self._conn() as conn:
            async with conn.transaction():
                return await fn(conn)

    # -- journal --------------------------------------------------------------------------------

    async def journal_append(self, payloads: list[bytes], columns: list[dict[str, Any]],
                             sides: list[tuple[str, dict[str, Any]]] | None = None, *,
                             durable: bool = True, inline: bool = False) -> list[tuple[int, str]]:
        # ``durable`` is not used: every commit waits for the server's WAL flush (lowering
        # synchronous_commit per transaction would cost a round trip of its own); nor is ``inline``
        # (asyncpg has no thread to skip)
        if not payloads:
            return []
        for attempt in (1, 2):
            committing = connected = False
            try:
                async with self._conn() as conn:
                    connected = True
                    tr = conn.transaction()
                    await tr.start()
                    try:
                        head_seq, head_hash = await conn.fetchrow(self._sql["head_lock"])
                        linked = link(head_seq, head_hash, payloads)
                        cols = [[_text(c.get(f)) for c in columns] for f in INDEXED_FIELDS]
                        last_seq, _, last_hash = linked[-1]
                        await conn.execute(
                            self._sql["append"], [seq for seq, _, _ in linked], *cols,
                            [""] * len(linked), [h for _, _, h in linked], payloads,  # prev_hash: see _sql
                            last_seq, last_hash, self.channel, str(last_seq))
                        for kind, row in sides or ():
                            if kind != "review_insert":
                                raise ValueError(f"unknown side write {kind!r}")
                            await conn.execute(self._review_insert_sql, *self._review_params(row))
                    except BaseException as exc:
                        if not _is_outage(exc) and not isinstance(exc, asyncio.CancelledError) and not conn.is_closed():
                            try:
                                await tr.rollback()
                            except Exception:  # noqa: BLE001 - the connection is dropped below anyway
                                pass
                        raise
                    committing = True
                    await tr.commit()
                return [(seq, h) for seq, _, h in linked]
            except StoreUnavailable:
                # retry only a pooled connection found dead before the commit was sent: when no connection
                # could be had at all, trying again at once would just double the wait for the 503
                if committing or not connected or attempt == 2 or self._pool is None:
                    raise
                log.warning("journal append failed before commit; retrying once on a fresh connection")
        raise AssertionError("unreachable")  # pragma: no cover

    async def journal_head(self) -> tuple[int, str]:
        rows = await self._fetch(f"SELECT head_seq, head_hash FROM {self._s}.journal_meta WHERE id = 1")
        return int(rows[0][0]), str(rows[0][1])

    async def journal_anchor(self) -> tuple[int, str]:
        rows = await self._fetch(f"SELECT anchor_seq, anchor_hash FROM {self._s}.journal_meta WHERE id = 1")
        return int(rows[0][0]), str(rows[0][1])

    @staticmethod
    def _record(row: Any) -> StoredRecord:
        return StoredRecord(seq=int(row[0]), prev_hash=row[1] or "", hash=row[2], payload=bytes(row[3]),
                            columns=dict(zip(INDEXED_FIELDS, row[4:])))

    async def _records(self, rows: list[Any]) -> list[StoredRecord]:
        """Rows -> records, compact outcomes given their intent records (``with_intents``), and a column
        value with NUL restored: it was stored with U+FFFD (TEXT cannot hold NUL), so the record's own
        value is given back when, and only when, that is exactly what was stored."""
        out = await self.with_intents([self._record(r) for r in rows])
        for r in out:
            cols = r.columns
            if any(isinstance(v, str) and "\ufffd" in v for v in cols.values()):
                try:
                    rec = r.record()
                except orjson.JSONDecodeError:
                    rec = {}
                for k, v in cols.items():
                    real = rec.get(k)
                    if isinstance(v, str) and isinstance(real, str) and "\x00" in real and _text(real) == v:
                        cols[k] = real
        return out

    async def journal_query(self, *, after_seq: int = 0, before_seq: int | None = None, limit: int = 1000,
                            filters: dict[str, Any] | None = None, since: str | None = None,
                            until: str | None = None, descending: bool = False) -> list[StoredRecord]:
        where = ["seq > $1"]
        params: list[Any] = [after_seq]

        def arg(v: Any) -> str:
            params.append(v)
            return f"${len(params)}"

        if before_seq is not None:
            where.append(f"seq < {arg(before_seq)}")
        for col, val in (filters or {}).items():
            if col not in INDEXED_FIELDS:
                raise ValueError(f"cannot filter on {col}")
            where.append(f"{col} = {arg(_text(val))}")
        if since:
            where.append(f"ts >= {arg(since)}")
        if until:
            where.append(f"ts < {arg(until)}")
        order = "DESC" if descending else "ASC"
        sql = f"{self._sql['select']} WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT {arg(limit)}"
        return await self._records(await self._fetch(sql, *params))

    async def journal_payloads(self, seqs: list[int]) -> dict[int, bytes]:
        rows = await self._fetch(f"SELECT seq, record FROM {self._s}.journal WHERE seq = ANY($1::bigint[])", seqs)
        return {int(r[0]): bytes(r[1]) for r in rows}

    async def journal_scan(self, batch: int = 5000) -> AsyncIterator[StoredRecord]:  # type: ignore[override]
        after = (await self.journal_anchor())[0]
        sql = f"{self._sql['select']} WHERE seq > $1 ORDER BY seq LIMIT $2"
        while True:
            rows = await self._fetch(sql, after, batch)
            if not rows:
                return
            for r in await self._records(rows):
                yield r
            after = int(rows[-1][0])

    async def journal_archive(self, upto_seq: int) -> list[StoredRecord]:
        long = max(self.command_timeout, 300.0)

        async def go(conn: Any) -> list[StoredRecord]:
            await conn.execute(f"SELECT 1 FROM {self._s}.journal_meta WHERE id = 1 FOR UPDATE", timeout=long)
            rows = [self._record(r) for r in await conn.fetch(
                f"{self._sql['select']} WHERE seq <= $1 ORDER BY seq", upto_seq, timeout=long)]
            if rows:
                last = rows[-1]
                await conn.execute(f"DELETE FROM {self._s}.journal WHERE seq <= $1", last.seq, timeout=long)
                await conn.execute(f"UPDATE {self._s}.journal_meta SET anchor_seq = $1, anchor_hash = $2 WHERE id = 1",
                                   last.seq, last.hash)
            return rows

        return await self._write(go)

    async def journal_wait(self, after_seq: int, timeout: float) -> None:
        """Return once a record past ``after_seq`` was committed (LISTEN), or after ``timeout``."""
        try:
            await self._listen()
        except StoreUnavailable as exc:
            log.debug("journal LISTEN unavailable (%s); sleeping instead", exc)
            await asyncio.sleep(min(timeout, 1.0))
            return
        if self._notified > after_seq:
            return
        ev = asyncio.Event()
        self._waiters.add(ev)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiters.discard(ev)

    async def _listen(self) -> None:
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            self._listener = None
            if self._pool is None:
                raise StoreUnavailable("store is not open")
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self.connect_timeout,
                                             command_timeout=self.command_timeout)
                await conn.add_listener(self.channel, self._on_notify)
                # LISTEN is active from here on: the head read now plus the notifications miss nothing
                head = await conn.fetchval(f"SELECT head_seq FROM {self._s}.journal_meta WHERE id = 1")
            except asyncio.CancelledError:
                raise
            except self._unavailable as exc:
                raise self._fail(exc) from None
            conn.add_termination_listener(lambda _c: self._wake_all())
            self._listener = conn
            self._bump(int(head or 0))

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._bump(int(payload))
        except ValueError:
            self._wake_all()

    def _bump(self, seq: int) -> None:
        if seq > self._notified:
            self._notified = seq
            self._wake_all()

    def _wake_all(self) -> None:
        for ev in self._waiters:
            ev.set()

    # -- review items ---------------------------------------------------------------------------

    @property
    def _review_insert_sql(self) -> str:
        return (f"INSERT INTO {self._s}.review_items ({', '.join(_REVIEW_COLS)}, doc, summary, bytes) VALUES "
                f"({', '.join(f'${i}' for i in range(1, len(_REVIEW_COLS) + 4))})")

    @staticmethod
    def _review_params(row: PreparedRow) -> list[Any]:
        return [_text(v) if k in ("id", "state", "agent", "capability", "upstream") else v
                for k, v in zip(_REVIEW_COLS, row.cols)] + [row.doc, row.summary, row.size]

    async def review_insert(self, item: dict[str, Any]) -> None:
        row = prepare_review(item)
        async with self._conn() as conn:
            await conn.execute(self._review_insert_sql, *self._review_params(row))

    async def review_get(self, item_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(f"SELECT {', '.join(_REVIEW_COLS)}, doc FROM {self._s}.review_items WHERE id = $1",
                                 item_id)
        return from_row(_REVIEW_COLS, rows[0]) if rows else None

    async def review_list(self, *, state: str | None = None, agent: str | None = None,
                          capability: str | None = None, upstream: str | None = None,
                          older_than: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, params = ["TRUE"], []
        for col, val in (("state", state), ("agent", agent), ("capability", capability), ("upstream", upstream)):
            if val is not None:
                params.append(val)
                where.append(f"{col} = ${len(params)}")
        if older_than is not None:
            params.append(older_than)
            where.append(f"created_at <= ${len(params)}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {', '.join(_REVIEW_COLS)}, summary, CASE WHEN summary IS NULL THEN doc END "
            f"FROM {self._s}.review_items WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC LIMIT ${len(params)}", *params)
        return [summary_from_row(r) for r in rows]

    async def review_transition(self, item_id: str, expect: Iterable[str], to: str, updates: dict[str, Any], *,
                                unexpired_at: float | None = None) -> bool:
        return await self._transition("review_items", _REVIEW_COLS, item_id, expect, to, updates,
                                      unexpired_at=unexpired_at)

    async def _transition(self, table: str, cols: tuple[str, ...], row_id: str, expect: Iterable[str], to: str,
                          updates: dict[str, Any] | None, *, unexpired_at: float | None = None) -> bool:
        """Compare-and-set a row's state (SELECT ... FOR UPDATE, then UPDATE, one transaction)."""
        expect = list(expect)
        settable = [c for c in cols if c != "id"]
        alive = "" if unexpired_at is None else " AND (expires_at IS NULL OR expires_at > $3)"
        extra = () if unexpired_at is None else (unexpired_at,)

        async def go(conn: Any) -> bool:
            row = await conn.fetchrow(
                f"SELECT {', '.join(cols)}, doc FROM {self._s}.{table} "
                f"WHERE id = $1 AND state = ANY($2::text[]){alive} FOR UPDATE", row_id, expect, *extra)
            if row is None:
                return False
            new = advance(from_row(cols, row), to, updates)
            values, doc = _split(new, cols)
            sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(settable, start=1))
            await conn.execute(
                f"UPDATE {self._s}.{table} SET {sets}, doc = ${len(settable) + 1} WHERE id = ${len(settable) + 2}",
                *(_text(values[c]) if c in ("state", "agent", "capability", "upstream") else values[c]
                  for c in settable), doc, row_id)
            if table == "review_items" and summary_changed(updates):  # lists show the summary: keep it true
                await conn.execute(f"UPDATE {self._s}.review_items SET summary = $1 WHERE id = $2",
                                   summary_bytes(new), row_id)
            return True

        return bool(await self._write(go))

    async def review_count(self, state: str = "pending") -> int:
        rows = await self._fetch(f"SELECT COUNT(*) FROM {self._s}.review_items WHERE state = $1", state)
        return int(rows[0][0])

    async def review_usage(self, agent: str) -> tuple[int, int]:
        rows = await self._fetch(f"SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM {self._s}.review_items "
                                 f"WHERE agent = $1 AND state = 'pending'", _text(agent))
        return int(rows[0][0]), int(rows[0][1])

    async def review_due(self, now: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Pending items whose expiry has passed, oldest expiry first (proposed interface addition)."""
        rows = await self._fetch(
            f"SELECT {', '.join(_REVIEW_COLS)}, doc FROM {self._s}.review_items WHERE state = 'pending' "
            f"AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2", now, limit)
        return [from_row(_REVIEW_COLS, r) for r in rows]

    async def review_stats(self, agent: str, capability: str, since: float) -> dict[str, int]:
        rows = await self._fetch(
            f"SELECT state, doc FROM {self._s}.review_items WHERE agent = $1 AND capability = $2 AND updated_at >= $3",
            agent, capability, since)
        return _review_stats((r[0], bytes(r[1])) for r in rows)

    # -- transactions ---------------------------------------------------------------------------

    async def tx_insert(self, tx: dict[str, Any]) -> None:
        cols, doc = _split(tx, _TX_COLS)
        vals = [_text(v) if k in ("id", "state", "agent") else v for k, v in cols.items()]
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self._s}.transactions ({', '.join(_TX_COLS)}, doc) VALUES "
                f"({', '.join(f'${i}' for i in range(1, len(_TX_COLS) + 2))})", *vals, doc)

    async def tx_get(self, tx_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(f"SELECT {', '.join(_TX_COLS)}, doc FROM {self._s}.transactions WHERE id = $1", tx_id)
        return from_row(_TX_COLS, rows[0]) if rows else None

    async def tx_list(self, *, state: str | None = None, agent: str | None = None,
                      limit: int = 200) -> list[dict[str, Any]]:
        where, params = ["TRUE"], []
        if state is not None:
            params.append(state)
            where.append(f"state = ${len(params)}")
        if agent is not None:
            params.append(agent)
            where.append(f"agent = ${len(params)}")
        params.append(limit)
        rows = await self._fetch(
            f"SELECT {', '.join(_TX_COLS)}, doc FROM {self._s}.transactions WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC LIMIT ${len(params)}", *params)
        return [from_row(_TX_COLS, r) for r in rows]

    async def tx_count(self, state: str = "open") -> int:
        """How many transactions are in ``state`` (proposed interface addition: a gauge, not a list)."""
        rows = await self._fetch(f"SELECT COUNT(*) FROM {self._s}.transactions WHERE state = $1", state)
        return int(rows[0][0])

    async def tx_transition(self, tx_id: str, expect: Iterable[str], to: str,
                            updates: dict[str, Any] | None = None) -> bool:
        return await self._transition("transactions", _TX_COLS, tx_id, expect, to, updates)

    async def tx_due(self, now: float) -> list[dict[str, Any]]:
        rows = await self._fetch(
            f"SELECT {', '.join(_TX_COLS)}, doc FROM {self._s}.transactions WHERE state = 'open' "
            f"AND deadline IS NOT NULL AND deadline <= $1 ORDER BY deadline", now)
        return [from_row(_TX_COLS, r) for r in rows]

    async def step_insert(self, step: dict[str, Any]) -> int:
        step = dict(step)
        step.pop("id", None)
        cols = ("tx_id", "state", "created_at", "updated_at")
        doc = orjson.dumps({k: v for k, v in step.items() if k not in cols})
        async with self._conn() as conn:
            return int(await conn.fetchval(
                f"INSERT INTO {self._s}.tx_steps (tx_id, state, created_at, updated_at, doc) "
                f"VALUES ($1, $2, $3, $4, $5) RETURNING id",
                step["tx_id"], step["state"], step["created_at"], step.get("updated_at", step["created_at"]), doc))

    async def step_update(self, step_id: int, updates: dict[str, Any]) -> None:
        async def go(conn: Any) -> None:
            row = await conn.fetchrow(
                f"SELECT {', '.join(_STEP_COLS)}, doc FROM {self._s}.tx_steps WHERE id = $1 FOR UPDATE", step_id)
            if row is None:
                raise KeyError(step_id)
            step = from_row(_STEP_COLS, row)
            step.update(updates)
            step["updated_at"] = time.time()
            cols, doc = _split(step, _STEP_COLS)
            await conn.execute(f"UPDATE {self._s}.tx_steps SET state = $1, updated_at = $2, doc = $3 WHERE id = $4",
                               cols["state"], cols["updated_at"], doc, step_id)

        await self._write(go)

    async def steps_for(self, tx_id: str) -> list[dict[str, Any]]:
        rows = await self._fetch(
            f"SELECT {', '.join(_STEP_COLS)}, doc FROM {self._s}.tx_steps WHERE tx_id = $1 ORDER BY id", tx_id)
        return [from_row(_STEP_COLS, r) for r in rows]

    # -- governance -----------------------------------------------------------------------------

    async def promotion_add(self, row: dict[str, Any]) -> None:
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self._s}.promotions (agent, capability, mode, at, doc) VALUES ($1, $2, $3, $4, $5)",
                _text(row["agent"]), _text(row["capability"]), _text(row["mode"]), row["at"], orjson.dumps(row))

    async def promotions(self, *, agent: str | None = None, capability: str | None = None,
                         history: bool = False) -> list[dict[str, Any]]:
        where, params = ["TRUE"], []
        if agent is not None:
            params.append(agent)
            where.append(f"agent = ${len(params)}")
        if capability is not None:
            params.append(capability)
            where.append(f"capability = ${len(params)}")
        if history:
            sql = f"SELECT doc FROM {self._s}.promotions WHERE {' AND '.join(where)} ORDER BY id"
        else:
            sql = (f"SELECT doc FROM {self._s}.promotions WHERE id IN (SELECT MAX(id) FROM {self._s}.promotions "
                   f"WHERE {' AND '.join(where)} GROUP BY agent, capability) ORDER BY id")
        return [orjson.loads(r[0]) for r in await self._fetch(sql, *params)]

    async def quarantine_set(self, agent: str, row: dict[str, Any]) -> bool:
        epoch = row.get("epoch")
        async with self._conn() as conn:
            if epoch is None:
                won = await conn.fetchval(
                    f"INSERT INTO {self._s}.quarantine (agent, since, doc) VALUES ($1, $2, $3) "
                    f"ON CONFLICT (agent) DO NOTHING RETURNING agent",
                    agent, row.get("since", time.time()), orjson.dumps(row))
            else:  # judged on the counts of that epoch: a release since voids the judgement
                won = await conn.fetchval(
                    f"INSERT INTO {self._s}.quarantine (agent, since, doc) SELECT $1, $2, $3 "
                    f"WHERE COALESCE((SELECT epoch FROM {self._s}.gov_epochs WHERE agent = $1), 0) = $4 "
                    f"ON CONFLICT (agent) DO NOTHING RETURNING agent",
                    agent, row.get("since", time.time()), orjson.dumps(row), int(epoch))
            return won is not None

    async def quarantine_release(self, agent: str, by: str, reason: str) -> bool:
        async def go(conn: Any) -> bool:
            # the epoch row is locked first, as sli_sync does: a sync in flight finishes before the reset
            await conn.execute(
                f"INSERT INTO {self._s}.gov_epochs AS e (agent, epoch) VALUES ($1, 1) "
                f"ON CONFLICT (agent) DO UPDATE SET epoch = e.epoch + 1", agent)
            gone = await conn.fetchval(f"DELETE FROM {self._s}.quarantine WHERE agent = $1 RETURNING agent", agent)
            await conn.execute(f"DELETE FROM {self._s}.gov_sli WHERE agent = $1", agent)
            return gone is not None

        return bool(await self._write(go))

    async def quarantines(self) -> dict[str, dict[str, Any]]:
        rows = await self._fetch(f"SELECT agent, doc FROM {self._s}.quarantine")
        return {r[0]: orjson.loads(r[1]) for r in rows}

    # -- leases ---------------------------------------------------------------------------------

    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        """A row lease timed by the database server's clock (see the module doc for why not advisory locks)."""
        async with self._conn() as conn:
            won = await conn.fetchval(
                f"INSERT INTO {self._s}.leases AS l (name, holder, until) "
                f"VALUES ($1, $2, extract(epoch FROM clock_timestamp())::float8 + $3) "
                f"ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until "
                f"WHERE l.holder = excluded.holder OR l.until < extract(epoch FROM clock_timestamp())::float8 "
                f"RETURNING holder", name, holder, float(ttl))
            return won is not None

    async def lease_release(self, name: str, holder: str) -> None:
        async with self._conn() as conn:
            await conn.execute(f"DELETE FROM {self._s}.leases WHERE name = $1 AND holder = $2", name, holder)

    # -- many processes: rate-limit buckets, error-budget counts, quota, signals -----------------------

    async def bucket_take(self, reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]:
        """One UPDATE for every key (a second one, after creating full buckets, for keys seen for the first
        time). Refill, grant and the new level are computed in the SET from the row itself, so a row
        changed by a concurrent replica is re-evaluated on its new version (READ COMMITTED), and timed
        by the server's clock. Keys are sorted, so concurrent callers lock rows in the same order."""
        if not reqs:
            return []
        out: dict[str, tuple[float, float]] = {}
        todo = list(reqs)
        for attempt in (1, 2):
            cols = [list(c) for c in zip(*todo)]
            async with self._conn() as conn:
                rows = await conn.fetch(self._bucket_sql, *cols)
            for key, granted, left in rows:
                out[key] = (float(granted), float(left))
            todo = [r for r in todo if r[0] not in out]
            if not todo or attempt == 2:
                break
            async with self._conn() as conn:
                await conn.execute(
                    f"INSERT INTO {self._s}.rl_buckets (key, tokens, stamp) SELECT k, c, "
                    f"extract(epoch FROM clock_timestamp())::float8 FROM unnest($1::text[], $2::float8[]) AS r(k, c) "
                    f"ON CONFLICT (key) DO NOTHING", [r[0] for r in todo], [r[2] for r in todo])
        if todo:
            raise StoreUnavailable(f"{redact(self.url)}: rate-limit buckets {[r[0] for r in todo]} could not be read")
        return [out[r[0]] for r in reqs]

    @property
    def _bucket_sql(self) -> str:
        avail = "least(r.cap, b.tokens + greatest(0, n.t - b.stamp) * r.rate)"
        # the rows are locked in key order first (``locked``), whatever join order the planner picks for
        # the UPDATE: two replicas taking overlapping keys at once queue up instead of deadlocking
        return (f"WITH r AS (SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[], "
                f"$5::float8[]) AS r(key, rate, cap, need, want)), "
                f"locked AS (SELECT x.key FROM {self._s}.rl_buckets x JOIN r ON x.key = r.key "
                f"ORDER BY x.key FOR UPDATE OF x) "
                f"UPDATE {self._s}.rl_buckets AS b SET "
                f"tokens = CASE WHEN {avail} >= r.need THEN {avail} - least({avail}, r.want) ELSE {avail} END, "
                f"granted = CASE WHEN {avail} >= r.need THEN least({avail}, r.want) ELSE 0 END, "
                f"stamp = greatest(b.stamp, n.t) "
                f"FROM r, locked AS l, (SELECT extract(epoch FROM clock_timestamp())::float8 AS t) AS n "
                f"WHERE b.key = r.key AND l.key = b.key RETURNING b.key, b.granted, b.tokens")

    async def sli_sync(self, increments: list[tuple[str, int, float, str, int]], since: dict[str, float],
                       prune_before: float | None = None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        agents = sorted({i[0] for i in increments})

        async def go(conn: Any) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
            if agents:
                # one row lock per agent, in order: syncs of one agent are serialised, so the second sees
                # the first's counts (and a release, which takes the same lock, is never half seen)
                await conn.execute(
                    f"INSERT INTO {self._s}.gov_epochs (agent, epoch) SELECT unnest($1::text[]), 0 "
                    f"ON CONFLICT (agent) DO NOTHING", agents)
                await conn.execute(f"SELECT 1 FROM {self._s}.gov_epochs WHERE agent = ANY($1::text[]) "
                                   f"ORDER BY agent FOR UPDATE", agents)
                cols = [list(c) for c in zip(*increments)]
                await conn.execute(
                    f"INSERT INTO {self._s}.gov_sli AS g (agent, start, kind, n) "
                    f"SELECT i.agent, i.start, i.kind, SUM(i.n) FROM unnest($1::text[], $2::int[], $3::float8[], "
                    f"$4::text[], $5::bigint[]) AS i(agent, epoch, start, kind, n) "
                    f"JOIN {self._s}.gov_epochs e ON e.agent = i.agent AND e.epoch = i.epoch "
                    f"GROUP BY i.agent, i.start, i.kind "
                    f"ON CONFLICT (agent, start, kind) DO UPDATE SET n = g.n + excluded.n", *cols)
            if prune_before is not None:
                await conn.execute(f"DELETE FROM {self._s}.gov_sli WHERE start < $1", prune_before)
            totals: dict[str, dict[str, int]] = {}
            if since:
                names = list(since)
                for agent, kind, n in await conn.fetch(
                        f"SELECT s.agent, s.kind, SUM(s.n) FROM {self._s}.gov_sli s "
                        f"JOIN unnest($1::text[], $2::float8[]) AS w(agent, since) ON s.agent = w.agent "
                        f"WHERE s.start > w.since GROUP BY s.agent, s.kind", names, [since[a] for a in names]):
                    totals.setdefault(agent, {})[kind] = int(n)
            epochs = {a: int(e) for a, e in await conn.fetch(f"SELECT agent, epoch FROM {self._s}.gov_epochs")}
            return totals, epochs

        return await self._write(go)  # type: ignore[no-any-return]

    async def sli_epochs(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetch(f"SELECT agent, epoch FROM {self._s}.gov_epochs")}

    async def quota_update(self, upstream: str, doc: dict[str, Any], now: float) -> tuple[bool, float]:
        async def go(conn: Any) -> tuple[bool, float]:
            await conn.execute(
                f"INSERT INTO {self._s}.upstream_quota (upstream, updated_at, blocked_until, doc) "
                f"VALUES ($1, $2, 0, $3) ON CONFLICT (upstream) DO NOTHING", upstream, now, b"{}")
            prev = await conn.fetchval(
                f"SELECT blocked_until FROM {self._s}.upstream_quota WHERE upstream = $1 FOR UPDATE", upstream)
            prev = float(prev or 0.0)
            new = float(doc.get("blocked_until") or 0.0)
            until, started = (max(prev, new), False) if prev > now else (new, new > now)
            await conn.execute(
                f"UPDATE {self._s}.upstream_quota SET updated_at = $2, blocked_until = $3, doc = $4 WHERE upstream = $1",
                upstream, now, until, orjson.dumps({**doc, "blocked_until": until}))
            return started, until

        return await self._write(go)  # type: ignore[no-any-return]

    async def quota_states(self) -> dict[str, dict[str, Any]]:
        rows = await self._fetch(f"SELECT upstream, blocked_until, doc FROM {self._s}.upstream_quota")
        return {r[0]: {**orjson.loads(bytes(r[2])), "blocked_until": float(r[1])} for r in rows}

    async def signal(self, topic: str) -> None:
        async with self._conn() as conn:
            await conn.execute("SELECT pg_notify($1, $2)", self.gov_channel, topic[:200])

    async def watch(self, callback: Any) -> None:
        """LISTEN on the schema's governance channel on a dedicated connection, reconnecting when it
        drops (and then reporting ``None``: notifications may have been missed)."""
        self._watch_cb = callback
        if self._watch_task is None:
            self._watch_task = asyncio.ensure_future(self._watch_loop())

    async def _watch_loop(self) -> None:
        lost = asyncio.Event()
        first = True
        while True:
            lost.clear()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self.connect_timeout,
                                             command_timeout=self.command_timeout)
                await conn.add_listener(self.gov_channel,
                                        lambda _c, _p, _ch, payload: self._watch_cb(payload or None))
                conn.add_termination_listener(lambda _c: lost.set())
                self._watcher = conn
                if not first:
                    self._watch_cb(None)  # reconnected: whatever was signalled meanwhile is re-read
                first = False
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the server is away: try again shortly
                log.warning("governance LISTEN connection failed: %s", _describe(exc))
            self._watcher = None
            await asyncio.sleep(1.0)

    # -- introspection (tether store info) ------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        async with self._conn() as conn:
            server = await conn.fetchval("SHOW server_version")
            sync = await conn.fetchval("SHOW synchronous_commit")
            size = await conn.fetchval(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'", self.schema)
        return {"server_version": server, "synchronous_commit": sync, "schema": self.schema,
                "notify_channel": self.channel, "pool": {"min": self.pool_min, "max": self.pool_max},
                "bytes": int(size)}


class _Acquire:
    """``async with store._conn() as conn``: a pooled connection; outages become StoreUnavailable.

    A connection that failed is terminated rather than returned for reuse, and the pool's other
    connections are expired, so the next use opens fresh ones and nothing waits on a dead socket."""

    __slots__ = ("store", "conn")

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.conn: Any = None

    async def __aenter__(self) -> Any:
        pool = self.store._pool
        if pool is None:
            raise StoreUnavailable("store is not open")
        try:
            self.conn = await pool.acquire(timeout=self.store.connect_timeout + 1.0)
        except asyncio.CancelledError:
            raise
        except self.store._unavailable as exc:
            raise self.store._fail(exc) from None
        return self.conn

    async def __aexit__(self, et: Any, exc: BaseException | None, tb: Any) -> bool:
        conn, self.conn = self.conn, None
        pool = self.store._pool
        broken = exc is not None and _is_outage(exc)
        if broken or (exc is not None and isinstance(exc, asyncio.CancelledError)) or pool is None:
            _terminate(conn)
        if broken and pool is not None:
            # one dead connection usually means all of them (server restart, failover): replace every
            # pooled connection on its next use instead of finding them dead one request at a time
            await pool.expire_connections()
        if pool is not None:
            try:
                await pool.release(conn, timeout=self.store.command_timeout)
            except Exception:  # noqa: BLE001 - a connection that cannot be reset is dropped
                _terminate(conn)
        if exc is not None and isinstance(exc, self.store._unavailable) and not _is_integrity(exc):
            raise self.store._fail(exc) from None
        return False


def _terminate(conn: Any) -> None:
    """Drop a pooled connection now (a closed one was already handed back to the pool by asyncpg)."""
    try:
        conn.terminate()
    except Exception:  # noqa: BLE001 - already released or closed
        pass


def _is_integrity(exc: BaseException) -> bool:
    return asyncpg is not None and isinstance(exc, _pgx.IntegrityConstraintViolationError)


def _is_outage(exc: BaseException) -> bool:
    """Errors after which the connection cannot be trusted (as opposed to a failed statement)."""
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return True
    if asyncpg is None:  # pragma: no cover
        return False
    return isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError, _pgx.PostgresConnectionError,
                            _pgx.OperatorInterventionError))


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    msg = str(exc).strip()
    if isinstance(exc, asyncio.TimeoutError) and not msg:
        return "the server did not answer in time"
    return f"{name}: {msg}" if msg else name


__all__ = ["LATEST_VERSION", "PostgresStore", "parse_url", "redact"]
