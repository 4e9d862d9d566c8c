"""The capability catalogue: ``tether catalogue``.

The registry Tether enforces is also an inventory of what agents may do on each system of record. The
catalogue lists every capability — upstream, method and path, effect, which agents hold it and in
which mode, rate limits, compensation, the traffic the journal has seen (request records, by decision)
— and classifies each one's readiness for agents. A summary per upstream gives the share of each class
and the maturity stage the evidence supports.

Readiness classes
-----------------
``agent-ready``
    registered, schema-validated and safe to run: a read; or a write that is validated (it has field
    rules — ``body.allow_fields`` or ``body.json_schema`` — or is a DELETE, which carries no body) and
    compensable (``compensation: auto``: the adapter plans its undo).
``needs wrapping``
    registered, but a write that lacks field rules or cannot be undone (``compensation:
    non_compensable`` or ``none``) while it can still be dry-run: it can be used under review, and needs
    a schema or a compensation before it runs live unattended.
``incompatible``
    no safe route through Tether: a write that can be neither undone nor dry-run (non-compensable and
    ``stream_request: true`` — a streamed body cannot be held for review); or, with ``--openapi``, a
    spec operation whose path Tether cannot route (a parameter that is not a whole segment, a query in
    the path: the importer skips these).
MCP capabilities (a tool, resource or prompt of an MCP upstream; route ``tool NAME`` and so on) are
classified the same way: a write tool is compensable when it declares an ``undo`` template, validated
when it has field rules on its arguments, and one that ``tether rules import-mcp`` marked
``needs_review`` needs wrapping until a person confirms it.

``not registered``
    with ``--openapi SPEC --upstream NAME`` only: an operation of the spec that no capability covers.
    It is a class of its own rather than "incompatible": nothing prevents registering it (``tether rules
    import-openapi`` would), it simply is not in the registry, so agents cannot use it (default deny).

A spec operation is covered by a capability of that upstream with the same method and the same
template shape (parameter names ignored) once the path prefix is put in front (``--path-prefix``;
by default the prefix is guessed from the registered paths).

Maturity stages (per upstream)
------------------------------
What the rules file and the journal can evidence, not what anyone intends:

0. **human-operated** — no agent holds any capability of the upstream.
1. **read-only** — agents hold reads only.
2. **supervised writes** — agents hold writes, all in ``dry_run`` (every write is reviewed first).
3. **live with safety nets** — at least one write is held ``live`` or ``canary`` on a compensable
   capability (``compensation: auto``), so a failed workflow can be rolled back.
4. **agent-native** — more than half of the upstream's write capabilities are held live or canary,
   compensable, schema-validated, and have traffic in the journal. Without a journal to read, stage 4
   cannot be evidenced and the catalogue says so.

Live writes that cannot be undone never raise the stage; the summary counts them as a risk.
Modes are the grant modes declared in the rules file (a write granted without a mode is dry-run).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..config import CapabilityConfig, McpCapabilityConfig, RulesFile

AGENT_READY = "agent-ready"
NEEDS_WRAPPING = "needs wrapping"
INCOMPATIBLE = "incompatible"
NOT_REGISTERED = "not registered"
CLASSES = (AGENT_READY, NEEDS_WRAPPING, INCOMPATIBLE, NOT_REGISTERED)

STAGES = {
    0: "human-operated",
    1: "read-only",
    2: "supervised writes",
    3: "live with safety nets",
    4: "agent-native",
}


# --------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    """Request records per capability, from one scan of the journal."""

    requests: Counter[str] = field(default_factory=Counter)
    decisions: dict[str, Counter[str]] = field(default_factory=dict)
    records: int = 0
    first_ts: str | None = None
    last_ts: str | None = None

    def add(self, rec: dict[str, Any]) -> None:
        self.records += 1
        ts = rec.get("ts")
        if isinstance(ts, str):
            self.first_ts = self.first_ts or ts
            self.last_ts = ts
        if rec.get("kind") != "request":
            return
        decision = str(rec.get("decision") or "none")
        caps = [rec.get("capability")]
        for op in rec.get("operations") or []:
            if isinstance(op, dict) and op.get("capability") not in caps:
                caps.append(op.get("capability"))
        for cap in caps:
            if cap:
                self.requests[cap] += 1
                self.decisions.setdefault(cap, Counter())[decision] += 1


async def read_traffic(store: Any) -> Traffic:
    """Scan the whole journal once (``Store.journal_scan``) and count request records per capability."""
    t = Traffic()
    async for row in store.journal_scan():
        t.add(row.record())
    return t


def read_traffic_sync(url: str) -> Traffic:
    from ..store import open_store

    async def go() -> Traffic:
        store = open_store(url)
        await store.open()
        try:
            return await read_traffic(store)
        finally:
            await store.close()

    return asyncio.run(go())


def default_store(rules_store: str | None, explicit: str | None) -> str | None:
    """The journal to read: ``--store``, else ``$TETHER_STORE``, else the rules file's ``server.store``
    (``rules_store``) when that is PostgreSQL or an existing SQLite file (a catalogue or a lint never
    creates a database)."""
    url = explicit or os.environ.get("TETHER_STORE") or rules_store
    if not url:
        return None
    if url.startswith(("postgres://", "postgresql://")):
        return url
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
    if explicit:
        if not os.path.exists(path):
            raise SystemExit(f"tether: no store at {url!r}")
        return url
    return url if os.path.exists(path) else None


# --------------------------------------------------------------------------- classification


def has_field_rules(cap: CapabilityConfig) -> bool:
    b = cap.body
    return b is not None and (b.allow_fields is not None or b.json_schema is not None)


def is_validated(cap: CapabilityConfig) -> bool:
    """Schema-validated: a read, a bodyless DELETE, or a write with field rules."""
    if isinstance(cap, McpCapabilityConfig):
        return cap.resolved_effect == "read" or has_field_rules(cap)
    return cap.resolved_effect == "read" or cap.method == "DELETE" or has_field_rules(cap)


def is_compensable(cap: CapabilityConfig) -> bool:
    return cap.resolved_effect == "read" or cap.compensation == "auto"


def readiness(cap: CapabilityConfig) -> tuple[str, list[str]]:
    """(class, reasons) of a registered capability."""
    review = [f"needs review: {cap.needs_review}"] if isinstance(cap, McpCapabilityConfig) and cap.needs_review else []
    if cap.resolved_effect == "read":
        return (NEEDS_WRAPPING, review) if review else (AGENT_READY, [])
    reasons = review
    if not is_validated(cap):
        reasons.append("no field rules")
    if not is_compensable(cap):
        reasons.append("cannot be undone")
    if not is_compensable(cap) and cap.stream_request:
        return INCOMPATIBLE, ["cannot be undone", "cannot be dry-run (streamed body)"]
    return (AGENT_READY if not reasons else NEEDS_WRAPPING), reasons


# --------------------------------------------------------------------------- the catalogue


@dataclass
class Row:
    name: str
    upstream: str
    method: str
    path: str
    effect: str
    holders: list[tuple[str, str]]  # (agent, mode)
    rate_limit: str
    compensation: str
    requests: int | None
    decisions: dict[str, int]
    readiness: str
    reasons: list[str] = field(default_factory=list)
    operation: str | None = None  # the spec operation it covers ("METHOD /path"), with --openapi
    registered: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"capability": self.name, "upstream": self.upstream, "method": self.method, "path": self.path,
                "effect": self.effect, "holders": [{"agent": a, "mode": m} for a, m in self.holders],
                "rate_limit": self.rate_limit or None, "compensation": self.compensation or None,
                "requests": self.requests, "decisions": self.decisions, "readiness": self.readiness,
                "reasons": self.reasons, "operation": self.operation, "registered": self.registered}


@dataclass
class Summary:
    upstream: str
    counts: Counter[str]
    stage: int
    evidence: str
    live_uncompensated: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def share(self, cls: str) -> float:
        return self.counts[cls] / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"upstream": self.upstream, "total": self.total,
                "counts": {c: self.counts[c] for c in CLASSES},
                "shares": {c: round(self.share(c), 4) for c in CLASSES},
                "stage": self.stage, "stage_name": STAGES[self.stage], "evidence": self.evidence,
                "live_uncompensated_writes": self.live_uncompensated}


@dataclass
class Catalogue:
    rows: list[Row]
    summaries: list[Summary]
    traffic: Traffic | None

    def to_dict(self) -> dict[str, Any]:
        return {"capabilities": [r.to_dict() for r in self.rows], "summary": [s.to_dict() for s in self.summaries],
                "journal": None if self.traffic is None else {"records": self.traffic.records,
                                                              "first": self.traffic.first_ts,
                                                              "last": self.traffic.last_ts}}


def _rate(per_minute: float, burst: int | None) -> str:
    text = f"{per_minute:g}/min"
    return text + (f" burst {burst}" if burst is not None else "")


def _holders(rules: RulesFile) -> dict[str, list[tuple[str, str, str]]]:
    """capability -> [(agent, effective declared mode, grant rate limit)]."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for agent, ac in rules.agents.items():
        for g in ac.grants:
            cap = rules.capabilities.get(g.capability)
            if cap is None:
                continue
            mode = "live" if cap.resolved_effect == "read" else (g.mode or "dry_run")
            rl = _rate(g.rate_limit.per_minute, g.rate_limit.burst) if g.rate_limit else ""
            out.setdefault(g.capability, []).append((agent, mode, rl))
    return out


