"""The stored form of the journal's request and outcome records: compact on write, expanded on read.

Each request leaves two records (an intent record before forwarding, an outcome after), and they were
most of what the journal stores: fixed-schema records full of ``null``, an outcome repeating who, what
and why from its intent, long field names. Those two kinds are now *stored* compact, and every reader
gets them back expanded — the same fields and values a record had before (``StoredRecord.record()``,
so ``tether journal``, the admin API, the console, reports and exports see no difference):

* **Short stable names.** Each field of the fixed schema is stored under a short name that never
  changes meaning (:data:`ALIASES`; a field not in the table keeps its name). A compact record is
  recognised by its kind under ``"k"``: ``"r"`` (request) or ``"o"`` (outcome); a record with ``"kind"``
  is stored as it is (every record written before this form, and every other kind).
* **Nulls omitted.** A fixed-schema field that is ``null`` is not stored; expanding fills the schema
  (:data:`REQUEST_FIELDS`, :data:`OUTCOME_FIELDS`) back in with ``null``.
* **Shorter encodings, exact round trip.** ``ts`` as integer microseconds since the epoch (expanded to
  the same RFC 3339 text, ``2026-11-25T10:00:00.123456Z``); ``body_sha256`` as base64url of the digest
  (expanded to the same hex).
* **The outcome refers to its intent.** An outcome written with its intent record at hand stores
  ``"of": <the intent's seq>`` and leaves out every field of :data:`INHERITED` whose value is the
  intent's (agent, person, capability, method, path, decision, ...): expanding copies them from the
  intent record, which the reader fetches by that seq. A value that changed since the intent (a
  decision turned ``refused``, a reason added) is stored in the outcome and wins.

The hash chain covers the stored bytes, so a compact record is exactly as tamper-evident as before;
``tether journal verify`` also checks an outcome's indexed columns against its expanded form. An
outcome whose intent is no longer in the store (archived) expands with the indexed columns standing in
for the inherited fields it cannot fetch.
"""

from __future__ import annotations

import base64
import calendar
import time
from typing import Any

# full field name -> stored name; never reuse or change an entry (records already stored use them)
ALIASES: dict[str, str] = {
    "ts": "t", "kind": "k", "request_id": "id", "agent": "a", "on_behalf_of": "ob", "on_behalf_of_proof": "op",
    "intent": "i", "capability": "c", "upstream": "u", "method": "m", "path": "p", "decision": "d",
    "reason": "r", "query": "q", "body_sha256": "bs", "body_bytes": "bb", "trace_id": "tr", "rules_version": "rv",
    "audit": "au", "redacted": "rd", "operations": "ops", "error": "e", "status": "s", "message": "msg",
    "review_item": "ri", "quarantined": "qu", "channel": "ch", "stage": "st", "latency_ms": "l",
    "upstream_latency_ms": "ul", "forwarded": "f", "upstream_ids": "ui",
}
FULL_NAMES: dict[str, str] = {v: k for k, v in ALIASES.items()}
_ALIAS_GET = ALIASES.get
OF = "of"  # an outcome's intent seq, when the outcome inherits from that intent record
_RESERVED = frozenset(FULL_NAMES) | {OF}
_KINDS = {"request": "r", "outcome": "o"}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}

# the fixed schema of each kind: a field missing from a compact record is null
REQUEST_FIELDS = ("ts", "kind", "request_id", "agent", "on_behalf_of", "on_behalf_of_proof", "intent", "capability",
                  "upstream", "method", "path", "decision", "reason", "query", "body_sha256", "body_bytes", "tx",
                  "trace_id", "rules_version")
OUTCOME_FIELDS = ("ts", "kind", "request_id", "agent", "on_behalf_of", "on_behalf_of_proof", "intent", "capability",
                  "upstream", "method", "path", "decision", "reason", "intent_seq", "status", "latency_ms",
                  "upstream_latency_ms", "forwarded", "tx")
_SCHEMA = {"request": REQUEST_FIELDS, "outcome": OUTCOME_FIELDS}
_NULLABLE = {"request": frozenset(REQUEST_FIELDS), "outcome": frozenset(OUTCOME_FIELDS)}
_REQUEST_NULLS = dict.fromkeys(REQUEST_FIELDS)
_OUTCOME_NULLS = dict.fromkeys(OUTCOME_FIELDS)

# what an outcome takes from its intent record when the values are the same (plain values only: a
# nested object could have changed after the intent was written, so it is always stored)
INHERITED = ("request_id", "agent", "on_behalf_of", "on_behalf_of_proof", "capability", "upstream", "method", "path",
             "decision", "reason", "tx", "review_item", "channel")
_INHERITED = frozenset(INHERITED)

# --------------------------------------------------------------------------- value encodings

_SEC_CACHE: list[Any] = ["", 0, -1, ""]  # last (text -> seconds), last (seconds -> text)


def _ts_micros(ts: Any) -> int | None:
    """``2026-11-25T10:00:00.123456Z`` -> microseconds since the epoch; None for any other form (kept as
    text), so that expanding gives back exactly the same text."""
    if type(ts) is not str or len(ts) != 27 or ts[19] != "." or ts[26] != "Z" or not ts[20:26].isdigit():
        return None
    head = ts[:19]
    if _SEC_CACHE[0] != head:
        try:
            sec = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None
        if _iso_seconds(sec) != head:  # not the canonical text of that second: keep the text
            return None
        _SEC_CACHE[0], _SEC_CACHE[1] = head, sec
    return _SEC_CACHE[1] * 1_000_000 + int(ts[20:26])


