"""Governance: promotion gates and canaries, per-agent SLIs and error budgets, quarantine, metrics.

**Modes.** A write's mode comes from, in order: a stored promotion (``tether promote``, kept in the store
so it survives restarts and is shared by replicas), else the grant's ``mode`` in the rules, else
``dry_run``. Reads are always live. A composite request runs live only if every write inside it would.

**Canary.** In ``canary`` mode a share of writes (``canary_percent``) goes live, each write's side drawn
from the operating system's CSPRNG when it arrives; the rest is captured as dry-run. The draw is not
derived from anything the agent sees or sends (the request id is a counter the agent can observe, so a
hash of it would let an agent predict which of its writes go live and send only those), and the side
is revealed only after the fact. ``tether grants status`` compares the two.

**Promotion gates.** ``dry_run → canary → live`` succeeds only when the grant's dry-run record meets the
capability's ``promotion`` thresholds over its window: enough reviewed items, a high enough approval
rate, and not too many approvals that needed an edit. ``--force --reason`` overrides, journaled as such.

**Error budgets.** Each agent's requests are counted over a sliding window; bad outcomes are denials
(including validation failures and rate-limit hits), upstream errors, rejected reviews and rollbacks.
When the bad share exceeds the budget (with at least ``min_requests`` seen), the agent is quarantined
*before the response that tipped it is sent*, so the very next request is already governed: its writes
are forced to dry-run (or refused with 403 ``agent_quarantined``), reads continue, an alert goes out.
``tether agents release`` lifts it.

**Many processes** (``--workers`` on one SQLite file, replicas on one PostgreSQL store): one gateway.
Each process counts its own outcomes and adds them to shared counts in the store (at once after a bad
outcome, else every second), reading back every process's totals in the same transaction; it judges on
those totals plus what it has not added yet. The first process whose judgement tips records the
quarantine (compare-and-set: one quarantine, one journal event, one alert) and signals the others —
PostgreSQL ``NOTIFY`` on the schema's channel, a signal file for workers on SQLite — which re-read the
quarantines, promotions and quota blocks at once (a few milliseconds; every 2 s regardless). A release
restarts the agent's window for every process: its shared counts are dropped and its *epoch* moves on,
so counts or judgements made before the release, still on their way, are voided by the store.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import ErrorBudget, PromotionGate
from ..errors import TetherError
from ..journal.writer import base_record

if TYPE_CHECKING:
    from ..core.exchange import Exchange
    from ..core.runtime import Runtime
    from ..policy.registry import Grant

log = logging.getLogger("tether.governance")

_BUCKET = 10.0  # seconds per SLI bucket
SLI_KINDS = ("requests", "denials", "validation", "rate_limited", "upstream_errors", "rejected_reviews",
             "rollbacks", "replay_failures")
_BAD = ("denials", "upstream_errors", "rejected_reviews", "rollbacks", "replay_failures")
_VALIDATION = frozenset({"field_not_allowed", "field_required", "constraint_violated", "schema_violation",
                         "malformed_json", "duplicate_json_key", "json_too_deep", "body_content_type_mismatch"})


@dataclass
class Window:
    """Counts per kind in fixed buckets over a sliding window."""

    span: float
    buckets: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)
    state: Any = None  # the rules state whose budget set ``span`` (re-checked only after a reload)

    def add(self, kind: str, now: float, n: int = 1) -> None:
        start = now - (now % _BUCKET)
        if not self.buckets or self.buckets[-1][0] != start:
            self.buckets.append((start, {}))
            self._trim(now)
        counts = self.buckets[-1][1]
        counts[kind] = counts.get(kind, 0) + n

    def _trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - self.span - _BUCKET:
            self.buckets.popleft()

    def totals(self, now: float) -> dict[str, int]:
        self._trim(now)
        out = {k: 0 for k in SLI_KINDS}
        cutoff = now - self.span
        for start, counts in self.buckets:
            if start + _BUCKET > cutoff:
                for k, v in counts.items():
                    out[k] = out.get(k, 0) + v
        return out


def canary_live(percent: float) -> bool:
    """One unpredictable draw (``secrets``: the OS CSPRNG, one getrandom call) per canary write."""
    return secrets.randbelow(10000) < percent * 100


class SharedCounts:
    """Error-budget counts when several processes share the store (see the module doc).

    ``base``: every process's totals per kind as of the last sync (ours included); ``pending``: what this
    process observed since, per (bucket start, kind); ``inflight``: what the sync under way carries."""

    def __init__(self) -> None:
        self.base: dict[str, dict[str, int]] = {}
        self.pending: dict[str, dict[tuple[float, str], int]] = {}
        self.inflight: dict[str, dict[tuple[float, str], int]] = {}
        self.epochs: dict[str, int] = {}

    def add(self, agent: str, kind: str, now: float, n: int = 1) -> None:
        key = (now - (now % _BUCKET), kind)
        p = self.pending.get(agent)
        if p is None:
            p = self.pending[agent] = {}
        p[key] = p.get(key, 0) + n

    def totals(self, agent: str) -> dict[str, int]:
        out = {k: 0 for k in SLI_KINDS}
        for k, v in self.base.get(agent, {}).items():
            out[k] = out.get(k, 0) + v
        for src in (self.pending, self.inflight):
            for (_, k), v in src.get(agent, {}).items():
                out[k] = out.get(k, 0) + v
        return out

    def set_epochs(self, epochs: dict[str, int]) -> None:
        """A new epoch (a release somewhere): what was counted before it no longer counts."""
        for agent, epoch in epochs.items():
            if epoch != self.epochs.get(agent, 0):
                self.pending.pop(agent, None)
                self.base.pop(agent, None)
            self.epochs[agent] = epoch


class Governance:
    def __init__(self, gw: "Runtime") -> None:
        self.gw = gw
        from .alerts import Alerter
        from .metrics import Metrics

        self.alerter = Alerter(gw, list(gw.state.rules.governance.alerts))
        self.metrics = Metrics()
        self.promoted: dict[tuple[str, str], str] = {}
        self.on_change: list[Any] = []  # callables: promotions or quarantines changed
        self.quarantined: dict[str, dict[str, Any]] = {}
        self.windows: dict[str, Window] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._depth_alerted_at = 0.0
        # many processes (set at start): counts shared through the store, changes signalled
        self.shared = False
        self.counts = SharedCounts()
        self._judged: dict[str, dict[str, Any]] = {}  # quarantines judged here, not yet confirmed by the store
        self._sync_wanted = asyncio.Event()
        self._refresh_wanted = asyncio.Event()
        self._pruned_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        from ..store import shared_by_processes

        self.shared = shared_by_processes(self.gw.store, self.gw.server_cfg.workers)
        limiter = self.gw.rate_limiter
        if limiter.shared:
            self.metrics.add_counter_source(
                "tether_ratelimit_lease_requests", "Leases this process asked of the shared rate-limit buckets "
                "(each one round trip to the store or Redis)", lambda: limiter.round_trips)
        self.alerter.start()
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="governance")
        if self.shared:
            await self.gw.store.watch(self._on_signal)
            self._tasks = [loop.create_task(self._sync_loop(), name="governance-sync"),
                           loop.create_task(self._refresh_loop(), name="governance-signals")]

    async def stop(self) -> None:
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.shared:
            try:
                await self._sync_once()  # this process's last counts are not lost
            except Exception:  # noqa: BLE001
                pass
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.alerter.stop()

    async def refresh(self) -> None:
        """Reload stored promotions, quarantines, error-budget epochs and quota blocks (every process
        shares them through the store)."""
        store = self.gw.store
        before = (dict(self.promoted), set(self.quarantined))
        self.promoted = {(p["agent"], p["capability"]): p["mode"] for p in await store.promotions()}
        stored = await store.quarantines()
        # a quarantine judged here but not yet in the store stays in force meanwhile
        self.quarantined = {**{a: r for a, r in self._judged.items() if a not in stored}, **stored}
        if before != (self.promoted, set(self.quarantined)):
            self._changed()
        if self.shared:
            self.counts.set_epochs(await store.sli_epochs())
        await self.gw.quota.refresh()

    def _on_signal(self, topic: str | None) -> None:
        self._refresh_wanted.set()

    async def _refresh_loop(self) -> None:
        """Re-read shared state as soon as another process signals a change (coalesced)."""
        while True:
            await self._refresh_wanted.wait()
            self._refresh_wanted.clear()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the 2 s loop tries again
                log.error("governance refresh on signal failed: %s", exc)

    def _changed(self) -> None:
        """Promotions or quarantines changed (here or in another process): tell who listens (the MCP door
        announces new tool lists)."""
        for hook in list(self.on_change):
            try:
                hook()
            except Exception:  # noqa: BLE001 - a listener never breaks governance
                log.exception("governance change listener failed")

    async def signal(self, topic: str) -> None:
        """Tell the other processes that shared state changed (they re-read it at once)."""
        self._changed()
        if self.shared:
            try:
                await self.gw.store.signal(topic)
            except Exception as exc:  # noqa: BLE001 - the others still re-read within 2 s
                log.error("could not signal %s to the other processes: %s", topic, exc)

    async def _sync_loop(self) -> None:
        """Add this process's counts to the shared ones: at once after a bad outcome, else every second."""
        while True:
            try:
                await asyncio.wait_for(self._sync_wanted.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._sync_wanted.clear()
            try:
                await self._sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - counts are kept and sent with the next sync
                log.error("error-budget sync failed: %s", exc)

    async def _sync_once(self) -> None:
        c = self.counts
        if c.inflight:
            return
        c.inflight, c.pending = c.pending, {}
        increments = [(agent, c.epochs.get(agent, 0), start, kind, n)
                      for agent, d in c.inflight.items() for (start, kind), n in d.items()]
        now = time.time()
        agents = self.gw.state.rules.agents
        since = {a: now - self.budget(a).window - _BUCKET for a in agents}
        prune = None
        if now - self._pruned_at > 60:
            self._pruned_at = now
            prune = now - max([self.budget(a).window for a in agents] or [0.0]) - 2 * _BUCKET
        try:
            totals, epochs = await self.gw.store.sli_sync(increments, since, prune)
        except BaseException:
            for agent, d in c.inflight.items():  # keep them for the next sync
                for key, n in d.items():
                    p = c.pending.setdefault(agent, {})
                    p[key] = p.get(key, 0) + n
            c.inflight = {}
            raise
        c.inflight = {}
        c.base = totals
        c.set_epochs(epochs)
        now = time.time()
        for agent in agents:
            self._judge(agent, now)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await self.refresh()
                await self._gauges()
                now = time.time()
                for agent in list(self.windows if not self.shared else self.gw.state.rules.agents):
                    self._judge(agent, now)  # a good request never triggers a judgement: catch the case
                    # where reaching min_requests tips the share over
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("governance refresh failed: %s", exc)

    async def _gauges(self) -> None:
        depth = await self.gw.store.review_count("pending")
        self.metrics.review_queue_depth.set(depth)
        self.metrics.open_transactions.set(await self.gw.store.tx_count("open"))
        self.metrics.quarantined_agents.set(len(self.quarantined))
        threshold = self.gw.server_cfg.review.alert_queue_depth
        if threshold is not None and depth > threshold and time.time() - self._depth_alerted_at > 300:
            self._depth_alerted_at = time.time()
            await self.alert("review_queue_depth", {"pending": depth, "threshold": threshold})

    # -- modes ----------------------------------------------------------------------------------

    def grant_mode(self, grant: "Grant") -> str:
        if not grant.capability.is_write:
            return "live"
        return self.promoted.get((grant.agent, grant.capability.name)) or grant.mode

    async def grant_modes(self, agent: str) -> dict[str, str]:
        return {g.capability.name: self.grant_mode(g) for g in self.gw.state.registry.agent_grants.get(agent, [])}

    def canary_percent(self, grant: "Grant") -> float:
        if grant.config.canary_percent is not None:
            return grant.config.canary_percent
        gate = grant.capability.config.promotion
        return gate.canary_percent if gate is not None else 10.0

    async def decide(self, ex: "Exchange") -> str:
        grants = [g for g in (ex.extra.get("grants") or []) if g is not None and g.capability.is_write]
        if not grants:
            return "live"
        agent = grants[0].agent
        if agent in self.quarantined:
            action = self.quarantine_action(agent)
            ex.quarantined = True
            if action == "refuse":
                raise TetherError("agent_quarantined", f"agent {agent} is quarantined: "
                                  f"{self.quarantined[agent].get('reason', 'error budget spent')}; its writes are refused",
                                  headers={"X-Tether-Quarantined": "true"})
            return "dry_run"
        modes = [self.grant_mode(g) for g in grants]
        if all(m == "live" for m in modes):
            return "live"
        if all(m in ("live", "canary") for m in modes):
            percent = min(self.canary_percent(g) for g, m in zip(grants, modes) if m == "canary")
            live = canary_live(percent)
            ex.extra["canary"] = "live" if live else "dry_run"
            return "live" if live else "dry_run"
        return "dry_run"

    def quarantine_action(self, agent: str) -> str:
        rules = self.gw.state.rules
        a = rules.agents.get(agent)
        return (a.quarantine_action if a is not None and a.quarantine_action else rules.governance.quarantine_action)

    # -- promotion ------------------------------------------------------------------------------

    def gate_for(self, agent: str, capability: str) -> PromotionGate:
        cap = self.gw.state.registry.capabilities[capability]
        return cap.config.promotion or PromotionGate()

    async def evidence(self, agent: str, capability: str) -> dict[str, Any]:
        gate = self.gate_for(agent, capability)
        stats = await self.gw.store.review_stats(agent, capability, time.time() - gate.window)
        reviewed = stats["approved"] + stats["rejected"]
        approved_ok = stats["approved"] - stats["replay_failed"]
        rate = approved_ok / reviewed if reviewed else 0.0
        edit_share = stats["approved_edited"] / stats["approved"] if stats["approved"] else 0.0
        return {"reviewed": reviewed, "approved": stats["approved"], "rejected": stats["rejected"],
                "replay_failed": stats["replay_failed"], "edited": stats["approved_edited"],
                "approval_rate": round(rate, 4), "edit_share": round(edit_share, 4),
                "pending": stats["pending"], "expired": stats["expired"],
                "gate": gate.model_dump(), "window_days": round(gate.window / 86400, 2)}

    def gate_problems(self, ev: dict[str, Any]) -> list[str]:
        gate = ev["gate"]
        out = []
        if ev["reviewed"] < gate["min_reviewed"]:
            out.append(f"{gate['min_reviewed'] - ev['reviewed']} more reviewed item(s) needed "
                       f"({ev['reviewed']} of {gate['min_reviewed']})")
        if ev["reviewed"] and ev["approval_rate"] < gate["min_approval_rate"]:
            out.append(f"approval rate {ev['approval_rate']:.1%} is below {gate['min_approval_rate']:.1%}")
        elif not ev["reviewed"]:
            out.append(f"no approval rate yet (needs ≥ {gate['min_approval_rate']:.1%})")
        if ev["edit_share"] > gate["max_edit_share"]:
            out.append(f"{ev['edit_share']:.1%} of approvals needed an edit (at most {gate['max_edit_share']:.1%})")
        return out

    async def promote(self, agent: str, capability: str, to: str, *, by: str, force: bool = False,
                      reason: str | None = None) -> dict[str, Any]:
        registry = self.gw.state.registry
        grant = registry.grant(agent, capability)
        if grant is None:
            raise TetherError("not_found", f"capability {capability!r} is not granted to agent {agent!r}")
        if not grant.capability.is_write:
            raise TetherError("bad_request", f"{capability} is a read: reads are always live")
        if to not in ("dry_run", "canary", "live"):
            raise TetherError("bad_request", "--to is dry_run, canary or live")
        current = self.grant_mode(grant)
        ev = await self.evidence(agent, capability)
        problems = self.gate_problems(ev) if to in ("canary", "live") else []
        if problems and not force:
            raise TetherError("conflict", "promotion gate not met: " + "; ".join(problems),
                              details={"evidence": ev, "missing": problems, "from": current, "to": to})
        if force and not (reason and reason.strip()):
            raise TetherError("bad_request", "--force needs --reason")
        row = {"agent": agent, "capability": capability, "mode": to, "from": current, "at": time.time(), "by": by,
               "forced": bool(force and problems), "reason": reason, "evidence": ev, "missing": problems}
        await self.gw.store.promotion_add(row)
        self.promoted[(agent, capability)] = to
        await self.signal("promotion")
        rec = base_record("governance", agent=agent, capability=capability, decision="promoted")
        rec.update({"event": "forced_promotion" if row["forced"] else "promotion", "from": current, "to": to,
                    "reviewer": by, "reason": reason, "missing": problems or None,
                    "evidence": {k: ev[k] for k in ("reviewed", "approval_rate", "edit_share")}})
        await self.gw.journal.write(rec)
        return row

    # -- observation ----------------------------------------------------------------------------

    def _window(self, agent: str) -> Window:
        w = self.windows.get(agent)
        state = self.gw.state
        if w is not None and w.state is state:
            return w
        budget = self.budget(agent)
        if w is None or w.span != budget.window:
            w = self.windows[agent] = Window(budget.window)
        w.state = state
        return w

    def budget(self, agent: str) -> ErrorBudget:
        rules = self.gw.state.rules
        a = rules.agents.get(agent)
        return a.error_budget if a is not None and a.error_budget is not None else rules.governance.error_budget

    def _add(self, agent: str, kind: str, now: float) -> None:
        if self.shared:
            self.counts.add(agent, kind, now)
        else:
            self._window(agent).add(kind, now)

    def observe(self, ex: "Exchange") -> None:
        self.metrics.observe(ex)
        agent = ex.agent
        if agent is None or agent not in self.gw.state.rules.agents:
            return
        now = time.time()
        self._add(agent, "requests", now)
        bad = False
        if ex.decision == "denied" and ex.error is not None:
            code = ex.error.code
            self._add(agent, "denials", now)
            bad = True
            if code in _VALIDATION:
                self._add(agent, "validation", now)
            elif code == "rate_limited":
                self._add(agent, "rate_limited", now)
        elif ex.forwarded and (ex.error is not None or (ex.status is not None and ex.status >= 500)
                               or ex.extra.get("outcome", {}).get("upstream_failure")):
            self._add(agent, "upstream_errors", now)
            bad = True
        if bad:  # a good outcome only lowers the bad share: judging is needed after a bad one alone
            self._judge(agent, now)
            if self.shared:
                self._sync_wanted.set()  # the other processes' counts, and ours for them, now

    def on_captured(self, ex: "Exchange") -> None:
        return None

    def on_review_decided(self, item: dict[str, Any], outcome: str, edited: bool = False) -> None:
        agent = item["agent"]
        if agent not in self.gw.state.rules.agents:
            return
        now = time.time()
        if outcome == "rejected":
            self._add(agent, "rejected_reviews", now)
        elif outcome == "replay_failed":
            self._add(agent, "replay_failures", now)
        self._judge(agent, now)
        self._sync_wanted.set()

    def on_rollback(self, tx: dict[str, Any]) -> None:
        agent = tx.get("agent")
        if agent in self.gw.state.rules.agents:
            now = time.time()
            self._add(agent, "rollbacks", now)
            self._judge(agent, now)
            self._sync_wanted.set()

    def on_overload(self) -> None:
        self.metrics.overloaded.inc()

    def on_journal_commit(self, seconds: float, records: int) -> None:
        self.metrics.journal_commit.observe(seconds)
        self.metrics.journal_batch.observe(records)

    def sli(self, agent: str) -> dict[str, Any]:
        now = time.time()
        t = self.counts.totals(agent) if self.shared else self._window(agent).totals(now)
        budget = self.budget(agent)
        bad = sum(t[k] for k in _BAD)
        events = t["requests"] + t["rejected_reviews"] + t["rollbacks"] + t["replay_failures"]
        ratio = bad / events if events else 0.0
        allowed = budget.max_bad_ratio * max(events, budget.min_requests)
        return {**t, "bad": bad, "events": events, "bad_ratio": round(ratio, 4),
                "budget": budget.model_dump(), "budget_left": max(0.0, round(allowed - bad, 2)),
                "budget_left_ratio": round(max(0.0, 1 - (ratio / budget.max_bad_ratio)) if budget.max_bad_ratio else 0.0, 4)}

    def _judge(self, agent: str, now: float) -> None:
        if agent in self.quarantined:
            return
        s = self.sli(agent)
        budget = self.budget(agent)
        if s["requests"] >= budget.min_requests and s["bad_ratio"] > budget.max_bad_ratio:
            reason = (f"error budget spent: {s['bad']} bad of {s['events']} "
                      f"({s['bad_ratio']:.1%} > {budget.max_bad_ratio:.1%} over {budget.window:g}s)")
            row = {"agent": agent, "since": now, "reason": reason, "sli": s, "by": "error-budget"}
            if self.shared:  # judged on this epoch's counts: a release meanwhile voids it (in the store)
                row["epoch"] = self.counts.epochs.get(agent, 0)
            # in memory first: the very next request is governed even before the store write lands
            self.quarantined[agent] = row
            self._judged[agent] = row
            self._spawn(self._persist_quarantine(agent, row))

    async def _persist_quarantine(self, agent: str, row: dict[str, Any]) -> bool:
        """Record the quarantine; only the process whose record wins journals, alerts and signals it
        (one quarantine, one event). A loser adopts what the store holds."""
        try:
            won = await self.gw.store.quarantine_set(agent, row)
        except Exception as exc:  # noqa: BLE001 - stays quarantined here (fail closed); retried by judging
            log.error("could not store the quarantine of %s: %s", agent, exc)
            return False
        finally:
            if self._judged.get(agent) is row:
                del self._judged[agent]
        if not won:
            stored = (await self.gw.store.quarantines()).get(agent)
            if stored is not None:
                self.quarantined[agent] = stored
            elif self.quarantined.get(agent) is row:
                del self.quarantined[agent]  # voided: the agent was released since the counts it was judged on
            return False
        rec = base_record("governance", agent=agent, decision="quarantined")
        rec.update({"event": "quarantine", "reason": row["reason"], "action": self.quarantine_action(agent)})
        await self.gw.journal.write(rec)
        await self.signal(f"quarantine:{agent}")
        await self.alert("quarantine", {"agent": agent, "reason": row["reason"],
                                        "action": self.quarantine_action(agent)})
        return True

    async def quarantine(self, agent: str, *, by: str, reason: str) -> dict[str, Any]:
        if agent not in self.gw.state.rules.agents:
            raise TetherError("not_found", f"no agent {agent!r}")
        row = {"agent": agent, "since": time.time(), "reason": reason, "by": by}
        self.quarantined[agent] = row
        await self._persist_quarantine(agent, row)
        return self.quarantined.get(agent, row)

    async def release(self, agent: str, *, by: str, reason: str) -> bool:
        if not reason or not reason.strip():
            raise TetherError("bad_request", "a release needs a reason")
        was = await self.gw.store.quarantine_release(agent, by, reason)
        self._judged.pop(agent, None)
        was = self.quarantined.pop(agent, None) is not None or was
        if not was:
            raise TetherError("not_found", f"agent {agent!r} is not quarantined")
        self.windows.pop(agent, None)  # a fresh window: the old evidence led to the quarantine
        if self.shared:  # ... for every process: the store moved the epoch on; ours follows now
            self.counts.set_epochs(await self.gw.store.sli_epochs())
            await self.signal(f"release:{agent}")
        rec = base_record("governance", agent=agent, decision="released")
        rec.update({"event": "release", "reviewer": by, "reason": reason})
        await self.gw.journal.write(rec)
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- status ---------------------------------------------------------------------------------

    async def agents_status(self) -> list[dict[str, Any]]:
        out = []
        for agent in self.gw.state.rules.agents:
            grants = []
            for g in self.gw.state.registry.agent_grants.get(agent, []):
                grants.append({"capability": g.capability.name, "effect": g.capability.effect,
                               "declared_mode": g.declared_mode, "mode": self.grant_mode(g)})
            q = self.quarantined.get(agent)
            if q is not None:
                q = {**q, "action": self.quarantine_action(agent)}
            out.append({"agent": agent, "quarantined": q, "sli": self.sli(agent), "grants": grants})
        return out

    async def grants_status(self) -> list[dict[str, Any]]:
        """Per write grant: mode, review evidence, and canary outcomes (live side vs dry-run side)."""
        out = []
        for agent, grants in self.gw.state.registry.agent_grants.items():
            for g in grants:
                if not g.capability.is_write:
                    continue
                ev = await self.evidence(agent, g.capability.name)
                row = {"agent": agent, "capability": g.capability.name, "mode": self.grant_mode(g),
                       "evidence": ev, "gate_met": not self.gate_problems(ev), "missing": self.gate_problems(ev)}
                row["canary"] = self.metrics.canary_outcomes(agent, g.capability.name)
                out.append(row)
        return out

    # -- alerts ---------------------------------------------------------------------------------

    async def alert(self, event: str, payload: dict[str, Any]) -> None:
        """Journal the alert and queue it for the webhooks (never blocks on delivery)."""
        log.warning("alert %s: %s", event, payload)
        self.metrics.alerts.labels(event=event).inc()
        await self.gw.journal_system("alert", alert=event, **{k: v for k, v in payload.items() if k != "event"})
        self.alerter.targets = list(self.gw.state.rules.governance.alerts)
        self.alerter.send(event, payload)
