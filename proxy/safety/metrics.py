"""Prometheus metrics (prometheus-client), served on the admin listener at ``/metrics``.

One registry per gateway (tests run several gateways in one process). Label values are bounded:
agents and capabilities come from the rules file (anything else is ``-``), decisions and status codes
are small sets.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from ..core.exchange import Exchange

_LAT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LE = (*(repr(float(b)) for b in _LAT_BUCKETS), "+Inf")  # the bucket labels, as Prometheus spells them


class _Histo:
    """Bucket counts and a sum, kept as plain numbers (cumulated only when scraped)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LAT_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_LAT_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip(_LE, self.counts):
            acc += n
            out.append((bound, acc))
        return out


class _HotPathCollector:
    """The per-request metrics, exported at scrape time.

    Why not prometheus_client's Counter/Histogram children: each ``inc``/``observe`` takes a lock and
    walks the buckets in Python — ~14 µs per request measured with everything observe() does. The
    event loop is single-threaded, so plain integers suffice; the library still does the exposition."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.latency: dict[str, _Histo] = {}
        self.upstream_latency: dict[str, _Histo] = {}

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("tether_requests", "Requests handled, by agent, capability, decision and status",
                                labels=["agent", "capability", "decision", "status"])
        for labels, n in list(self.requests.items()):
            c.add_metric(list(labels), n)
        yield c
        for name, doc, label, histos in (
                ("tether_request_duration_seconds", "Time from request to response head", "decision", self.latency),
                ("tether_upstream_duration_seconds", "Upstream response time", "upstream", self.upstream_latency)):
            h = HistogramMetricFamily(name, doc, labels=[label])
            for value, histo in list(histos.items()):
                h.add_metric([value], histo.buckets(), histo.sum)
            yield h

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _QuotaCollector:
    """What each upstream last said about its quota (proxy.safety.quota), exported at scrape time."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        rem = GaugeMetricFamily("tether_upstream_quota_remaining",
                                "Quota the upstream last reported left, per window", labels=["upstream", "window"])
        lim = GaugeMetricFamily("tether_upstream_quota_limit",
                                "Quota the upstream last reported in total, per window", labels=["upstream", "window"])
        for upstream, window, remaining, limit in self.source():
            if remaining is not None:
                rem.add_metric([upstream, window], remaining)
            if limit is not None:
                lim.add_metric([upstream, window], limit)
        yield rem
        yield lim

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._hot = _HotPathCollector()
        r.register(self._hot)  # type: ignore[arg-type]
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

    def add_counter_source(self, name: str, doc: str, source: Any) -> None:
        """A counter read from ``source()`` at scrape time (a plain number kept by its owner)."""
        class _Counter:
            def collect(self) -> Iterator[Metric]:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], float(source()))
                yield c

            def describe(self) -> Iterator[Metric]:
                return iter(())

        self.registry.register(_Counter())  # type: ignore[arg-type]

    def add_quota_source(self, source: Any) -> None:
        """``source()`` -> [(upstream, window, remaining, limit)] (proxy.safety.quota.QuotaGuard.gauges)."""
        self.registry.register(_QuotaCollector(source))  # type: ignore[arg-type]

    def observe(self, ex: "Exchange") -> None:
        hot = self._hot
        agent = ex.agent if ex.agent is not None and ex.registry is not None and ex.agent in ex.registry.rules.agents \
            else "-"
        cap = ex.capability.name if ex.capability is not None else ("composite" if ex.composite else "-")
        decision = ex.decision or "-"
        key = (agent, cap, decision, str(ex.status) if ex.status is not None else "-")
        reqs = hot.requests
        reqs[key] = reqs.get(key, 0) + 1
        lat = hot.latency.get(decision)
        if lat is None:
            lat = hot.latency[decision] = _Histo()
        lat.observe(ex.elapsed_ms() / 1000.0)
        if ex.upstream_latency_ms is not None and ex.upstream is not None:
            up = hot.upstream_latency.get(ex.upstream.name)
            if up is None:
                up = hot.upstream_latency[ex.upstream.name] = _Histo()
            up.observe(ex.upstream_latency_ms / 1000.0)
        side = ex.extra.get("canary")
        if side and ex.capability is not None:
            if side == "live":
                outcome = "ok" if ex.status is not None and ex.status < 400 and ex.error is None else "failed"
            else:
                outcome = "captured"
            self.canary.labels(agent=agent, capability=cap, side=side, outcome=outcome).inc()
            c = self._canary_counts.setdefault((agent, cap), {})
            key2 = f"{side}_{outcome}"
            c[key2] = c.get(key2, 0) + 1

    def canary_outcomes(self, agent: str, capability: str) -> dict[str, Any]:
        c = self._canary_counts.get((agent, capability), {})
        live = c.get("live_ok", 0) + c.get("live_failed", 0)
        return {"live": live, "live_ok": c.get("live_ok", 0), "live_failed": c.get("live_failed", 0),
                "dry_run": c.get("dry_run_captured", 0),
                "live_success_rate": round(c.get("live_ok", 0) / live, 4) if live else None}

    def render(self) -> bytes:
        return generate_latest(self.registry)