@dataclass
class SpecOp:
    """A spec operation as the catalogue sees it: its key, and its Tether route (None: unroutable)."""

    key: str
    method: str
    shape: tuple[str, ...] | None
    template: str | None
    why: str | None
    effect: str = "write"


def spec_operations(spec_path: str, rules: RulesFile, upstream: str, path_prefix: str | None) -> tuple[str, list[SpecOp]]:
    """(upstream, operations of the spec) with the path prefix put in front (given, or guessed)."""
    from .openapi import (
        READ_METHODS,
        Spec,
        is_post_read,
        iter_operations,
        shape,
        validate_prefix,
    )

    spec = Spec.load(spec_path)
    raw = list(iter_operations(spec, ""))
    if path_prefix is None:
        path_prefix = guess_prefix(rules, upstream, [shape(o.template) for o in raw if o.template])
    prefix = validate_prefix(path_prefix)
    ops = []
    for o in iter_operations(spec, prefix):
        effect = "read" if o.method in READ_METHODS or is_post_read(o.method, o.spec_path) else "write"
        ops.append(SpecOp(o.key, o.method, shape(o.template) if o.template else None, o.template, o.skip_reason,
                          effect))
    return upstream, ops


def guess_prefix(rules: RulesFile, upstream: str, shapes: list[tuple[str, ...]]) -> str:
    """The most common leading part of registered templates whose tail is a spec path ('' if none)."""
    from .openapi import shape

    wanted = {s for s in shapes if s}
    votes: Counter[tuple[str, ...]] = Counter()
    for cap in rules.capabilities.values():
        if cap.upstream != upstream or isinstance(cap, McpCapabilityConfig):
            continue
        segs = cap.path.strip("/").split("/") if cap.path != "/" else []
        sh = shape(cap.path)
        for cut in range(0, min(len(sh), 6) + 1):
            if sh[cut:] in wanted:
                votes[tuple(segs[:cut])] += 1
                break
    if not votes:
        return ""
    best = votes.most_common(1)[0][0]
    return "/" + "/".join(best) if best else ""


