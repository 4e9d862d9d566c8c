"""Finding journal records the way people ask for them: ``--user jane`` means ``ae:jane@acme.example``.

:class:`Match` turns what someone typed for ``--agent`` / ``--user`` into a test on the indexed column:
the exact value when the journal holds it (an indexed SQL filter), otherwise every value that contains
the text, case-insensitively (a prefix is such a part). It remembers which values it matched, so the
commands can say so (``--user 'jane' matched ae:jane@acme.example``).

:func:`scan_back` walks the journal newest first with SQL filters plus these tests, which is what
``journal tail`` needs to print the last N matches and to say how many more there are.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..chain import StoredRecord
from ..config import parse_duration
from ..inert import inert
from .writer import now_iso

PAGE = 2000


@dataclass
class Match:
    column: str  # an indexed journal column: agent, on_behalf_of, capability
    flag: str  # how the user spelt it: --user
    needle: str
    exact: bool = False
    matched: dict[str, int] = field(default_factory=dict)

    def test(self, row: StoredRecord) -> bool:
        if self.exact:
            return True  # the SQL filter did it
        value = row.columns.get(self.column)
        return isinstance(value, str) and self.needle.lower() in value.lower()

    def count(self, row: StoredRecord) -> None:
        if not self.exact:
            value = row.columns.get(self.column)
            self.matched[value] = self.matched.get(value, 0) + 1

    def sql(self) -> dict[str, Any]:
        return {self.column: self.needle} if self.exact else {}

    def said(self) -> str | None:
        """``--user 'jane' matched ae:jane@acme.example`` (None for an exact value)."""
        if self.exact:
            return None
        if not self.matched:
            return f"{self.flag} {inert(self.needle)!r} matched nothing"
        names = sorted(self.matched, key=lambda v: -self.matched[v])
        shown = ", ".join(inert(v) for v in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"{self.flag} {inert(self.needle)!r} matched {shown}"


@dataclass
class ChannelMatch:
    """``--channel mcp``: the door a request came by (records carry ``channel`` when it is not REST)."""

    channel: str

    def test(self, row: StoredRecord) -> bool:
        rec = row.record()
        if rec.get("kind") not in ("request", "outcome", "mcp"):
            return False
        return (rec.get("channel") or "rest") == self.channel

    def count(self, row: StoredRecord) -> None:
        return None

    def sql(self) -> dict[str, Any]:
        return {}

    def said(self) -> str | None:
        return None


async def resolve(store: Any, column: str, flag: str, needle: str | None) -> Match | None:
    """A Match for one typed value: exact when the journal has that value, else a substring test."""
    if needle is None or needle == "":
        return None
    exact = bool(await store.journal_query(filters={column: needle}, limit=1, descending=True))
    return Match(column, flag, needle, exact=exact)


def sql_filters(base: dict[str, Any], matches: list[Match | None]) -> dict[str, Any]:
    out = dict(base)
    for m in matches:
        if m is not None:
            out.update(m.sql())
    return out


def accepts(row: StoredRecord, matches: list[Match | None]) -> bool:
    live = [m for m in matches if m is not None]
    if not all(m.test(row) for m in live):
        return False
    for m in live:
        m.count(row)
    return True


async def scan_back(store: Any, filters: dict[str, Any], matches: list[Match | None], *, since: str | None = None,
                    until: str | None = None, before_seq: int | None = None) -> AsyncIterator[StoredRecord]:
    """Matching records, newest first."""
    cursor = before_seq
    while True:
        rows = await store.journal_query(before_seq=cursor, filters=filters, since=since, until=until,
                                         descending=True, limit=PAGE)
        if not rows:
            return
        for r in rows:
            if accepts(r, matches):
                yield r
        if len(rows) < PAGE:
            return
        cursor = rows[-1].seq


async def scan_forward(store: Any, filters: dict[str, Any], matches: list[Match | None], *, since: str | None = None,
                       until: str | None = None, after_seq: int = 0) -> AsyncIterator[StoredRecord]:
    """Matching records, oldest first."""
    cursor = after_seq
    while True:
        rows = await store.journal_query(after_seq=cursor, filters=filters, since=since, until=until, limit=PAGE)
        if not rows:
            return
        for r in rows:
            if accepts(r, matches):
                yield r
        if len(rows) < PAGE:
            return
        cursor = rows[-1].seq


def journal_time(value: str | None) -> str | None:
    """RFC 3339 / ISO date, or a relative age like 10m, 2h, 7d -> the journal's timestamp format (None
    stays None); ValueError naming the value when it is neither."""
    if value is None:
        return None
    if re.fullmatch(r"\d+(\.\d+)?\s*(ms|s|m|h|d|w)", value.strip()):
        return now_iso(time.time() - parse_duration(value))
    try:
        d = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither a time (2026-11-25T10:00:00Z) nor an age (10m, 2h, 7d)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return now_iso(d.timestamp())
