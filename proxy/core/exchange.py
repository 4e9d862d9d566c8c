"""The per-request object every pipeline stage reads and fills in: one operation, whichever door it came in by.

One :class:`Exchange` per request or tool call (Envoy's per-request filter state, mitmproxy's flow): who
(the identity: agent, the human, verified or asserted), why (the intent), what (the capability, its path
parameters, the body), in which transaction, with which trace — then the decision, the journal sequence
numbers and the answer. It is **transport-neutral**: a front door builds it (the REST door from an HTTP
request, the MCP door from a ``tools/call``), the shared stages decide and act on it, and the door's
:class:`Door` renders the answer (an HTTP response, a tool result). The stages never look at the
transport; ``request`` is the REST door's own handle, read only by that door's intake stages.

Configuration is *not* here: it lives in the shared, immutable Registry the exchange points to (a
snapshot taken when the request arrived, so a hot reload never splits one request across two rule sets).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from adapters.base import Operation

    from ..errors import TetherError
    from ..policy.identity import Identity
    from ..policy.registry import Capability, Grant, Registry
    from .rules import UpstreamRuntime


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


class Door(Protocol):
    """How a front door answers (see :class:`Exchange`). Each method records the answer on the exchange
    (``ex.response``); the door turns it into what its client reads once the pipeline is done."""

    channel: str  # "rest" / "mcp": journaled with every record

    def refuse(self, ex: "Exchange", err: "TetherError") -> None:
        """Answer a refusal or failure (Tether's error code, message, status, request id)."""

    def answer(self, ex: "Exchange", status: int, reason: str | None, headers: Any, body: bytes | None, *,
               upstream: Any = None) -> None:
        """A whole answer: an upstream's (``upstream`` is its UpstreamResponse, for a HEAD's length and
        exact header bytes) or Tether's own (a dry-run capture's synthetic answer)."""

    async def relay(self, ex: "Exchange", resp: Any, headers: Any, limit: int | None, needles: Any = None,
                    found: list[bool] | None = None, tap: Any = None) -> tuple[int, str | None]:
        """Pass an upstream answer on as it streams; (bytes passed, error code or None)."""
        ...


class Exchange:
    __slots__ = (
        "request", "door", "channel", "headers", "body_stream", "mcp", "http_version", "request_id", "started", "started_wall", "registry", "upstream", "method", "raw_path", "query",
        "segments", "identity", "intent", "transaction_id", "traceparent", "capability", "params", "grant",
        "mode", "decision", "reason", "body", "body_digest", "operations", "intent_seq", "response",
        "status", "error", "upstream_ids", "review_item_id", "quarantined", "undo_step_id", "response_body",
        "upstream_latency_ms", "audit", "redacted", "forwarded", "composite", "extra", "authz_event", "state",
        "listener", "intent_record",
    )

    def __init__(self, door: Door, registry: "Registry", upstream: "UpstreamRuntime | None", method: str,
                 raw_path: str, headers: Any, request: Any = None) -> None:
        self.door = door
        self.channel = door.channel
        self.request = request  # the REST door's aiohttp request (None for other doors)
        self.headers = headers  # the agent's request headers (case-insensitive multidict)
        self.body_stream: Any = None  # a stream_request body still to be read (REST door), see forward
        self.mcp: dict[str, Any] | None = None  # tool, JSON-RPC id, session, client (MCP door): journaled
        self.http_version: tuple[int, int] = (1, 1) if request is None else request.version  # for Via
        self.request_id = new_request_id()
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.registry = registry
        self.upstream = upstream
        self.method: str = method
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
        self.intent_record: dict[str, Any] | None = None  # the last request record built (the outcome's base)
        self.authz_event: str | None = None
        self.response: Any = None  # the answer as its door recorded it (an aiohttp response, a tool result)
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
