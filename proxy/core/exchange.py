"""The per-request object every pipeline stage reads and fills in.

One :class:`Exchange` per request (Envoy's per-request filter state, mitmproxy's flow): the request
view, the identity, the matched capability and grant, the decision, the journal sequence numbers and
the response. Configuration is *not* here: it lives in the shared, immutable Registry the exchange
points to (a snapshot taken when the request arrived, so a hot reload never splits one request
across two rule sets).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from adapters.base import Operation

    from .rules import UpstreamRuntime
    from ..errors import TetherError
    from ..policy.identity import Identity
    from ..policy.registry import Capability, Grant, Registry


_ID_PREFIX = os.urandom(8).hex()  # per process: ids from different processes never collide
_ID_COUNTER = itertools.count(1)


def _reseed() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(8).hex()
    _ID_COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)  # --workers forks after import: each worker its own prefix


def new_request_id() -> str:
    """32 hex characters, unique: a random per-process prefix and a counter (cheaper than uuid4 on the hot
    path, and unguessable across processes)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class Exchange:
    __slots__ = (
        "request", "request_id", "started", "started_wall", "registry", "upstream", "method", "raw_path", "query",
        "segments", "identity", "intent", "transaction_id", "traceparent", "capability", "params", "grant",
        "mode", "decision", "reason", "body", "body_digest", "operations", "intent_seq", "response",
        "status", "error", "upstream_ids", "review_item_id", "quarantined", "undo_step_id", "response_body",
        "upstream_latency_ms", "audit", "redacted", "forwarded", "composite", "extra", "authz_event", "state",
        "listener",
    )

    def __init__(self, request: web.BaseRequest, registry: "Registry", upstream: "UpstreamRuntime",
                 raw_path: str) -> None:
        self.request = request
        self.request_id = new_request_id()
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.registry = registry
        self.upstream = upstream
        self.method: str = request.method
        self.raw_path = raw_path  # validated upstream-relative path (prefix removed)
        self.query: str = ""
        self.segments: tuple[str, ...] = ()
        self.identity: Identity | None = None
        self.intent: str | None = None
        self.transaction_id: str | None = None
        self.traceparent: str | None = None
        self.capability: Capability | None = None
        self.params: dict[str, str] = {}
        self.grant: Grant | None = None
        self.mode: str | None = None  # live / dry_run / canary_live / canary_dry_run
        self.decision: str | None = None  # denied / live / dry_run / error
        self.reason: str | None = None
        self.body: bytes | None = None
        self.body_digest: str | None = None
        self.operations: list[Operation] = []
        self.composite = False
        self.intent_seq: int | None = None
        self.authz_event: str | None = None
        self.response: web.StreamResponse | None = None
        self.status: int | None = None
        self.error: TetherError | None = None
        self.upstream_ids: list[str] = []
        self.review_item_id: str | None = None
        self.quarantined = False
        self.undo_step_id: int | None = None
        self.response_body: Any = None
        self.upstream_latency_ms: float | None = None
        self.audit: dict[str, Any] | None = None
        self.redacted: list[str] | None = None
        self.forwarded = False
        self.extra: dict[str, Any] = {}
        self.state: Any = None  # the RulesState snapshot this request uses
        self.listener: Any = None  # the Listener it arrived on

    @property
    def agent(self) -> str | None:
        return self.identity.agent if self.identity else None

    @property
    def is_write(self) -> bool:
        return any(op.capability is not None and op.capability.is_write for op in self.operations)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
