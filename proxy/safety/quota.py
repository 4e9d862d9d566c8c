"""The SaaS quota the company shares: read what each upstream says, keep a reserve, stop agents first.

A Salesforce org's daily API allowance, a HubSpot account's daily and per-interval limits, a Stripe or
Slack 429: these quotas belong to the whole company — its people, its other integrations — not to the
agents. Every answer an upstream sends an agent's request through Tether is read by the upstream's
adapter (``Adapter.read_quota``: ``Sforce-Limit-Info``, ``X-HubSpot-RateLimit-*``, IETF ``RateLimit`` /
``RateLimit-Policy``, ``RateLimit-*``, ``X-RateLimit-*``, ``Retry-After`` on 429/503).

An upstream is **blocked** for agents when

* a window's remaining quota is at or under the upstream's ``quota.reserve`` (``20%`` of that window's
  limit, or a number of calls) — until the window resets if the upstream says when, else for
  ``quota.recheck`` (then the next answer tells again);
* or the upstream said to wait: ``Retry-After`` on a 429/503, or a window with nothing left
  (``quota.honor_retry_after``, on by default).

While blocked, Tether answers agents ``429 upstream_quota`` with ``Retry-After`` itself, without
forwarding (dry-run captures still work: they reach no upstream; undo steps of transactions still run).
The block is shared by every process of the gateway (the store keeps it, a signal spreads it at once),
only ends by expiring, and its start is journaled and alerted once (``quota_low``). The last figures are
exported as ``tether_upstream_quota_remaining{upstream,window}`` / ``..._limit`` and shown by
``tether agents status`` and ``GET /api/upstreams/quota`` on the admin listener.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from ..errors import TetherError

if TYPE_CHECKING:
    from adapters.quota import QuotaReading

    from ..core.exchange import Exchange
    from ..core.rules import UpstreamRuntime
    from ..core.runtime import Runtime

log = logging.getLogger("tether.quota")

_FIGURES_EVERY = 5.0  # seconds between two stores of an upstream's figures when nothing else changed


class QuotaGuard:
    def __init__(self, gw: "Runtime") -> None:
        self.gw = gw
        self.blocks: dict[str, float] = {}  # upstream -> blocked until (Unix time); read per request
        self.view: dict[str, dict[str, Any]] = {}  # upstream -> last figures, reason, block (for status)
        self._stored_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        gw.governance.metrics.add_quota_source(self.gauges)

    # -- the hot path ---------------------------------------------------------------------------

    def check(self, ex: "Exchange") -> None:
        up = ex.upstream
        if up is None or not self.blocks:
            return
        until = self.blocks.get(up.name)
        if until is None:
            return
        now = time.time()
        if until <= now:
            self.blocks.pop(up.name, None)
            return
        wait = max(1, math.ceil(until - now))
        reason = self.view.get(up.name, {}).get("reason") or "the upstream's quota is at its reserve"
        raise TetherError("upstream_quota", f"upstream {up.name}: {reason}; retry in {wait}s",
                          headers={"Retry-After": str(wait)})

    def observe(self, up: "UpstreamRuntime", status: int, raw_headers: list[tuple[str, str]]) -> None:
        """Read an upstream's answer for quota signals (a pass over its header names; nothing else
        unless one is there or the status is 429/503)."""
        adapter = up.adapter
        names = adapter.quota_headers
        found: dict[str, str] | None = None
        for k, v in raw_headers:
            lk = k.lower()
            if lk in names:
                if found is None:
                    found = {}
                found[lk] = v
        if found is None and status != 429 and status != 503:
            return
        try:
            reading = adapter.read_quota(status, found or {})
        except Exception as exc:  # noqa: BLE001 - a header Tether cannot read changes nothing
            log.warning("could not read the quota headers of %s: %s", up.name, exc)
            return
        if reading is not None:
            self.apply(up, reading)

    # -- deciding -------------------------------------------------------------------------------

    def apply(self, up: "UpstreamRuntime", reading: "QuotaReading", now: float | None = None) -> None:
        now = time.time() if now is None else now
        cfg = up.cfg.quota
        until, reason = 0.0, None
        if reading.retry_after is not None and cfg.honor_retry_after:
            until, reason = now + reading.retry_after, f"the upstream asked to wait {reading.retry_after:g}s"
        windows = {}
        for w in reading.windows:
            windows[w.name] = {"remaining": w.remaining, "limit": w.limit,
                               "reset_at": now + w.reset if w.reset is not None else None}
            if w.remaining is None:
                continue
            reserve = 0.0
            if cfg.reserve is not None:
                if cfg.reserve.share is not None:
                    reserve = cfg.reserve.share * w.limit if w.limit else 0.0
                else:
                    reserve = cfg.reserve.calls or 0.0
            if reserve > 0 and w.remaining <= reserve:
                why = (f"{w.name} quota at its reserve: {w.remaining:g} left of {w.limit:g}, "
                       f"{reserve:g} kept for people and other integrations" if w.limit else
                       f"{w.name} quota at its reserve: {w.remaining:g} left, {reserve:g} kept")
            elif w.remaining <= 0 and cfg.honor_retry_after:
                why = f"{w.name} quota spent"
            else:
                continue
            w_until = now + (w.reset if w.reset is not None else cfg.recheck)
            if w_until > until:
                until, reason = w_until, why
        view = self.view.setdefault(up.name, {"windows": {}})
        view["windows"].update(windows)
        view["updated_at"] = now
        current = self.blocks.get(up.name, 0.0)
        starts = until > now and until > current
        if starts:
            self.blocks[up.name] = until  # this process stops at once; the others hear of it below
            view["reason"], view["blocked_until"] = reason, until
        if starts or (self.gw.governance.shared and now - self._stored_at.get(up.name, 0.0) > _FIGURES_EVERY):
            self._stored_at[up.name] = now
            doc = {"windows": view["windows"], "reason": view.get("reason"), "blocked_until": until if starts else 0.0,
                   "updated_at": now, "by": self.gw.instance_id}
            task = asyncio.ensure_future(self._store(up.name, doc, now))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _store(self, upstream: str, doc: dict[str, Any], now: float) -> None:
        try:
            started, until = await self.gw.store.quota_update(upstream, doc, now)
        except Exception as exc:  # noqa: BLE001 - this process still holds the block
            log.error("could not store the quota state of %s: %s", upstream, exc)
            return
        if until > time.time():
            self.blocks[upstream] = max(self.blocks.get(upstream, 0.0), until)
        if started:  # one event per block, whichever process saw it first
            gov = self.gw.governance
            await gov.signal(f"quota:{upstream}")
            await gov.alert("quota_low", {"upstream": upstream, "reason": doc.get("reason"),
                                          "blocked_until": until, "windows": doc.get("windows")})

    async def refresh(self) -> None:
        """Adopt the blocks and figures other processes stored."""
        now = time.time()
        for upstream, doc in (await self.gw.store.quota_states()).items():
            until = float(doc.get("blocked_until") or 0.0)
            if until > now and until > self.blocks.get(upstream, 0.0):
                self.blocks[upstream] = until
            view = self.view.setdefault(upstream, {"windows": {}})
            if float(doc.get("updated_at") or 0.0) >= float(view.get("updated_at") or 0.0):
                view["windows"].update(doc.get("windows") or {})
                view["updated_at"] = doc.get("updated_at")
            if until > now:
                view["reason"], view["blocked_until"] = doc.get("reason"), until

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for name, up in self.gw.state.upstreams.items():
            view = self.view.get(name, {})
            until = self.blocks.get(name, 0.0)
            reserve = up.cfg.quota.reserve
            out.append({
                "upstream": name,
                "reserve": (f"{reserve.share:.0%}" if reserve.share is not None else reserve.calls) if reserve else None,
                "blocked": until > now,
                "blocked_until": until if until > now else None,
                "reason": view.get("reason") if until > now else None,
                "windows": view.get("windows", {}),
                "updated_at": view.get("updated_at"),
            })
        return out

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{upstream: {remaining, limit, at}} for the console's charts: per upstream, the window with the
        least left (the one an agent would run into first)."""
        out: dict[str, dict[str, Any]] = {}
        for name, view in self.view.items():
            best: tuple[float, dict[str, Any]] | None = None
            for d in view.get("windows", {}).values():
                rem, lim = d.get("remaining"), d.get("limit")
                if rem is None:
                    continue
                share = rem / lim if lim else float(rem)
                if best is None or share < best[0]:
                    best = (share, d)
            if best is not None:
                out[name] = {"remaining": best[1].get("remaining"), "limit": best[1].get("limit"),
                             "at": view.get("updated_at")}
        return out

    def gauges(self) -> list[tuple[str, str, float | None, float | None]]:
        """(upstream, window, remaining, limit) for the metrics exporter."""
        return [(u, w, d.get("remaining"), d.get("limit"))
                for u, v in self.view.items() for w, d in v.get("windows", {}).items()]


def check_upstream_quota(gw: "Runtime", ex: "Exchange") -> None:
    """Pipeline stage (after dry-run capture, before anything reaches the upstream): refuse while the
    upstream's shared quota is blocked for agents."""
    gw.quota.check(ex)


__all__ = ["QuotaGuard", "check_upstream_quota"]