def build(rules: RulesFile, traffic: Traffic | None = None,
          spec: tuple[str, list[SpecOp]] | None = None) -> Catalogue:
    from .openapi import shape

    holders = _holders(rules)
    rows: list[Row] = []
    for name, cap in rules.capabilities.items():
        cls, reasons = readiness(cap)
        hs = holders.get(name, [])
        rate = _rate(cap.rate_limit.per_minute, cap.rate_limit.burst) if cap.rate_limit else ""
        grant_rates = [f"{a}: {rl}" for a, _, rl in hs if rl]
        up_rl = getattr(rules.upstreams.get(cap.upstream), "rate_limit", None)
        if up_rl is not None:
            grant_rates.append(f"upstream: {_rate(up_rl.per_minute, up_rl.burst)}")
        if grant_rates:
            rate = "; ".join(([rate] if rate else []) + grant_rates)
        comp = "" if cap.resolved_effect == "read" else (
            "auto" if cap.compensation == "auto" else "non-compensable" if cap.compensation == "non_compensable"
            else "none")
        method, path = ("MCP", f"{cap.kind} {cap.target}") if isinstance(cap, McpCapabilityConfig) else (
            cap.method, cap.path)
        rows.append(Row(
            name=name, upstream=cap.upstream, method=method, path=path, effect=cap.resolved_effect,
            holders=[(a, m) for a, m, _ in hs], rate_limit=rate, compensation=comp,
            requests=None if traffic is None else traffic.requests.get(name, 0),
            decisions={} if traffic is None else dict(sorted(traffic.decisions.get(name, Counter()).items())),
            readiness=cls, reasons=reasons))
    if spec is not None:
        up, ops = spec
        by_shape: dict[tuple[str, tuple[str, ...]], list[Row]] = {}
        for r in rows:
            if r.upstream == up:
                by_shape.setdefault((r.method, shape(r.path)), []).append(r)
        for op in ops:
            if op.shape is None:
                rows.append(Row(name="", upstream=up, method=op.method, path=op.key.split(" ", 1)[1],
                                effect=op.effect, holders=[],
                                rate_limit="", compensation="", requests=None, decisions={}, readiness=INCOMPATIBLE,
                                reasons=[f"no route: {op.why}"], operation=op.key, registered=False))
                continue
            covering = by_shape.get((op.method, op.shape))
            if covering:
                for r in covering:
                    r.operation = r.operation or op.key
                continue
            rows.append(Row(name="", upstream=up, method=op.method, path=op.template or "",
                            effect=op.effect, holders=[],
                            rate_limit="", compensation="", requests=None, decisions={}, readiness=NOT_REGISTERED,
                            reasons=[], operation=op.key, registered=False))
    summaries = [summarise(up, [r for r in rows if r.upstream == up], rules, traffic)
                 for up in _upstream_order(rules, rows)]
    return Catalogue(rows, summaries, traffic)


