"""Reading what an upstream says about its quota: pure functions over response headers (no I/O).

Each adapter names the headers it reads (``Adapter.quota_headers``, lower case) and turns them into a
:class:`QuotaReading` (``Adapter.read_quota``). The standard ones, read by every adapter:

* ``Retry-After`` on a 429 or 503 — seconds or an HTTP date (RFC 9110 §10.2.3);
* the IETF ``RateLimit-Policy`` / ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers, structured
  fields: ``"default";q=100;w=60`` and ``"default";r=42;t=30``, parsed with http-sfv), and the draft's
  older shapes ``RateLimit: limit=100, remaining=42, reset=30`` and ``RateLimit-Limit/-Remaining/-Reset``;
* the de-facto ``X-RateLimit-Limit/-Remaining/-Reset`` (a reset above 10^9 is a Unix time, else seconds).

Vendors add their own (``adapters/salesforce.py``: ``Sforce-Limit-Info``; ``adapters/hubspot.py``: the
``X-HubSpot-RateLimit-*`` family).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Mapping

STANDARD_HEADERS = frozenset({
    "retry-after", "ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
    "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
})


@dataclass(slots=True)
class QuotaWindow:
    """One quota the upstream reported: how much is left of how much, and when it refills."""

    name: str
    remaining: float | None
    limit: float | None = None
    reset: float | None = None  # seconds until the window resets; None: the upstream did not say


@dataclass(slots=True)
class QuotaReading:
    windows: list[QuotaWindow] = field(default_factory=list)
    retry_after: float | None = None  # seconds the upstream asked callers to wait


def _num(value: Any) -> float | None:
    try:
        return float(str(value).strip().split(",")[0].split(";")[0])
    except (TypeError, ValueError):
        return None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After``: delay-seconds or an HTTP date -> seconds from now (None when unreadable)."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = parsedate_to_datetime(v).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _reset(value: Any, now: float) -> float | None:
    n = _num(value)
    if n is None or n < 0:
        return None
    return max(0.0, n - now) if n > 1e9 else n


def _ietf(headers: Mapping[str, str]) -> list[QuotaWindow]:
    """The structured ``RateLimit`` + ``RateLimit-Policy`` pair, or the draft's older dictionary form."""
    import http_sfv

    out: list[QuotaWindow] = []
    raw = headers.get("ratelimit")
    if not raw:
        return out
    policies: dict[str, tuple[float | None, float | None]] = {}
    pol = headers.get("ratelimit-policy")
    if pol:
        try:
            plist = http_sfv.List()
            plist.parse(pol.encode("latin-1"))
            for item in plist:
                policies[str(item.value)] = (_num(item.params.get("q")), _num(item.params.get("w")))
        except (ValueError, UnicodeError):
            pass
    try:
        items = http_sfv.List()
        items.parse(raw.encode("latin-1"))
        for item in items:
            if "r" not in item.params:
                raise ValueError("not the structured form")
            name = str(item.value)
            quota, _ = policies.get(name, (None, None))
            out.append(QuotaWindow(name, _num(item.params.get("r")), quota, _num(item.params.get("t"))))
        return out
    except (ValueError, UnicodeError):
        pass
    try:  # limit=100, remaining=42, reset=30
        d = http_sfv.Dictionary()
        d.parse(raw.encode("latin-1"))
        values = {k: v.value for k, v in d.items()}
        if "remaining" in values:
            out.append(QuotaWindow("ratelimit", _num(values["remaining"]), _num(values.get("limit")),
                                   _num(values.get("reset"))))
    except (ValueError, UnicodeError):
        pass
    return out


def standard_quota(status: int, headers: Mapping[str, str], now: float | None = None) -> QuotaReading | None:
    """What the standard headers say (``headers``: lower-case names). None when they say nothing."""
    now = time.time() if now is None else now
    reading = QuotaReading()
    if status in (429, 503):
        reading.retry_after = retry_after(headers.get("retry-after"), now)
    reading.windows.extend(_ietf(headers))
    if not reading.windows and "ratelimit-remaining" in headers:
        reading.windows.append(QuotaWindow("ratelimit", _num(headers["ratelimit-remaining"]),
                                           _num(headers.get("ratelimit-limit")),
                                           _num(headers.get("ratelimit-reset"))))
    if "x-ratelimit-remaining" in headers:
        reading.windows.append(QuotaWindow("x-ratelimit", _num(headers["x-ratelimit-remaining"]),
                                           _num(headers.get("x-ratelimit-limit")),
                                           _reset(headers.get("x-ratelimit-reset"), now)))
    if reading.retry_after is None and not reading.windows:
        return None
    return reading


__all__ = ["QuotaReading", "QuotaWindow", "STANDARD_HEADERS", "retry_after", "standard_quota"]
