"""The row layout both stores share: which fields live in columns, how a row becomes a dict and back.

Review items, transactions and steps keep a few fields in columns (for filtering and compare-and-set)
and everything else in a JSON document (``doc``); this module is the one place that knows the split,
so the SQLite and PostgreSQL stores cannot drift apart.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import orjson

REVIEW_COLS = ("id", "state", "created_at", "updated_at", "expires_at", "agent", "capability", "upstream")
TX_COLS = ("id", "state", "agent", "created_at", "updated_at", "deadline")
STEP_COLS = ("id", "tx_id", "state", "created_at", "updated_at")


def split(row: dict[str, Any], cols: tuple[str, ...]) -> tuple[dict[str, Any], bytes]:
    """A dict -> (its column values, the rest as a JSON document)."""
    doc = {k: v for k, v in row.items() if k not in cols}
    return {k: row.get(k) for k in cols}, orjson.dumps(doc)


def join(cols: dict[str, Any], doc: bytes) -> dict[str, Any]:
    out = orjson.loads(doc)
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
