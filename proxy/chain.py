"""The journal's hash chain: how a record's hash is computed and how a chain is checked.

Each record is stored as its canonical JSON (``orjson`` with sorted keys) together with its sequence
number, the previous record's hash and its own hash::

    hash = sha256( prev_hash || "\\n" || seq || "\\n" || canonical_json )

so editing a record's content, reordering, inserting or deleting one breaks the chain at that point.
Both stores (SQLite, PostgreSQL) assign ``seq`` and ``prev_hash`` inside the same database transaction
that inserts the record, so concurrent writers — even several gateway processes — extend one chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import orjson

GENESIS = "0" * 64

# Columns copied out of the record for filtering; verify checks that they still equal the record.
INDEXED_FIELDS = ("ts", "kind", "request_id", "agent", "on_behalf_of", "capability", "decision")


def canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(prev_hash: str, seq: int, payload: bytes) -> str:
    h = hashlib.sha256()
    h.update(prev_hash.encode("ascii"))
    h.update(b"\n")
    h.update(str(seq).encode("ascii"))
    h.update(b"\n")
    h.update(payload)
    return h.hexdigest()


def link(head_seq: int, head_hash: str, payloads: list[bytes]) -> list[tuple[int, str, str]]:
    """Extend a chain whose last record is (head_seq, head_hash): [(seq, prev_hash, hash), ...]."""
    out = []
    seq, prev = head_seq, head_hash
    for p in payloads:
        seq += 1
        h = record_hash(prev, seq, p)
        out.append((seq, prev, h))
        prev = h
    return out


@dataclass(slots=True)
class StoredRecord:
    seq: int
    prev_hash: str
    hash: str
    payload: bytes
    columns: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return orjson.loads(self.payload)


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    checked: int
    first_seq: int | None
    last_seq: int | None
    broken_seq: int | None = None
    problem: str | None = None


def verify_chain(rows: Iterable[StoredRecord], anchor_seq: int = 0, anchor_hash: str = GENESIS) -> VerifyResult:
    """Walk rows in sequence order from an anchor (GENESIS, or the last archived record)."""
    expect_seq, prev = anchor_seq, anchor_hash
    checked = 0
    first: int | None = None
    for row in rows:
        expect_seq += 1
        if first is None:
            first = row.seq
        if row.seq != expect_seq:
            return VerifyResult(False, checked, first, row.seq, expect_seq,
                                f"record {expect_seq} is missing (next present is {row.seq})")
        if row.prev_hash != prev:
            return VerifyResult(False, checked, first, row.seq, row.seq,
                                f"record {row.seq} does not link to record {row.seq - 1} (prev_hash differs)")
        if record_hash(prev, row.seq, row.payload) != row.hash:
            return VerifyResult(False, checked, first, row.seq, row.seq,
                                f"record {row.seq} was altered (its hash does not match its content)")
        try:
            rec = orjson.loads(row.payload)
        except orjson.JSONDecodeError:
            return VerifyResult(False, checked, first, row.seq, row.seq, f"record {row.seq} is not JSON")
        for col in INDEXED_FIELDS:
            if col in row.columns and row.columns[col] != rec.get(col):
                return VerifyResult(False, checked, first, row.seq, row.seq,
                                    f"record {row.seq}: column {col!r} was altered "
                                    f"({row.columns[col]!r} but the record says {rec.get(col)!r})")
        prev = row.hash
        checked += 1
    return VerifyResult(True, checked, first, expect_seq if checked else None)
