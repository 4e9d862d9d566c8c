"""Prometheus metrics (prometheus-client), served on the admin listener at ``/metrics``.

One registry per gateway (tests run several gateways in one process). Label values are bounded:
agents and capabilities come from the rules file (anything else is ``-``), decisions and status codes
are small sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .exchange import Exchange

_LAT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tether_requests", "Requests handled, by agent, capability, decision and status",
                                ["agent", "capability", "decision", "status"], registry=r)
        self.latency = Histogram("tether_request_duration_seconds", "Time from request to response head",
                                 ["decision"], buckets=_LAT_BUCKETS, registry=r)
        self.upstream_latency = Histogram("tether_upstream_duration_seconds", "Upstream response time",
                                          ["upstream"], buckets=_LAT_BUCKETS, registry=r)
        self.journal_commit = Histogram("tether_journal_commit_seconds", "Journal group-commit latency",
                                        buckets=_LAT_BUCKETS, registry=r)
        self.journal_batch = Histogram("tether_journal_batch_records", "Records per journal commit",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.review_queue_depth = Gauge("tether_review_queue_depth", "Pending dry-run review items", registry=r)
        self.open_transactions = Gauge("tether_open_transactions", "Open transactions", registry=r)
        self.quarantined_agents = Gauge("tether_quarantined_agents", "Agents in quarantine", registry=r)
        self.alerts = Counter("tether_alerts", "Alerts raised, by event", ["event"], registry=r)
        self.overloaded = Counter("tether_overloaded", "Requests refused because too many were in flight",
                                  registry=r)
        self.canary = Counter("tether_canary_writes", "Canary writes by side and outcome",
                              ["agent", "capability", "side", "outcome"], registry=r)
        self._canary_counts: dict[tuple[str, str], dict[str, int]] = {}
        # labelled children, looked up once: prometheus_client's labels() is costly on the hot path
        self._req_children: dict[tuple[str, str, str, str], Any] = {}
        self._lat_children: dict[str, Any] = {}
        self._up_children: dict[str, Any] = {}

    def observe(self, ex: "Exchange") -> None:
        agent = ex.agent if ex.agent is not None and ex.registry is not None and ex.agent in ex.registry.rules.agents \
            else "-"
        cap = ex.capability.name if ex.capability is not None else ("composite" if ex.composite else "-")
        decision = ex.decision or "-"
        status = str(ex.status) if ex.status is not None else "-"
        key = (agent, cap, decision, status)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self.requests.labels(agent=agent, capability=cap, decision=decision,
                                                                   status=status)
        child.inc()
        lat = self._lat_children.get(decision)
        if lat is None:
            lat = self._lat_children[decision] = self.latency.labels(decision=decision)
        lat.observe(ex.elapsed_ms() / 1000.0)
        if ex.upstream_latency_ms is not None and ex.upstream is not None:
            up = self._up_children.get(ex.upstream.name)
            if up is None:
                up = self._up_children[ex.upstream.name] = self.upstream_latency.labels(upstream=ex.upstream.name)
            up.observe(ex.upstream_latency_ms / 1000.0)
        side = ex.extra.get("canary")
        if side and ex.capability is not None:
            if side == "live":
                outcome = "ok" if ex.status is not None and ex.status < 400 and ex.error is None else "failed"
            else:
                outcome = "captured"
            self.canary.labels(agent=agent, capability=cap, side=side, outcome=outcome).inc()
            c = self._canary_counts.setdefault((agent, cap), {})
            key = f"{side}_{outcome}"
            c[key] = c.get(key, 0) + 1

    def canary_outcomes(self, agent: str, capability: str) -> dict[str, Any]:
        c = self._canary_counts.get((agent, capability), {})
        live = c.get("live_ok", 0) + c.get("live_failed", 0)
        return {"live": live, "live_ok": c.get("live_ok", 0), "live_failed": c.get("live_failed", 0),
                "dry_run": c.get("dry_run_captured", 0),
                "live_success_rate": round(c.get("live_ok", 0) / live, 4) if live else None}

    def render(self) -> bytes:
        return generate_latest(self.registry)
