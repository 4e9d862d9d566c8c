"""MCP sessions: created by ``initialize``, bound to the principal that opened them, bounded in number.

A session is protocol state only — the negotiated version, what the client said it is, the calls in
flight (for cancellation and duplicate-id checks), the one server→client GET stream, which version of
each list (tools, resources, prompts) the client last saw, and the log level it asked for. It is never authentication: every request is authenticated on its
own, and a session id presented with another principal's credentials is answered exactly like an
unknown one (404), so that ids cannot be probed across principals (the spec's session-hijacking
mitigation: key sessions by ``<principal>:<session id>``).

Bounds: a session idle for ``idle_timeout`` (no request, no call in flight, no open GET stream) is
dropped; a principal opening more than ``max_per_principal`` sessions has its least recently used idle
one dropped, else one that only holds a GET stream open (clients that leak sessions heal themselves;
another principal's sessions are never touched); beyond ``max_total`` sessions, or when every session of
the principal has a call in flight, a new one is refused. Expiry runs lazily, at most every few seconds,
from the requests themselves — no timer task.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Callable

from .backend import JsonRpcId, McpSessionInfo, Principal


class Session:
    __slots__ = ("id", "info", "owner", "principal", "created", "last_seen", "in_flight", "stream", "listed",
                 "notified", "initialized", "closed", "outbox", "log_level")

    def __init__(self, sid: str, info: McpSessionInfo, principal: Principal, now: float) -> None:
        self.id = sid
        self.info = info
        self.owner = principal.key
        self.principal = principal  # the latest authenticated principal (tokens get refreshed)
        self.created = now
        self.last_seen = now
        self.in_flight: dict[JsonRpcId, asyncio.Event] = {}
        self.stream: Any = None  # the open GET stream (endpoint._GetStream), if any
        # per list ("tools", "resources", "prompts"): the version the client last listed / was told changed
        self.listed: dict[str, object] = {}
        self.notified: dict[str, object] = {}
        self.log_level = 0  # the lowest severity relayed (logging/setLevel; 0: debug, everything)
        self.initialized = False
        self.closed = False
        # wakes the GET stream: tool list changes, session closed
        self.outbox = asyncio.Event()

    def busy(self) -> bool:
        return bool(self.in_flight) or self.stream is not None

    def close(self) -> None:
        self.closed = True
        self.outbox.set()


class TooManySessions(Exception):
    """No room for another session (the global bound, or every session of this principal is busy)."""


class SessionStore:
    def __init__(self, *, idle_timeout: float, max_per_principal: int, max_total: int,
                 on_drop: Callable[[Session, str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout = idle_timeout
        self.max_per_principal = max_per_principal
        self.max_total = max_total
        self._on_drop = on_drop
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._by_owner: dict[str, dict[str, Session]] = {}
        self._next_sweep = clock() + self._sweep_every()

    def _sweep_every(self) -> float:
        return max(0.5, min(self.idle_timeout / 4, 30.0))

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Any:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str, principal: Principal) -> Session | None:
        """The live session with this id opened by this principal, or None (unknown, expired, another's)."""
        self.maybe_sweep()
        s = self._sessions.get(session_id)
        if s is None or s.owner != principal.key:
            return None
        if not s.busy() and self._clock() - s.last_seen > self.idle_timeout:
            self.drop(s, "expired")
            return None
        s.last_seen = self._clock()
        s.principal = principal
        return s

    def create(self, principal: Principal, protocol_version: str, client_name: str | None,
               client_version: str | None, client_capabilities: dict[str, Any]) -> Session:
        self.maybe_sweep()
        owned = self._by_owner.get(principal.key)
        if owned is not None and len(owned) >= self.max_per_principal:
            # the least recently used idle session; else one whose only use is a GET stream (its client may
            # be gone without a word); never one with a call in flight
            victims = [s for s in owned.values() if not s.busy()] or [s for s in owned.values() if not s.in_flight]
            if not victims:
                raise TooManySessions(f"all {len(owned)} sessions of this principal have calls in flight")
            self.drop(min(victims, key=lambda s: s.last_seen), "evicted")
        if len(self._sessions) >= self.max_total:
            self.sweep()
            if len(self._sessions) >= self.max_total:
                raise TooManySessions(f"{self.max_total} MCP sessions are open")
        sid = secrets.token_urlsafe(32)  # 256 random bits, visible ASCII only
        info = McpSessionInfo(sid, protocol_version, client_name, client_version, client_capabilities)
        s = Session(sid, info, principal, self._clock())
        self._sessions[sid] = s
        self._by_owner.setdefault(s.owner, {})[sid] = s
        return s

    def drop(self, s: Session, reason: str) -> None:
        if self._sessions.pop(s.id, None) is None:
            return
        owned = self._by_owner.get(s.owner)
        if owned is not None:
            owned.pop(s.id, None)
            if not owned:
                del self._by_owner[s.owner]
        s.close()
        self._on_drop(s, reason)

    def maybe_sweep(self) -> None:
        if self._clock() >= self._next_sweep:
            self.sweep()

    def sweep(self) -> None:
        now = self._clock()
        self._next_sweep = now + self._sweep_every()
        for s in [s for s in self._sessions.values() if not s.busy() and now - s.last_seen > self.idle_timeout]:
            self.drop(s, "expired")

    def close_all(self, reason: str) -> None:
        for s in list(self._sessions.values()):
            self.drop(s, reason)