def _upstream_order(rules: RulesFile, rows: Iterable[Row]) -> list[str]:
    out = list(rules.upstreams)
    for r in rows:
        if r.upstream not in out:
            out.append(r.upstream)
    return out


def summarise(upstream: str, rows: list[Row], rules: RulesFile, traffic: Traffic | None) -> Summary:
    counts: Counter[str] = Counter({c: 0 for c in CLASSES})
    for r in rows:
        counts[r.readiness] += 1
    registered = [r for r in rows if r.registered]
    held = [r for r in registered if r.holders]
    writes = [r for r in registered if r.effect == "write"]
    held_writes = [r for r in held if r.effect == "write"]
    live_writes = [r for r in held_writes if any(m in ("live", "canary") for _, m in r.holders)]
    live_comp = [r for r in live_writes if r.compensation == "auto"]
    live_uncomp = len(live_writes) - len(live_comp)

    live_comp_ids = {id(r) for r in live_comp}

    def native(r: Row) -> bool:
        return id(r) in live_comp_ids and is_validated(rules.capabilities[r.name]) and bool(r.requests)

    if not held:
        stage, why = 0, "no agent holds a capability of this upstream"
    elif not held_writes:
        stage, why = 1, f"agents hold {len(held)} read(s) and no write"
    elif not live_comp:
        stage, why = 2, f"agents hold {len(held_writes)} write(s), none live with compensation"
    else:
        n_native = sum(1 for r in writes if native(r))
        if traffic is not None and n_native * 2 > len(writes):
            stage, why = 4, (f"{n_native} of {len(writes)} write(s) live, compensable, schema-validated, "
                             "with traffic")
        else:
            stage = 3
            why = f"{len(live_comp)} write(s) live or canary with compensation"
            if traffic is None:
                why += "; no journal read, so stage 4 cannot be evidenced"
            else:
                why += f"; {n_native} of {len(writes)} write(s) meet stage 4"
    if live_uncomp:
        why += f"; {live_uncomp} live write(s) cannot be undone"
    return Summary(upstream, counts, stage, why, live_uncomp)


