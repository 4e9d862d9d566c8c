"""The journal's hash chain: how a record's hash is computed and how a chain is checked.

Each record is stored as canonical JSON (``orjson`` with sorted keys) — request and outcome records in
their compact form (:mod:`proxy.compact`), read back whole by :meth:`StoredRecord.record` — together
with its sequence number and its hash::

    hash = sha256( prev_hash || "\\n" || seq || "\\n" || canonical_json )

where ``prev_hash`` is the hash of the record before (GENESIS for the first), so editing a record's
content, reordering, inserting or deleting one breaks the chain at that point. Rows store their own
hash only (rows written before the compact form also kept ``prev_hash``); the stores fill
``StoredRecord.prev_hash`` in from the row before when they read. Both stores (SQLite, PostgreSQL)
assign ``seq`` and link to the head inside the same database transaction that inserts the record, so
concurrent writers — even several gateway processes — extend one chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import orjson

from .compact import compact, expand, refers_to

GENESIS = "0" * 64

# Columns copied out of the record for filtering; verify checks that they still equal the record.
INDEXED_FIELDS = ("ts", "kind", "request_id", "agent", "on_behalf_of", "capability", "decision")


def canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


# --------------------------------------------------------------------------- values JSON cannot hold

INT_MIN, INT_MAX = -(2 ** 63), 2 ** 64 - 1  # the integers orjson writes exactly
_INF = (float("inf"), float("-inf"))


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def unrepresentable(value: Any, path: str = "") -> tuple[str, str] | None:
    """(field path, why) of the first value JSON cannot carry exactly from one parser to another (and
    orjson cannot write), or None. Lone surrogates arrive from ``\\ud800`` escapes and from header bytes
    that are not UTF-8 (aiohttp keeps them as surrogate escapes)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _has_surrogate(v):
                return p, "holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
        elif v is None or isinstance(v, bool):
            continue
        elif isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                return p, "is an integer outside the 64-bit range"
        elif isinstance(v, float):
            if v != v or v in _INF:
                return p, "is a number too large to be read the same way everywhere"
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or (not k.isascii() and _has_surrogate(k)):
                    return (p or "(body)"), f"has a key {k!r} that is not Unicode text"
                stack.append((x, f"{p}.{k}" if p else k))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{p}[{i}]") for i, x in enumerate(v))
        else:
            return p, f"is a {type(v).__name__}, which JSON has no word for"
    return None


