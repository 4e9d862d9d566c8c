"""The row layout both stores share: which fields live in columns, how a row becomes a dict and back.

Review items, transactions and steps keep a few fields in columns (for filtering and compare-and-set)
and everything else in a JSON document (``doc``); this module is the one place that knows the split,
so the SQLite and PostgreSQL stores cannot drift apart.

A review item also keeps a small ``summary`` document (who, why, what — no headers, no body) that list
endpoints read instead of the whole item, and its stored size (``bytes``), which bounds how much one
agent's pending items may hold. A review row is serialised *strictly* before it goes anywhere near a
shared commit (:func:`prepare_review`): a value JSON cannot hold exactly is refused for that one item
(:class:`Unstorable`, naming the field), never discovered halfway through a batch that carries other
agents' records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import orjson

from ..chain import lenient, unrepresentable

REVIEW_COLS = ("id", "state", "created_at", "updated_at", "expires_at", "agent", "capability", "upstream")
TX_COLS = ("id", "state", "agent", "created_at", "updated_at", "deadline")
STEP_COLS = ("id", "tx_id", "state", "created_at", "updated_at")


# What a list of review items shows: enough to pick one, nothing large (no headers, no body).
SUMMARY_FIELDS = ("on_behalf_of", "intent", "capabilities", "request_id", "tx", "canary", "quarantined",
                  "rules_version", "trace_id", "headline", "on_behalf_of_proof")
SUMMARY_REQUEST_FIELDS = ("method", "wire_method", "path", "query", "content_type", "body_bytes")


class Unstorable(ValueError):
    """A value JSON cannot store exactly (lone surrogate, integer beyond 64 bits, non-finite number, ...)."""

    def __init__(self, field: str, why: str) -> None:
        self.field = field
        self.why = why
        super().__init__(f"{field or '(row)'} {why}")


@dataclass(frozen=True, slots=True)
class PreparedRow:
    """A review item serialised and split, ready to insert (possibly inside a journal batch)."""

    cols: tuple[Any, ...]  # values in REVIEW_COLS order
    doc: bytes
    summary: bytes
    size: int  # len(doc) + len(summary): what this item adds to the store


def strict_dumps(value: Any, where: str = "") -> bytes:
    """orjson, or :class:`Unstorable` naming the first field that cannot be stored exactly."""
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    bad = unrepresentable(value, where)
    raise Unstorable(*(bad or (where, "is not JSON")))


def summary_of(row: dict[str, Any]) -> dict[str, Any]:
    req = row.get("request") or {}
    out = {k: row[k] for k in SUMMARY_FIELDS if k in row}
    out["request"] = {k: req[k] for k in SUMMARY_REQUEST_FIELDS if k in req}
    return out


def summary_bytes(row: dict[str, Any]) -> bytes:
    """The stored summary of an existing item (escaped where JSON cannot hold a value exactly, as :func:`split`)."""
    summary = summary_of(row)
    try:
        return orjson.dumps(summary)
    except TypeError:
        return orjson.dumps(lenient(summary)[0])


def summary_changed(updates: dict[str, Any] | None) -> bool:
    """Does a transition's update touch what the item's summary shows (then the summary is rewritten)?"""
    return bool(updates) and any(k in SUMMARY_FIELDS for k in updates)  # type: ignore[union-attr]


def prepare_review(item: dict[str, Any]) -> PreparedRow:
    """Serialise a new review item strictly (see the module doc); raises :class:`Unstorable`."""
    rest = {k: v for k, v in item.items() if k not in REVIEW_COLS}
    doc = strict_dumps(rest)
    summary = orjson.dumps(summary_of(item))  # a subset of what strict_dumps just accepted
    for k in REVIEW_COLS:
        v = item.get(k)
        if isinstance(v, str) and not v.isascii():
            strict_dumps(v, k)
    return PreparedRow(tuple(item.get(k) for k in REVIEW_COLS), doc, summary, len(doc) + len(summary))


def split(row: dict[str, Any], cols: tuple[str, ...]) -> tuple[dict[str, Any], bytes]:
    """A dict -> (its column values, the rest as a JSON document).

    Used for rows that already exist (a transition adds a decision or a replay's answer): a value the
    upstream sent that JSON cannot hold exactly is kept escaped rather than failing the update."""
    doc = {k: v for k, v in row.items() if k not in cols}
    try:
        data = orjson.dumps(doc)
    except TypeError:
        data = orjson.dumps(lenient(doc)[0])
    return {k: row.get(k) for k in cols}, data


def join(cols: dict[str, Any], doc: bytes) -> dict[str, Any]:
    out = orjson.loads(doc)
    out.update(cols)
    return out


def summary_from_row(row: Sequence[Any]) -> dict[str, Any]:
    """A database row (REVIEW_COLS values, then ``summary``, then ``doc``) -> the item's summary. ``doc`` is
    selected only for rows written before summaries existed (NULL otherwise)."""
    values = list(row)
    summary, doc = values[-2], values[-1]
    cols = dict(zip(REVIEW_COLS, values[:-2]))
    if summary is None:
        full = join(cols, bytes(doc) if isinstance(doc, memoryview) else doc)
        out = summary_of(full)
    else:
        out = orjson.loads(bytes(summary) if isinstance(summary, memoryview) else summary)
    out.update(cols)
    return out


def from_row(cols: tuple[str, ...], row: Sequence[Any]) -> dict[str, Any]:
    """A database row (the columns in ``cols`` order, then ``doc``) -> the dict."""
    values = list(row)
    doc = values[-1]
    return join(dict(zip(cols, values[:-1])), bytes(doc) if isinstance(doc, memoryview) else doc)


def advance(row: dict[str, Any], to: str, updates: dict[str, Any] | None) -> dict[str, Any]:
    """The row after a compare-and-set transition to state ``to``."""
    row.update(updates or {})
    row["state"] = to
    row["updated_at"] = time.time()
    return row


def review_stats(rows: Iterable[Any]) -> dict[str, int]:
    """Counts of decided review items from (state, doc) pairs (promotion evidence)."""
    stats = {"approved": 0, "approved_edited": 0, "rejected": 0, "expired": 0, "replay_failed": 0, "pending": 0}
    for state, doc in rows:
        d = orjson.loads(doc) if isinstance(doc, (bytes, str)) else doc
        if state in ("approved", "replayed", "replay_failed"):
            stats["approved"] += 1
            if (d.get("decision") or {}).get("edited"):
                stats["approved_edited"] += 1
            if state == "replay_failed":
                stats["replay_failed"] += 1
        elif state in stats:
            stats[state] += 1
    return stats
