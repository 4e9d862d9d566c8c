"""Time series for the console's charts, computed from the store (the journal is the evidence).

``GET /api/stats?since=24h&buckets=24`` answers, per agent and per bucket of time:

* ``requests`` — requests it made (intent and denial records);
* ``bad`` — what its error budget counts: denials, upstream failures of its forwarded calls, rejected
  reviews, failed replays, rolled-back transactions; with the budget (``max_bad_ratio``) to draw against;
* ``approved`` / ``rejected`` — review decisions on its dry-run writes, and the promotion gate's
  ``min_approval_rate`` (the evidence a promotion is judged on);
* ``quarantines`` — when it was quarantined and released;

and per upstream: ``requests``, ``errors`` (5xx answers and transport failures) and ``quota``.

Quota: :func:`quota_of` reads the gateway's quota guard (:mod:`proxy.safety.quota`, ``snapshot() -> {upstream:
{remaining, limit, at}}``: what each upstream last said about the quota it has left); outcome records carrying ``quota_remaining`` (and
``quota_limit``) are charted over time. With neither, ``quota`` is null and the console says so.

The scan is bounded (``MAX_RECORDS``; the answer says ``truncated``) and cached for a few seconds, so a
console left open costs the store little.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ...journal.writer import now_iso

if TYPE_CHECKING:
    from ...core.runtime import Runtime

MAX_RECORDS = 200_000
CACHE_SECONDS = 5.0
_UPSTREAM_FAILURES = frozenset({"upstream_unavailable", "upstream_timeout", "upstream_response_too_large"})


def quota_of(gw: "Runtime") -> dict[str, dict[str, Any]]:
    """The hook for upstream quota (see the module docstring): {upstream: {remaining, limit, at}}."""
    tracker = getattr(gw, "quota", None)
    snap = getattr(tracker, "snapshot", None)
    if not callable(snap):
        return {}
    try:
        out = snap()
    except Exception:  # noqa: BLE001 - a chart never fails the page
        return {}
    return out if isinstance(out, dict) else {}


_SECONDS: dict[str, float] = {}


def parse_ts(ts: Any) -> float | None:
    """The journal's ``2026-11-25T10:00:00.123456Z`` as epoch seconds (the seconds part parsed once)."""
    if not isinstance(ts, str) or len(ts) < 20:
        return None
    head = ts[:19]
    base = _SECONDS.get(head)
    if base is None:
        import datetime as _dt

        try:
            base = _dt.datetime.fromisoformat(head + "+00:00").timestamp()
        except ValueError:
            return None
        if len(_SECONDS) > 100_000:
            _SECONDS.clear()
        _SECONDS[head] = base
    frac = ts[19:].rstrip("Z")
    try:
        return base + (float(frac) if frac.startswith(".") else 0.0)
    except ValueError:
        return base


def _agent_row(n: int) -> dict[str, Any]:
    return {"requests": [0] * n, "bad": [0] * n, "denied": [0] * n, "upstream_errors": [0] * n,
            "rejected": [0] * n, "approved": [0] * n, "rollbacks": [0] * n, "replay_failed": [0] * n,
            "quarantines": []}


def _upstream_row(n: int) -> dict[str, Any]:
    return {"requests": [0] * n, "errors": [0] * n, "quota_remaining": [None] * n, "quota_limit": None}