def _iso_seconds(sec: int) -> str:
    if _SEC_CACHE[2] != sec:
        _SEC_CACHE[2], _SEC_CACHE[3] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return str(_SEC_CACHE[3])


def iso_from_micros(us: int) -> str:
    sec, frac = divmod(us, 1_000_000)
    return f"{_iso_seconds(sec)}.{frac:06d}Z"


def _digest_b64(hexdigest: Any) -> str | None:
    """A sha256 hex digest as base64url (43 characters instead of 64); None when it is not one."""
    if type(hexdigest) is not str or len(hexdigest) != 64:
        return None
    try:
        raw = bytes.fromhex(hexdigest)
    except ValueError:
        return None
    if raw.hex() != hexdigest:  # upper case: keep the text as it is
        return None
    return base64.urlsafe_b64encode(raw)[:43].decode("ascii")


def _digest_hex(b64: str) -> str:
    return base64.urlsafe_b64decode(b64 + "=").hex()


# --------------------------------------------------------------------------- write


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _inheritable(rec: dict[str, Any], intent: dict[str, Any]) -> bool:
    """May an outcome inherit from this intent record? Only when every inheritable field the intent holds
    is in the outcome too (else expanding would add a field the outcome never had), and each is text (or
    null) the intent record stored as it is (text that is not Unicode was stored escaped: the outcome
    then stores its own, escaped and listed, as before)."""
    for k in INHERITED:
        if k in intent:
            v = intent[k]
            if k not in rec:
                return False
            if v is not None and (type(v) is not str or (not v.isascii() and not _unicode(v))):
                return False
    return True


def _unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def compact(rec: dict[str, Any], intent: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The compact form of a request or outcome record, or None to store ``rec`` as it is (another kind,
    or a field whose name is one of the short names). ``intent``: the intent record of an outcome's
    request, as it was written (its plain fields are then inherited rather than repeated).

    Runs for every record on the event loop: one dict comprehension, then the few fields with an
    encoding of their own."""
    kind = rec.get("kind")
    short_kind = _KINDS.get(kind)  # type: ignore[arg-type]
    if short_kind is None:
        return None
    if not _RESERVED.isdisjoint(rec):  # a field named like a short name: this record is stored as it is
        return None
    nullable = _NULLABLE[kind]  # type: ignore[index]
    seq = rec.get("intent_seq")
    if intent is not None and type(seq) is int and kind == "outcome" and _inheritable(rec, intent):
        # an inherited field is left out when it is the intent's; else stored, even a null (a value the
        # intent had and the outcome no longer has)
        out = {_ALIAS_GET(k, k): v for k, v in rec.items()
               if ((not _same(v, intent[k])) if k in _INHERITED and k in intent
                   else (v is not None or k not in nullable))}
        del out["intent_seq"]
        out[OF] = seq
    else:
        out = {_ALIAS_GET(k, k): v for k, v in rec.items() if v is not None or k not in nullable}
    out["k"] = short_kind
    ts = out.get("t")
    if ts is not None:
        us = _ts_micros(ts)
        if us is not None:
            out["t"] = us
    if "bs" in out:
        digest = out.pop("bs")
        b64 = _digest_b64(digest)
        if b64 is None:
            out["body_sha256"] = digest  # the full name: expands as it is
        else:
            out["bs"] = b64
    return out


# --------------------------------------------------------------------------- read


def is_compact(doc: dict[str, Any]) -> bool:
    return "k" in doc and "kind" not in doc


def refers_to(doc: dict[str, Any]) -> int | None:
    """The intent seq a compact outcome inherits from, or None."""
    if doc.get("k") == "o" and "kind" not in doc:
        of = doc.get(OF)
        return of if type(of) is int else None
    return None


def expand(doc: dict[str, Any], intent: dict[str, Any] | None = None,
           columns: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored record as readers know it. ``doc`` as stored (a record that is not compact is returned as
    it is); ``intent``: the expanded intent record an outcome refers to (``"of"``), when it could be
    fetched; ``columns``: the row's indexed columns, which stand in for the inherited fields when not."""
    if "kind" in doc or "k" not in doc:
        return doc
    kind = _KIND_NAMES.get(doc["k"], doc["k"])
    out: dict[str, Any] = dict(_REQUEST_NULLS if kind == "request" else _OUTCOME_NULLS)
    of = doc.get(OF) if kind == "outcome" else None
    if of is not None:
        if intent is not None:
            for k in INHERITED:
                if k in intent:
                    out[k] = intent[k]
        elif columns:
            for k in ("request_id", "agent", "on_behalf_of", "capability", "decision"):
                if columns.get(k) is not None:
                    out[k] = columns[k]
    for key, value in doc.items():
        if key == "k":
            out["kind"] = kind
        elif key == "t":
            out["ts"] = iso_from_micros(value) if type(value) is int else value
        elif key == "bs":
            out["body_sha256"] = _digest_hex(value)
        elif key == OF and kind == "outcome":
            out["intent_seq"] = value
        else:
            out[FULL_NAMES.get(key, key)] = value
    return dict(sorted(out.items()))  # as a record stored whole reads (canonical JSON: sorted keys)


def schema_of(kind: str) -> tuple[str, ...]:
    return _SCHEMA.get(kind, ())
