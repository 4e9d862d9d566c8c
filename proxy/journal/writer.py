"""The audit journal: group-committed, hash-chained, mirrored, readable.

:class:`JournalWriter` owns the write path. ``await write(record)`` returns once the record is durable
in the store (the gateway awaits this before forwarding anything); ``submit(record)`` queues a record
whose durability the caller does not wait for (outcomes, after the response). A single background task
drains the queue: every record that arrived while the previous batch was committing goes into the next
batch, so under load many requests share one commit (group commit) while an idle gateway commits a
lone record at once — there is no timer to wait for.

A batch that nobody waits for (only outcomes) is committed without an fsync of its own: it reaches the
operating system (so it survives kill -9 of the gateway) and the next awaited commit's fsync makes it
power-safe too. When the gateway has no other request to serve (``quiet``), the store may commit on the
event loop's own thread: an idle gateway's lone request then costs no thread round trip.

If the store cannot commit, every waiter in the batch gets :class:`JournalUnavailable` (the gateway
answers 503 ``journal_unavailable`` and forwards nothing); the next batch simply tries again, so the
gateway recovers by itself when the store comes back.

Every record (and a captured review row riding along) is serialised by the caller, *before* it joins
the queue: a batch carries only bytes, so what one agent sent (a header that is not UTF-8, a claim
JSON cannot hold) can never make a commit fail for the records of others. A value JSON cannot hold is
stored escaped and named in the record's ``escaped`` list (:func:`proxy.chain.encode_record`); a
review row must be stored exactly, so the caller refuses that one request instead
(:func:`proxy.store.rows.prepare_review`).

Records follow a fixed schema (like OPA decision logs): see :func:`base_record`. Redactions are listed
in the record (``redacted``), never silently applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson

from ..chain import (
    INDEXED_FIELDS,
    StoredRecord,
    VerifyResult,
    canonical,
    encode_record,
    intents_wanted,
    verify_chain,
)
from ..store.base import Store, StoreUnavailable
from ..store.rows import PreparedRow

if TYPE_CHECKING:
    from .checkpoint import Signer

log = logging.getLogger("tether.journal")

REDACTED = "[redacted]"


class JournalUnavailable(Exception):
    """The record could not be committed; nothing may be forwarded."""


_ISO_CACHE: list[Any] = [-1, ""]


def now_iso(t: float | None = None) -> str:
    """RFC 3339 UTC with microseconds: sortable as text. The seconds part is formatted once per second
    (this runs twice per request)."""
    if t is None:
        t = time.time()
    sec = int(t)
    if _ISO_CACHE[0] != sec:
        _ISO_CACHE[0] = sec
        _ISO_CACHE[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_ISO_CACHE[1]}.{int((t - sec) * 1_000_000):06d}Z"


_FIXED = dict.fromkeys(("request_id", "agent", "on_behalf_of", "intent", "capability", "upstream", "method", "path",
                         "decision", "reason"))


def base_record(kind: str, **fields: Any) -> dict[str, Any]:
    """A record with the fixed fields present (None where not applicable)."""
    rec: dict[str, Any] = {"ts": now_iso(), "kind": kind, **_FIXED}
    rec.update(fields)
    return rec


# (canonical payload, indexed columns, future of a waiting caller or None, side row or None,
#  the record whole for the mirror or None)
_Entry = tuple[bytes, dict[str, Any], "asyncio.Future[int] | None", "tuple[str, PreparedRow] | None", "bytes | None"]


def mirror_line(seq: int, h: str, payload: bytes) -> bytes:
    """One JSON line of the mirror: ``{"seq": .., "hash": .., <the record's fields>}`` spliced from the
    record's canonical JSON: for a record stored whole, exactly the bytes the chain hashed; for one
    stored compact (:mod:`proxy.compact`), the record whole (its chain hash is over the compact form)."""
    head = b'{"seq":%d,"hash":"%s"' % (seq, h.encode("ascii"))
    return head + (b"}" if payload == b"{}" else b"," + payload[1:]) + b"\n"


class JournalWriter:
    def __init__(self, store: Store, *, max_batch: int = 256, mirror_file: str | os.PathLike[str] | None = None,
                 on_commit: Callable[[float, int], None] | None = None,
                 quiet: Callable[[], bool] | None = None, signer: "Signer | None" = None,
                 checkpoint_interval: float = 60.0,
                 checkpoint_file: str | os.PathLike[str] | None = None) -> None:
        """``quiet``: True when the event loop has no other request to serve; the store may then commit
        on the loop's own thread (see ``Store.journal_append(inline=...)``).

        ``signer``: signs a checkpoint of the chain head (:mod:`proxy.journal.checkpoint`) after a commit at most
        every ``checkpoint_interval`` seconds and when the writer closes; each goes to the mirror and to
        ``checkpoint_file`` (appended and fsynced), outside the store."""
        self.store = store
        self.signer = signer
        self._cp_interval = checkpoint_interval
        self._cp_file = Path(checkpoint_file) if checkpoint_file else None
        self._cp_last = 0.0
        self._cp_head: tuple[int, str] | None = None  # the last head committed by this writer, not yet signed
        self._cp_task: asyncio.Task[None] | None = None
        self._quiet = quiet
        self.max_batch = max_batch
        self._queue: list[_Entry] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._mirror_path = Path(mirror_file) if mirror_file else None
        self._mirror: Any = None
        self._on_commit = on_commit
        self.healthy = True
        self.last_error: str | None = None
        self.committed = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: list[asyncio.Event] = []

    def start(self) -> None:
        if self._mirror_path is not None:
            self._mirror_path.parent.mkdir(parents=True, exist_ok=True)
            self._mirror = open(self._mirror_path, "ab", buffering=0)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="journal-writer")

    async def write(self, record: dict[str, Any], side: tuple[str, PreparedRow] | None = None) -> int:
        """Queue a record and wait until it is durable. Returns its sequence number.

        ``side``: a row committed in the same transaction (a captured review item, prepared)."""
        if self._closing and self._task is None:
            raise JournalUnavailable("the journal is closed")
        payload, columns = encode_record(record)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, columns, fut, side, self._view(record, payload)))
        self._idle.clear()
        self._wakeup.set()
        return await fut

    def enqueue(self, record: dict[str, Any]) -> "asyncio.Future[int]":
        """Queue a record to be committed durably (as :meth:`write`) and return the future of its sequence
        number at once: the caller does other work while the commit runs (a read is forwarded meanwhile)
        and awaits the future before anything of its answer is released."""
        if self._closing and self._task is None:
            raise JournalUnavailable("the journal is closed")
        payload, columns = encode_record(record)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, columns, fut, None, self._view(record, payload)))
        self._idle.clear()
        self._wakeup.set()
        return fut

    def submit(self, record: dict[str, Any], intent: dict[str, Any] | None = None) -> None:
        """Queue a record without waiting (its loss on a crash is acceptable: e.g. an outcome).

        ``intent``: an outcome's intent record as it was written; the outcome is then stored without the
        fields it shares with it (:mod:`proxy.compact`), and readers get them back from the intent."""
        payload, columns = encode_record(record, intent)
        self._queue.append((payload, columns, None, None, self._view(record, payload)))
        self._idle.clear()
        self._wakeup.set()

    def _view(self, record: dict[str, Any], payload: bytes) -> bytes | None:
        """What the mirror shows of a record (only when there is a mirror): the record whole, as readers
        of the store see it, even when it is stored compact — a log shipper cannot expand it."""
        if self._mirror_path is None:
            return None
        try:
            return canonical(record)
        except TypeError:
            return payload  # stored whole, escaped (encode_record): show exactly that

    def subscribe(self) -> asyncio.Event:
        """An event set after each commit (tail -f from inside the process, SSE)."""
        ev = asyncio.Event()
        self._listeners.append(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        if ev in self._listeners:
            self._listeners.remove(ev)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            await self._commit(batch)
            if self.store.journal_maintenance_due():
                await self._maintain()

    async def _maintain(self) -> None:
        """The store's housekeeping (SQLite: a WAL checkpoint's last step), between two batches: after
        the waiters of the last one were answered, before the next one is committed."""
        try:
            await self.store.journal_maintenance()
        except (StoreUnavailable, Exception) as exc:  # noqa: BLE001 - housekeeping never fails a commit
            log.warning("journal store housekeeping failed (tried again later): %s", exc)

    async def _commit(self, batch: list["_Entry"]) -> None:
        payloads = [e[0] for e in batch]
        columns = [e[1] for e in batch]
        sides = [e[3] for e in batch if e[3] is not None]
        # a batch nobody waits for (outcomes, overload refusals) is committed without the fsync: it
        # still survives kill -9, and the next awaited commit's fsync makes it power-safe too
        durable = any(e[2] is not None for e in batch)
        t0 = time.perf_counter()
        try:
            result = await self.store.journal_append(payloads, columns, sides or None, durable=durable,
                                                     inline=self._quiet is not None and self._quiet())
        except asyncio.CancelledError:
            for e in batch:
                fut = e[2]
                if fut is not None and not fut.done():
                    fut.set_exception(JournalUnavailable("the journal writer stopped"))
            raise
        except (StoreUnavailable, Exception) as exc:  # noqa: BLE001 - any failure means "not durable"
            self.healthy = False
            self.last_error = str(exc)
            log.error("journal commit failed; %d record(s) refused: %s", len(batch), exc)
            err = JournalUnavailable(str(exc))
            for e in batch:
                fut = e[2]
                if fut is not None and not fut.done():
                    fut.set_exception(err)
            return
        if not self.healthy:
            log.warning("journal store is writable again")
        self.healthy = True
        self.last_error = None
        self.committed += len(batch)
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - t0, len(batch))
        if self._mirror is not None:
            try:
                self._mirror.write(b"".join(mirror_line(seq, h, e[4] or e[0]) for e, (seq, h) in zip(batch, result)))
            except OSError as exc:
                log.error("journal mirror write failed: %s", exc)
        for e, (seq, _) in zip(batch, result):
            fut = e[2]
            if fut is not None and not fut.done():
                fut.set_result(seq)
        for ev in self._listeners:
            ev.set()
        if self.signer is not None and result:
            self._cp_head = result[-1]
            if time.monotonic() - self._cp_last >= self._cp_interval and (self._cp_task is None or self._cp_task.done()):
                self._cp_task = asyncio.get_running_loop().create_task(self._checkpoint(), name="journal-checkpoint")

    async def _checkpoint(self) -> dict[str, Any] | None:
        """Sign the last head this writer committed; write it to the mirror and the checkpoint file (the
        file's fsync runs on a thread, off the event loop)."""
        head = self._cp_head
        if self.signer is None or head is None:
            return None
        self._cp_last = time.monotonic()
        self._cp_head = None
        cp = self.signer.sign(head[0], head[1], now_iso())
        line = orjson.dumps(cp) + b"\n"
        try:
            if self._mirror is not None:
                self._mirror.write(line)
            if self._cp_file is not None:
                from .checkpoint import append_line

                await asyncio.to_thread(append_line, self._cp_file, cp)
        except OSError as exc:
            log.error("journal checkpoint could not be written: %s", exc)
        return cp

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is committed (or failed)."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
            self._task = None
        if self._cp_task is not None:
            await asyncio.gather(self._cp_task, return_exceptions=True)
        if self._cp_head is not None:
            await self._checkpoint()  # the head at stop is signed too
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None


# --------------------------------------------------------------------------- reading


async def verify(store: Store, note: Callable[[StoredRecord], None] | None = None) -> VerifyResult:
    """Walk the whole chain from its anchor in bounded batches; then check the recorded head, which
    catches a deleted tail (the chain alone cannot). ``note`` sees every record walked (checkpoints
    look up the hashes they vouch for on the way)."""
    seq, prev = await store.journal_anchor()
    checked, first = 0, None
    batch: list[StoredRecord] = []

    def check() -> VerifyResult:
        nonlocal seq, prev, checked, first
        res = verify_chain(batch, seq, prev)
        res.checked += checked
        if first is None:
            first = res.first_seq
        res.first_seq = first
        if res.ok and batch:
            seq, prev = batch[-1].seq, batch[-1].hash
        checked = res.checked
        batch.clear()
        return res

    async for r in store.journal_scan():
        if note is not None:
            note(r)
        batch.append(r)
        if len(batch) >= 5000:
            res = check()
            if not res.ok:
                return res
    res = check()
    if not res.ok:
        return res
    head_seq, head_hash = await store.journal_head()
    if (head_seq, head_hash) != (seq, prev):
        what = (f"records {seq + 1}..{head_seq} are missing (the head says {head_seq})" if head_seq > seq
                else f"the recorded chain head ({head_seq}) does not match the last record ({seq})")
        return VerifyResult(False, checked, first, seq, seq + 1, what)
    return VerifyResult(True, checked, first, seq if checked else None)


# (record field, label) in the order a human line shows them, after agent and on-behalf-of
_LINE_FIELDS = (("capability", "capability"), ("decision", "decision"), ("reason", "reason"), ("status", "status"),
                ("latency_ms", "latency_ms"), ("tx", "tx"), ("reviewer", "reviewer"), ("review_item", "item"),
                ("request_id", "request_id"))


def human_line(seq: int, rec: dict[str, Any]) -> str:
    """``agent=… | on_behalf_of=… | intent="…" | capability=… | action=PATCH /… | decision=live | status=204``"""
    parts = [f"#{seq}", rec.get("ts", "")]
    if rec.get("kind") not in ("request", "outcome"):
        parts.append(f"event={rec.get('kind')}")
    parts.append(f"agent={rec.get('agent') or '-'}")
    parts.append(f"on_behalf_of={rec.get('on_behalf_of') or '-'}")
    if rec.get("intent") is not None:
        parts.append(f'intent="{rec["intent"]}"')
    for field, label in _LINE_FIELDS[:1]:
        if rec.get(field):
            parts.append(f"{label}={rec[field]}")
    if rec.get("method"):
        parts.append(f"action={rec['method']} {rec.get('path') or ''}")
    for field, label in _LINE_FIELDS[1:]:
        if rec.get(field) not in (None, ""):
            parts.append(f"{label}={rec[field]}")
    if rec.get("on_behalf_of_proof"):  # the human verified by the IdP, or only asserted by the agent's token
        parts.append(f"on_behalf_of_proof={rec['on_behalf_of_proof']}")
    return " | ".join(p for p in parts if p)


# --------------------------------------------------------------------------- retention


def archive_line(r: StoredRecord) -> bytes:
    """One archived record: the exact payload bytes are kept so the chain stays verifiable."""
    return orjson.dumps({"seq": r.seq, "prev_hash": r.prev_hash, "hash": r.hash,
                         "payload": r.payload.decode("utf-8")}) + b"\n"


async def archive(store: Store, archive_dir: str | os.PathLike[str], *, older_than: float | None = None,
                  keep_records: int | None = None, now: float | None = None) -> Path | None:
    """Move old records to ``archive_dir/journal-<first>-<last>.jsonl`` and advance the chain's anchor.

    The file is written and fsynced *before* the records leave the store, so a crash between the two
    steps leaves the records in both places (the next run supersedes the partial file), never in none.
    Returns the archive file, or None when nothing was old enough."""
    head_seq, _ = await store.journal_head()
    anchor_seq, _ = await store.journal_anchor()
    upto = anchor_seq
    if keep_records is not None:
        upto = max(upto, head_seq - keep_records)
    if older_than is not None:
        cutoff = now_iso((now if now is not None else time.time()) - older_than)
        last_old = await store.journal_query(after_seq=anchor_seq, until=cutoff, descending=True, limit=1)
        if last_old:
            upto = max(upto, last_old[0].seq)
    if upto <= anchor_seq:
        return None
    rows = await store.journal_query(after_seq=anchor_seq, before_seq=upto + 1, limit=upto - anchor_seq)
    if not rows:
        return None
    folder = Path(archive_dir)
    folder.mkdir(parents=True, exist_ok=True)
    first, last = rows[0].seq, rows[-1].seq
    for stale in folder.glob(f"journal-{first:012d}-*.jsonl"):
        stale.unlink()  # an earlier attempt that crashed before its records left the store
    final = folder / f"journal-{first:012d}-{last:012d}.jsonl"
    tmp = final.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for r in rows:
            f.write(archive_line(r))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    removed = await store.journal_archive(last)
    if not removed or removed[-1].hash != rows[-1].hash:
        log.error("archive of records %d..%d: the store's records changed while archiving", first, last)
    return final


def read_archive(path: str | os.PathLike[str]) -> list[StoredRecord]:
    """The records of one archive file; a compact outcome is given its intent record when that is in the
    same file (else ``record()`` leaves its inherited fields null: the intent is in an earlier file)."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                d = orjson.loads(line)
                payload = d["payload"].encode("utf-8")
                out.append(StoredRecord(seq=d["seq"], prev_hash=d["prev_hash"], hash=d["hash"], payload=payload,
                                        columns={}))
    intents_wanted(out)  # attaches those in this file
    for r in out:
        rec = r.record()
        r.columns = {k: rec.get(k) for k in INDEXED_FIELDS}
    return out


def verify_archives(folder: str | os.PathLike[str]) -> tuple[VerifyResult, tuple[int, str]]:
    """Verify the archive files of a folder as one chain from GENESIS; returns the result and the last
    (seq, hash), which must be the store's anchor."""
    from ..chain import GENESIS

    seq, prev = 0, GENESIS
    checked = 0
    for path in sorted(Path(folder).glob("journal-*.jsonl")):
        rows = read_archive(path)
        res = verify_chain(rows, seq, prev)
        if not res.ok:
            res.problem = f"{path.name}: {res.problem}"
            res.checked += checked
            return res, (seq, prev)
        checked += res.checked
        if rows:
            seq, prev = rows[-1].seq, rows[-1].hash
    return VerifyResult(True, checked, 1 if checked else None, seq if checked else None), (seq, prev)