def lenient(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy JSON can hold, and the paths of what had to be escaped to get it: a string with lone
    surrogates keeps them as ``\\udcff`` text, an out-of-range number becomes its decimal text, a
    non-string key its ``str``, anything else its ``repr``. For records and updates that must be kept
    whatever an agent or upstream put in them; the escapes are listed, never silent."""
    escaped: list[str] = []

    def text(v: str) -> str:
        return v.encode("utf-8", "backslashreplace").decode("utf-8")

    def walk(v: Any, p: str) -> Any:
        if isinstance(v, str):
            if not v.isascii() and _has_surrogate(v):
                escaped.append(p)
                return text(v)
            return v
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            if INT_MIN <= v <= INT_MAX:
                return v
            escaped.append(p)
            return str(v)
        if isinstance(v, float):
            if v != v or v in _INF:
                escaped.append(p)
                return repr(v)
            return v
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                key = k
                if not isinstance(k, str):
                    key = str(k)
                elif not k.isascii() and _has_surrogate(k):
                    key = text(k)
                kp = f"{p}.{key}" if p else key
                if key is not k:
                    escaped.append(kp)
                out[key] = walk(x, kp)
            return out
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{p}[{i}]") for i, x in enumerate(v)]
        escaped.append(p)
        return repr(v)

    return walk(value, path), escaped


def encode_record(record: dict[str, Any], intent: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """(canonical payload, indexed column values) of a journal record; never fails.

    A request or outcome record is stored in its compact form (:mod:`proxy.compact`; ``intent``: an
    outcome's intent record as written, whose fields it then need not repeat); the columns always hold
    the full record's values. The common case is one ``orjson.dumps``. A record carrying a value JSON cannot hold (an identity
    claim or a header with bytes that are not UTF-8, a number beyond 64 bits) is stored with those values
    escaped and their fields listed in ``escaped``, so that one agent's bytes can never make a commit
    fail for the records of others that share it. Indexed columns must be text: a non-text value there
    is escaped the same way (and so stays equal to the record, which verify checks)."""
    columns = {k: record.get(k) for k in INDEXED_FIELDS}
    try:
        if all(v is None or type(v) is str for v in columns.values()):
            small = compact(record, intent)
            return canonical(record if small is None else small), columns
    except TypeError:
        pass
    # stored whole (as every record was before the compact form), escaped where it must be
    fixed, escaped = lenient(record)
    for k in INDEXED_FIELDS:
        v = fixed.get(k)
        if v is not None and not isinstance(v, str):
            fixed[k] = str(v)
            escaped.append(k)
    fixed["escaped"] = sorted(set(escaped))
    return canonical(fixed), {k: fixed.get(k) for k in INDEXED_FIELDS}


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
    """One stored record: ``payload`` is the exact bytes the chain hashed; ``base`` the payload of the
    intent record a compact outcome refers to (attached by the store that read it, see
    :func:`intents_wanted`), None when there is none or it is no longer in the store."""

    seq: int
    prev_hash: str
    hash: str
    payload: bytes
    columns: dict[str, Any]
    base: bytes | None = None

    def record(self) -> dict[str, Any]:
        """The record as readers know it (a compact one expanded: :func:`proxy.compact.expand`)."""
        doc = orjson.loads(self.payload)
        if "kind" in doc or "k" not in doc:
            return doc  # type: ignore[no-any-return]
        intent = None
        if self.base is not None and refers_to(doc) is not None:
            intent = expand(orjson.loads(self.base))
        return expand(doc, intent, self.columns)

    def intent_ref(self) -> int | None:
        """The seq of the intent record this (compact) outcome inherits fields from, or None."""
        if b'"of":' not in self.payload:  # cheap: most records are not such outcomes
            return None
        try:
            return refers_to(orjson.loads(self.payload))
        except orjson.JSONDecodeError:
            return None


def intents_wanted(rows: Iterable[StoredRecord]) -> list[int]:
    """Attach, from ``rows`` themselves, the intent records the compact outcomes among them refer to;
    return the seqs still missing (the store fetches those: :func:`attach_intents`)."""
    rows = list(rows)
    want: dict[int, list[StoredRecord]] = {}
    for r in rows:
        of = r.intent_ref()
        if of is not None and r.base is None:
            want.setdefault(of, []).append(r)
    if not want:
        return []
    for r in rows:
        if r.seq in want:
            for o in want.pop(r.seq):
                o.base = r.payload
    return sorted(want)


def attach_intents(rows: Iterable[StoredRecord], found: dict[int, bytes]) -> None:
    """Give the compact outcomes among ``rows`` the intent payloads the store fetched (seq -> payload)."""
    for r in rows:
        if r.base is None:
            of = r.intent_ref()
            if of is not None and of in found:
                r.base = found[of]


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
            rec = row.record()  # compact records expanded: the columns hold the full record's values
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
            return VerifyResult(False, checked, first, row.seq, row.seq, f"record {row.seq} is not JSON")
        for col in INDEXED_FIELDS:
            if col in row.columns and row.columns[col] != rec.get(col):
                return VerifyResult(False, checked, first, row.seq, row.seq,
                                    f"record {row.seq}: column {col!r} was altered "
                                    f"({row.columns[col]!r} but the record says {rec.get(col)!r})")
        prev = row.hash
        checked += 1
    return VerifyResult(True, checked, first, expect_seq if checked else None)