async def compute(gw: "Runtime", since_s: float, buckets: int) -> dict[str, Any]:
    now = time.time()
    start = now - since_s
    width = since_s / buckets
    agents: dict[str, dict[str, Any]] = {a: _agent_row(buckets) for a in gw.state.rules.agents}
    ups: dict[str, dict[str, Any]] = {u: _upstream_row(buckets) for u in gw.state.rules.upstreams}
    store = gw.store
    since = now_iso(start)
    after = 0
    scanned = 0
    truncated = False
    while True:
        rows = await store.journal_query(after_seq=after, since=since, limit=5000)
        if not rows:
            break
        for r in rows:
            scanned += 1
            rec = r.record()
            t = parse_ts(rec.get("ts"))
            if t is None:
                continue
            b = min(buckets - 1, max(0, int((t - start) / width)))
            _count(rec, b, t, agents, ups, buckets)
        after = rows[-1].seq
        if scanned >= MAX_RECORDS:
            truncated = True
            break
    for name, row in agents.items():
        budget = gw.governance.budget(name) if name in gw.state.rules.agents else None
        row["budget"] = {"max_bad_ratio": budget.max_bad_ratio, "window": budget.window,
                         "min_requests": budget.min_requests} if budget is not None else None
        gates = [g.capability.config.promotion for g in gw.state.registry.agent_grants.get(name, [])
                 if g.capability.is_write]
        rates = sorted({(p.min_approval_rate if p is not None else 0.95) for p in gates})
        row["min_approval_rate"] = rates[-1] if rates else None
        row["write_grants"] = len(gates)
    return {"since": start, "until": now, "bucket_seconds": width,
            "buckets": [start + i * width for i in range(buckets)], "scanned": scanned, "truncated": truncated,
            "agents": agents, "upstreams": ups}


def _count(rec: dict[str, Any], b: int, t: float, agents: dict[str, dict[str, Any]],
           ups: dict[str, dict[str, Any]], n: int) -> None:
    kind = rec.get("kind")
    agent = rec.get("agent")
    decision = rec.get("decision")
    a = agents.get(agent) if isinstance(agent, str) else None
    if a is None and isinstance(agent, str) and kind in ("request", "outcome", "review", "tx", "governance"):
        a = agents[agent] = _agent_row(n)  # an agent no longer in the rules still has a history
    up = ups.get(rec.get("upstream") or "")
    if kind == "request":
        if a is not None:
            a["requests"][b] += 1
            if decision == "denied":
                a["denied"][b] += 1
                a["bad"][b] += 1
        if up is not None and decision != "replay":
            up["requests"][b] += 1
    elif kind == "outcome":
        status = rec.get("status")
        failed = rec.get("forwarded") and ((isinstance(status, int) and status >= 500)
                                           or rec.get("error") in _UPSTREAM_FAILURES or rec.get("upstream_failure"))
        if failed:
            if a is not None and decision != "replay":
                a["upstream_errors"][b] += 1
                a["bad"][b] += 1
            if up is not None:
                up["errors"][b] += 1
        if decision == "replay" and rec.get("reason") == "replay_failed" and a is not None:
            a["replay_failed"][b] += 1
            a["bad"][b] += 1
        if up is not None and isinstance(rec.get("quota_remaining"), (int, float)):
            up["quota_remaining"][b] = rec["quota_remaining"]
            if isinstance(rec.get("quota_limit"), (int, float)):
                up["quota_limit"] = rec["quota_limit"]
    elif kind == "review" and a is not None:
        if decision == "approved":
            a["approved"][b] += 1
        elif decision == "rejected":
            a["rejected"][b] += 1
            a["bad"][b] += 1
    elif kind == "tx" and a is not None and decision == "rolled_back":
        a["rollbacks"][b] += 1
        a["bad"][b] += 1
    elif kind == "governance" and a is not None and decision in ("quarantined", "released"):
        a["quarantines"].append({"at": t, "event": decision, "reason": rec.get("reason")})


class StatsCache:
    def __init__(self) -> None:
        self._cache: dict[tuple[float, int], tuple[float, dict[str, Any]]] = {}

    async def get(self, gw: "Runtime", since_s: float, buckets: int) -> dict[str, Any]:
        key = (since_s, buckets)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            doc = hit[1]
        else:
            doc = await compute(gw, since_s, buckets)
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = (now, doc)
        return with_quota(gw, doc)


def with_quota(gw: "Runtime", doc: dict[str, Any]) -> dict[str, Any]:
    """The (cached) series with the quota as it is now (cheap, so never cached)."""
    quotas = quota_of(gw)
    ups = {}
    for name, row in doc["upstreams"].items():
        ups[name] = {**row, "quota": quotas.get(name),
                     "quota_tracked": name in quotas or any(v is not None for v in row["quota_remaining"])}
    return {**doc, "upstreams": ups}
