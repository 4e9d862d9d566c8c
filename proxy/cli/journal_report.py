"""``tether journal report``: what an agent did for a person, in one command, from the journal alone.

An auditor asks "what did renewal-bot do for Jane last week, who approved it, what was refused, what was
undone?". The report answers from the hash-chained journal (nothing else is trusted):

* a summary line (requests by decision, reviews by outcome, denials, transactions rolled back);
* the requests grouped by capability and decision, with their count, the upstream's answers and the
  intents given (most frequent first);
* every review decision on the agent's dry-run writes: the item, who decided, the reason or note, and
  what the replay got;
* every denial with its error code and message;
* every transaction that was rolled back (or needs attention), with its reason.

As text (aligned, for a terminal), markdown (for a ticket or a wiki) or CSV (one row per request, for a
spreadsheet). Agent-controlled text is made inert in every format; markdown cells escape ``|``; CSV
cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``) are prefixed with ``'``.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..inert import inert
from ..journal.search import Match


@dataclass
class Report:
    agent: str | None
    user: str | None
    since: str | None
    until: str | None
    matched: list[str] = field(default_factory=list)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)  # request_id -> row
    reviews: dict[str, dict[str, Any]] = field(default_factory=dict)  # item -> decision
    txs: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: int = 0

    def add(self, rec: dict[str, Any]) -> None:
        self.records += 1
        kind = rec.get("kind")
        rid = rec.get("request_id")
        if kind == "request" and rid and rec.get("decision") != "replay":
            row = self.requests.setdefault(rid, {})
            row.update({"ts": rec.get("ts"), "capability": rec.get("capability") or "(unmatched)",
                        "action": f"{rec.get('method') or ''} {rec.get('path') or ''}".strip(),
                        "decision": rec.get("decision") or "?", "intent": rec.get("intent"),
                        "agent": rec.get("agent"), "on_behalf_of": rec.get("on_behalf_of"),
                        "review_item": rec.get("review_item"), "tx": rec.get("tx"),
                        "error": rec.get("error"), "message": rec.get("message")})
            if rec.get("status") is not None:
                row.setdefault("status", rec.get("status"))
        elif kind == "outcome" and rid and rec.get("decision") != "replay":
            row = self.requests.setdefault(rid, {})
            row["status"] = rec.get("status")
            if rec.get("error") and not row.get("error"):
                row["error"] = rec.get("error")
        elif kind == "review" and rec.get("review_item") and rec.get("decision") in ("approved", "rejected", "expired"):
            item = self.reviews.setdefault(rec["review_item"], {})
            item.update({"ts": rec.get("ts"), "decision": rec.get("decision"), "reviewer": rec.get("reviewer"),
                         "reason": rec.get("reason"), "edited": rec.get("edited"), "capability": rec.get("capability"),
                         "intent": rec.get("intent")})
        elif kind == "outcome" and rec.get("decision") == "replay" and rec.get("review_item"):
            item = self.reviews.setdefault(rec["review_item"], {})
            item["replay"] = rec.get("reason")
            item["replay_status"] = rec.get("status")
        elif kind == "tx" and rec.get("tx"):
            tx = self.txs.setdefault(rec["tx"], {"id": rec["tx"], "events": []})
            event = rec.get("event") or rec.get("decision")
            tx["events"].append(event)
            if event == "opened":
                tx["name"] = rec.get("name")
                tx["opened"] = rec.get("ts")
            if event in ("rolled_back", "needs_attention", "committed"):
                tx["final"] = event
                tx["ts"] = rec.get("ts")
                tx["reason"] = rec.get("reason") or rec.get("problem")

    # -- views ------------------------------------------------------------------------------------

    def groups(self) -> list[dict[str, Any]]:
        g: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.requests.values():
            if "decision" not in row:
                continue  # an outcome whose intent record is outside the window
            key = (row["capability"], row["decision"])
            grp = g.setdefault(key, {"capability": key[0], "decision": key[1], "count": 0, "statuses": Counter(),
                                     "intents": Counter()})
            grp["count"] += 1
            if row.get("status") is not None:
                grp["statuses"][str(row["status"])] += 1
            if row.get("intent"):
                grp["intents"][row["intent"]] += 1
        return sorted(g.values(), key=lambda x: (x["capability"], -x["count"]))

    def denials(self) -> list[dict[str, Any]]:
        return sorted((r for r in self.requests.values() if r.get("decision") == "denied"), key=lambda r: r["ts"] or "")

    def rollbacks(self) -> list[dict[str, Any]]:
        return sorted((t for t in self.txs.values() if t.get("final") in ("rolled_back", "needs_attention")),
                      key=lambda t: t.get("ts") or "")

    def review_rows(self) -> list[dict[str, Any]]:
        return sorted(({"item": k, **v} for k, v in self.reviews.items() if v.get("decision")),
                      key=lambda r: r.get("ts") or "")

    def summary(self) -> str:
        by = Counter(r.get("decision") for r in self.requests.values() if r.get("decision"))
        total = sum(by.values())
        parts = [f"{n} {d.replace('_', '-')}" for d, n in by.most_common()]
        rev = Counter(v.get("decision") for v in self.reviews.values() if v.get("decision"))
        pending = sum(1 for r in self.requests.values() if r.get("decision") == "dry_run"
                      and r.get("review_item") not in self.reviews)
        text = f"{total} request{'s' if total != 1 else ''}" + (f" ({', '.join(parts)})" if parts else "")
        if rev or pending:
            text += "; reviews: " + ", ".join([f"{n} {d}" for d, n in rev.most_common()]
                                               + ([f"{pending} not decided in this window"] if pending else []))
        rolled = len(self.rollbacks())
        if rolled:
            text += f"; {rolled} transaction{'s' if rolled != 1 else ''} rolled back or needing attention"
        return text


def _top(c: Counter, n: int = 3) -> str:
    items = c.most_common()
    shown = [f"{k} ({v})" if v > 1 else str(k) for k, v in items[:n]]
    return "; ".join(shown) + (f"; +{len(items) - n} more" if len(items) > n else "")


def _statuses(c: Counter) -> str:
    return " ".join(f"{k}×{v}" for k, v in sorted(c.items())) or "-"


def sections(rep: Report) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, headers, rows) of each part of the report, shared by the text and markdown renderers."""
    out: list[tuple[str, list[str], list[list[Any]]]] = []
    out.append(("By capability and decision", ["CAPABILITY", "DECISION", "COUNT", "ANSWERS", "INTENTS"],
                [[g["capability"], g["decision"], g["count"], _statuses(g["statuses"]), _top(g["intents"])]
                 for g in rep.groups()]))
    out.append(("Reviews", ["WHEN", "ITEM", "CAPABILITY", "DECISION", "REVIEWER", "REASON / OUTCOME"],
                [[r.get("ts", "")[:19], r["item"], r.get("capability") or "", r["decision"]
                  + (" (edited)" if r.get("edited") else ""), r.get("reviewer") or "-",
                  (r.get("reason") or "") + (f" → {r['replay']} {r.get('replay_status') or ''}".rstrip()
                                             if r.get("replay") else "")] for r in rep.review_rows()]))
    out.append(("Denials", ["WHEN", "CAPABILITY", "ACTION", "CODE", "MESSAGE", "INTENT"],
                [[r.get("ts", "")[:19], r.get("capability") or "", r.get("action") or "", r.get("error") or "",
                  r.get("message") or "", r.get("intent") or ""] for r in rep.denials()]))
    out.append(("Rollbacks", ["WHEN", "TRANSACTION", "NAME", "OUTCOME", "REASON"],
                [[(t.get("ts") or "")[:19], t["id"], t.get("name") or "", t.get("final"), t.get("reason") or ""]
                 for t in rep.rollbacks()]))
    return out


