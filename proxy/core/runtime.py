"""The running gateway as every layer below :mod:`proxy.app` sees it.

Stages, services and front doors are handed the gateway, but they must not depend on the module that
composes them (that was a 14-module import cycle). They depend on this :class:`Runtime` protocol instead,
which :class:`proxy.app.gateway.Gateway` implements. The services it carries (governance, review,
transactions, rate limits, quota) sit in :mod:`proxy.safety`, above this module, so they are typed
``Any`` here with the class named in a comment; everything at or below this layer is typed exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp

    from ..config import Limits, ServerConfig
    from ..journal.writer import JournalWriter
    from ..store.base import Store
    from ..transport.upstream_http import OriginPool
    from .listeners import Listener
    from .rules import RulesState, UpstreamRuntime


class Runtime(Protocol):
    """What the layers below the process may use of it (see the module doc)."""

    state: RulesState  # the rules in force (replaced as a whole on reload)
    store: Store
    journal: JournalWriter
    limits: Limits
    server_cfg: ServerConfig
    instance_id: str  # unique per process: leases, journal system records
    rules_path: str | None
    session: aiohttp.ClientSession | None  # auxiliary calls: OAuth token fetches, alert webhooks, Slack
    listeners: list[Listener]
    admin_port: int
    admin_host_policy: Any  # callable(host) -> bool, or None (any Host)
    draining: bool
    mcp: Any  # proxy.doors.mcp endpoint, when server.mcp is set
    governance: Any  # proxy.safety.governance.Governance
    review: Any  # proxy.safety.review.ReviewService
    transactions: Any  # proxy.safety.transactions.TransactionManager
    rate_limiter: Any  # proxy.safety.ratelimit.RateLimiter | SharedRateLimiter
    quota: Any  # proxy.safety.quota.QuotaGuard

    def origin(self, up: UpstreamRuntime) -> OriginPool: ...

    async def reload(self, source: str | None = None) -> tuple[bool, str]: ...

    async def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    async def journal_system(self, event: str, **fields: Any) -> None: ...

    def observe(self, ex: Any) -> None: ...