# --------------------------------------------------------------------------- output


COLUMNS = ("capability", "upstream", "route", "effect", "holders", "rate limit", "compensation", "traffic",
           "readiness")


def _traffic_text(r: Row) -> str:
    if r.requests is None:
        return "-" if r.registered else ""
    if not r.requests:
        return "0"
    return f"{r.requests} (" + ", ".join(f"{k} {v}" for k, v in r.decisions.items()) + ")"


def _cells(r: Row) -> list[str]:
    readiness = r.readiness + (f" ({'; '.join(r.reasons)})" if r.reasons else "")
    return [r.name or "-", r.upstream, f"{r.method} {r.path}", r.effect,
            ", ".join(f"{a}:{m}" for a, m in r.holders) or ("-" if r.registered else ""),
            r.rate_limit or ("-" if r.registered else ""), r.compensation or "-", _traffic_text(r), readiness]


SUMMARY_COLUMNS = ("upstream", "operations", AGENT_READY, NEEDS_WRAPPING, INCOMPATIBLE, NOT_REGISTERED, "stage")


def _pct(share: float) -> str:
    return "<1%" if 0 < share < 0.005 else ">99%" if 0.995 <= share < 1 else f"{share:.0%}"


def _summary_cells(s: Summary) -> list[str]:
    return [s.upstream, str(s.total)] + [f"{s.counts[c]} ({_pct(s.share(c))})" for c in CLASSES] + [
        f"{s.stage} {STAGES[s.stage]}"]


def _table(header: Iterable[str], rows: list[list[str]]) -> str:
    header = list(header)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _md(header: Iterable[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _journal_line(c: Catalogue) -> str:
    if c.traffic is None:
        return "Traffic: no journal read (pass --store, or a rules file whose server.store exists)."
    t = c.traffic
    if not t.records:
        return "Traffic: the journal is empty."
    return f"Traffic: {t.records} journal record(s) from {t.first_ts} to {t.last_ts}."


def render(c: Catalogue, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(c.to_dict(), indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["capability", "upstream", "method", "path", "effect", "holders", "rate_limit", "compensation",
                    "requests", "decisions", "readiness", "reasons", "operation"])
        for r in c.rows:
            w.writerow([r.name, r.upstream, r.method, r.path, r.effect, " ".join(f"{a}:{m}" for a, m in r.holders),
                        r.rate_limit, r.compensation, "" if r.requests is None else r.requests,
                        " ".join(f"{k}:{v}" for k, v in r.decisions.items()), r.readiness, "; ".join(r.reasons),
                        r.operation or ""])
        return buf.getvalue()
    rows = [_cells(r) for r in c.rows]
    sums = [_summary_cells(s) for s in c.summaries]
    stages = "Stages: " + ", ".join(f"{k} {v}" for k, v in STAGES.items()) + "."
    if fmt == "markdown":
        out = "## Capabilities\n\n" + _md(COLUMNS, rows) + "\n## Readiness by upstream\n\n" + _md(SUMMARY_COLUMNS, sums)
        out += "\n" + "\n".join(f"* **{s.upstream}**: stage {s.stage} ({STAGES[s.stage]}) — {s.evidence}."
                                for s in c.summaries)
        return out + "\n\n" + stages + " " + _journal_line(c) + "\n"
    out = _table(COLUMNS, rows) + "\n" + _table(SUMMARY_COLUMNS, sums)
    out += "".join(f"{s.upstream}: stage {s.stage} ({STAGES[s.stage]}): {s.evidence}\n" for s in c.summaries)
    return out + stages + "\n" + _journal_line(c) + "\n"