def _title(rep: Report) -> str:
    who = rep.agent or "every agent"
    if rep.user:
        who += f" for {rep.user}"
    span = f"{rep.since or 'the beginning'} .. {rep.until or 'now'}"
    return f"What {who} did, {span}"


def render_text(rep: Report) -> str:
    from .common import table

    lines = [inert(_title(rep))]
    lines += [inert(m) for m in rep.matched]
    lines += ["", "Summary: " + inert(rep.summary())]
    for title, headers, rows in sections(rep):
        lines += ["", f"{title} ({len(rows)})" if title != "By capability and decision" else title]
        lines.append(table(headers, rows, right={"COUNT"}) if rows else "  none")
    return "\n".join(lines)


def _md(value: Any) -> str:
    return inert(value).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_") \
        .replace("<", "&lt;").replace(">", "&gt;").replace("`", "\\`")


def render_markdown(rep: Report) -> str:
    lines = [f"# {_md(_title(rep))}", ""]
    lines += [f"*{_md(m)}*  " for m in rep.matched]
    lines += ["", f"**Summary:** {_md(rep.summary())}"]
    for title, headers, rows in sections(rep):
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append("None.")
            continue
        lines.append("| " + " | ".join(h.capitalize() for h in headers) + " |")
        lines.append("|" + "|".join("---:" if h == "COUNT" else "---" for h in headers) + "|")
        lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


CSV_COLUMNS = ["ts", "agent", "on_behalf_of", "capability", "action", "decision", "status", "error", "intent",
               "review_item", "review_decision", "reviewer", "review_reason", "replay", "tx", "tx_outcome"]


def _cell(value: Any) -> str:
    text = inert(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def render_csv(rep: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in sorted((r for r in rep.requests.values() if r.get("decision")), key=lambda r: r.get("ts") or ""):
        rv = rep.reviews.get(row.get("review_item") or "", {})
        tx = rep.txs.get(row.get("tx") or "", {})
        w.writerow([_cell(x) for x in (
            row.get("ts"), row.get("agent"), row.get("on_behalf_of"), row.get("capability"), row.get("action"),
            row.get("decision"), row.get("status"), row.get("error"), row.get("intent"), row.get("review_item"),
            rv.get("decision"), rv.get("reviewer"), rv.get("reason"), rv.get("replay"), row.get("tx"),
            tx.get("final"))])
    return buf.getvalue().rstrip("\n")


RENDERERS = {"text": render_text, "markdown": render_markdown, "csv": render_csv}


def grouped_by(matches: list[Match | None]) -> list[str]:
    return [s for s in (m.said() for m in matches if m is not None) if s]

