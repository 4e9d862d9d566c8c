"""The store interface every backend implements, and nothing more.

What Tether must keep across a crash lives behind these methods: the journal (hash-chained), review
items, transactions with their compensation steps, promotions, quarantines and leases (so that a sweep
runs on one replica at a time) — and what makes several processes one gateway: shared rate-limit
buckets, error-budget counts, upstream quota blocks, and a signal that tells the others something changed. Rows cross the interface as plain dicts whose JSON columns are already
decoded, so the SQLite and PostgreSQL implementations are interchangeable and tested by one suite.

State changes that must happen exactly once (deciding a review item, moving a transaction from
``open`` to ``rolling_back``) are compare-and-set operations: they name the state they expect and
report whether they won, so two reviewers or two replicas racing cannot both succeed.
"""

from __future__ import annotations

import abc
from typing import Any, AsyncIterator, Callable, Iterable

from ..chain import StoredRecord, attach_intents, intents_wanted


class StoreUnavailable(Exception):
    """The store cannot be written or read right now (disk full, read-only, server down)."""


class Store(abc.ABC):
    kind: str = "abstract"
    description: str = ""
    migrated_from: int | None = None  # the schema version open() found before migrating (tether store migrate)

    # -- lifecycle ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def schema_version(self) -> int: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable if the store cannot answer (readiness)."""

    # -- journal --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def journal_append(self, payloads: list[bytes], columns: list[dict[str, Any]],
                             sides: list[tuple[str, dict[str, Any]]] | None = None, *,
                             durable: bool = True, inline: bool = False) -> list[tuple[int, str]]:
        """Append records atomically, extending the chain; returns [(seq, hash)], durable on return.

        ``sides`` are other rows committed in the same transaction (``("review_insert", PreparedRow)``: a
        captured dry-run write shares its intent record's commit, so capture costs one fsync, not two).
        Payloads and side rows arrive already serialised (:func:`proxy.chain.encode_record`,
        :func:`proxy.store.rows.prepare_review`), so nothing one request sent can fail the whole batch.

        ``durable=False`` (a batch nobody waits for: outcome records) lets the store skip the flush to
        stable storage; the records must still survive a crash of the gateway process (kill -9), and
        the next durable commit makes them durable too. A store may ignore it and always flush.

        ``inline=True``: the event loop has nothing else to serve (one request in flight), so an embedded
        store may do the append on the calling thread rather than hand it to its own thread and back (two
        context switches saved per commit on an idle gateway). A store may ignore it."""

    def journal_maintenance_due(self) -> bool:
        """Does the store want :meth:`journal_maintenance` run (by the journal writer, between two
        batches: never during a commit)? Default: never."""
        return False

    async def journal_maintenance(self) -> None:
        """Housekeeping that must not run during a commit but may run between two (SQLite: the last step
        of a WAL checkpoint). Default: nothing."""

    @abc.abstractmethod
    async def journal_head(self) -> tuple[int, str]:
        """(seq, hash) of the last record, or (anchor_seq, anchor_hash) when empty."""

    @abc.abstractmethod
    async def journal_anchor(self) -> tuple[int, str]:
        """The chain's starting point: (0, GENESIS), or the last archived record's (seq, hash)."""

    @abc.abstractmethod
    async def journal_query(
        self,
        *,
        after_seq: int = 0,
        before_seq: int | None = None,
        limit: int = 1000,
        filters: dict[str, Any] | None = None,
        since: str | None = None,
        until: str | None = None,
        descending: bool = False,
    ) -> list[StoredRecord]:
        """Records in sequence order with optional equality filters on indexed columns."""

    @abc.abstractmethod
    def journal_scan(self, batch: int = 5000) -> AsyncIterator[StoredRecord]:
        """Every record from the anchor on, in order (for verify)."""

    @abc.abstractmethod
    async def journal_payloads(self, seqs: list[int]) -> dict[int, bytes]:
        """seq -> stored payload of those records still in the store (the intent records compact outcomes
        refer to: :meth:`with_intents`)."""

    async def with_intents(self, rows: list[StoredRecord]) -> list[StoredRecord]:
        """Give each compact outcome among ``rows`` its intent record (from ``rows``, else fetched in one
        query), so that ``record()`` expands it whole. Every read of the journal goes through here."""
        missing = intents_wanted(rows)
        if missing:
            attach_intents(rows, await self.journal_payloads(missing))
        return rows

    @abc.abstractmethod
    async def journal_archive(self, upto_seq: int) -> list[StoredRecord]:
        """Remove records up to ``upto_seq`` (returned, for the archive file) and move the anchor."""

    async def journal_wait(self, after_seq: int, timeout: float) -> None:
        """Wait until a record past ``after_seq`` may exist (tail -f). Default: sleep."""
        import asyncio

        await asyncio.sleep(min(timeout, 0.2))

    # -- review items ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def review_get(self, item_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def review_insert(self, item: dict[str, Any]) -> None:
        """Insert a new item; raises :class:`proxy.store.rows.Unstorable` for a value JSON cannot hold."""

    @abc.abstractmethod
    async def review_list(self, *, state: str | None = None, agent: str | None = None,
                          capability: str | None = None, upstream: str | None = None,
                          older_than: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Summaries, newest first: the item's columns plus :data:`proxy.store.rows.SUMMARY_FIELDS` and
        the request line (``request``: method, path, query, content type, body size) — never headers or
        bodies, so a list costs the same whatever the agents captured."""

    @abc.abstractmethod
    async def review_transition(self, item_id: str, expect: Iterable[str], to: str,
                                updates: dict[str, Any], *, unexpired_at: float | None = None) -> bool:
        """Compare-and-set the item's state; True when this caller won. With ``unexpired_at``, an item
        whose ``expires_at`` is at or before that time does not match either (a decision racing the TTL)."""

    @abc.abstractmethod
    async def review_count(self, state: str = "pending") -> int: ...

    @abc.abstractmethod
    async def review_usage(self, agent: str) -> tuple[int, int]:
        """(count, stored bytes) of the agent's pending items (the per-agent caps on the review queue)."""

    @abc.abstractmethod
    async def review_due(self, now: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Pending items whose ``expires_at`` has passed, oldest expiry first (the expiry sweep)."""

    @abc.abstractmethod
    async def review_stats(self, agent: str, capability: str, since: float) -> dict[str, int]:
        """Counts of decided items for a grant: approved, approved_edited, rejected, replay_failed, ..."""

    # -- transactions ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def tx_insert(self, tx: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def tx_get(self, tx_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def tx_list(self, *, state: str | None = None, agent: str | None = None,
                      limit: int = 200) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def tx_count(self, state: str = "open") -> int:
        """How many transactions are in ``state`` (a gauge: no rows are loaded)."""

    @abc.abstractmethod
    async def tx_transition(self, tx_id: str, expect: Iterable[str], to: str,
                            updates: dict[str, Any] | None = None) -> bool: ...

    @abc.abstractmethod
    async def tx_due(self, now: float) -> list[dict[str, Any]]:
        """Open transactions whose deadline has passed."""

    @abc.abstractmethod
    async def step_insert(self, step: dict[str, Any]) -> int:
        """Add a compensation step; returns its id. Durable on return."""

    @abc.abstractmethod
    async def step_update(self, step_id: int, updates: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def steps_for(self, tx_id: str) -> list[dict[str, Any]]: ...

    # -- governance -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def promotion_add(self, row: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def promotions(self, *, agent: str | None = None, capability: str | None = None,
                         history: bool = False) -> list[dict[str, Any]]:
        """Latest promotion per (agent, capability), or every promotion with ``history``."""

    @abc.abstractmethod
    async def quarantine_set(self, agent: str, row: dict[str, Any]) -> bool:
        """Quarantine an agent; False if it already was, or if ``row["epoch"]`` is given and is no longer
        the agent's error-budget epoch (the counts that tipped it were voided by a release since)."""

    @abc.abstractmethod
    async def quarantine_release(self, agent: str, by: str, reason: str) -> bool:
        """Lift a quarantine (True if there was one) and restart the agent's error-budget window for
        every process: its shared counts are dropped and its epoch moves on, in the same transaction."""

    @abc.abstractmethod
    async def quarantines(self) -> dict[str, dict[str, Any]]:
        """Agents currently quarantined."""

    # -- leases ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def try_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Hold a named lease (sweeps run on one replica at a time)."""

    @abc.abstractmethod
    async def lease_release(self, name: str, holder: str) -> None:
        """Give a lease up (its row goes: per-transaction leases must not pile up)."""

    # -- many processes (workers and replicas are one gateway) ---------------------------------------
    @abc.abstractmethod
    async def bucket_take(self, reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]:
        """Shared token buckets. For each ``(key, rate per second, capacity, need, want)`` (keys sorted,
        distinct): refill by the time passed (the store's clock), then take ``want`` tokens (or all there
        are, if fewer) when at least ``need`` are there, else none. Returns ``(granted, tokens left)``
        per key. Atomic per call: a process leases tokens this way and spends them locally."""

    @abc.abstractmethod
    async def sli_sync(self, increments: list[tuple[str, int, float, str, int]], since: dict[str, float],
                       prune_before: float | None = None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """Add error-budget counts ``(agent, epoch, bucket start, kind, n)`` — those of a stale epoch are
        dropped — then return every process's totals per agent and kind over buckets starting after
        ``since[agent]``, and every agent's epoch. Serialised per agent, so two processes syncing at
        once see each other's counts. ``prune_before`` drops buckets older than that."""

    @abc.abstractmethod
    async def sli_epochs(self) -> dict[str, int]:
        """Each agent's error-budget epoch (moved on by each release; absent means 0)."""

    @abc.abstractmethod
    async def quota_update(self, upstream: str, doc: dict[str, Any], now: float) -> tuple[bool, float]:
        """Store what an upstream last said about its quota. A block (``doc["blocked_until"]``) only ends
        by expiring: a stored one still in force is kept or extended, never shortened. Returns (whether
        this call started a new block, the block in force)."""

    @abc.abstractmethod
    async def quota_states(self) -> dict[str, dict[str, Any]]:
        """The stored quota state per upstream."""

    @abc.abstractmethod
    async def signal(self, topic: str) -> None:
        """Tell every process sharing the store that shared governance state changed (promptly)."""

    @abc.abstractmethod
    async def watch(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(topic or None)`` on every signal from any process (None: something changed,
        or signals may have been missed: re-read everything). Runs until :meth:`close`."""
