"""JSON-RPC 2.0 framing for MCP: versions, the envelope check, and the bytes of answers.

Why this is written here and not taken from the SDK's transport: the ``mcp`` SDK's server transport
runs on Starlette/anyio with a memory-stream task per session and re-validates every message through a
pydantic union of all message types. Tether's listener is aiohttp, and a ``tools/call`` must cost little
more than the REST door's request. So the *envelope* (``jsonrpc``, ``id``, ``method``, ``params``) is
checked by hand here — a handful of dict and type tests on what :func:`proxy.policy.bodies.parse_json` already
parsed (orjson on the fast path; duplicate keys and excessive depth refused exactly as on the REST
door) — and the *shapes* of params and results are validated by the SDK's own per-version models
(``mcp_types.methods``: the version gate, the 2025 and 2026 wire schemas), which is where hand-written
schema would drift. Measured in-process: the layer's whole share of a ``tools/call`` (strict parse,
envelope, session, params validation, result serialisation, response object) is about 30 µs.

The envelope is strict on purpose (fail closed): exactly ``"jsonrpc": "2.0"``; a request id is a string
(≤ 256 characters) or an integer within ±(2**53 - 1) — never null, a float or a boolean; ``params`` is an
object; a message carrying both ``method`` and ``result``/``error``, or any member JSON-RPC does not
define, is refused rather than guessed at. Method names match exactly (``Tools/Call`` is not
``tools/call``).
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from mcp_types.jsonrpc import (
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    UNSUPPORTED_PROTOCOL_VERSION,
)

__all__ = [
    "HANDSHAKE_VERSIONS", "LATEST_HANDSHAKE", "MODERN_VERSIONS", "ALL_VERSIONS", "BATCH_VERSIONS",
    "DEFAULT_HEADERLESS_VERSION",
    "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "INTERNAL_ERROR",
    "UNSUPPORTED_PROTOCOL_VERSION", "HEADER_MISMATCH",
    "Message", "EnvelopeError", "classify", "response_bytes", "error_bytes", "error_obj",
]

# Versions negotiated by the initialize handshake that this layer serves over Streamable HTTP, oldest
# first. 2024-11-05 defined only the older HTTP+SSE transport, but its messages are a subset of
# 2025-03-26's and current SDKs (TypeScript 1.x, Python 2.x) still offer it, so it is accepted.
HANDSHAKE_VERSIONS: Final[tuple[str, ...]] = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_HANDSHAKE: Final[str] = HANDSHAKE_VERSIONS[-1]
# Stateless revisions: no initialize, no sessions; every request carries its version and the client's
# capabilities in _meta, and the routing headers (MCP-Protocol-Version, Mcp-Method, Mcp-Name) must match.
MODERN_VERSIONS: Final[tuple[str, ...]] = ("2026-07-28",)
ALL_VERSIONS: Final[tuple[str, ...]] = HANDSHAKE_VERSIONS + MODERN_VERSIONS
# JSON-RPC batches existed in 2025-03-26 only (added there, removed in 2025-06-18).
BATCH_VERSIONS: Final[frozenset[str]] = frozenset({"2025-03-26"})
# A request without MCP-Protocol-Version and no other clue is 2025-03-26 (transports, "Protocol Version Header").
DEFAULT_HEADERLESS_VERSION: Final[str] = "2025-03-26"

_MAX_SAFE_INT: Final[int] = 2**53 - 1
_MAX_ID_LEN: Final[int] = 256
_REQUEST_KEYS: Final[frozenset[str]] = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_KEYS: Final[frozenset[str]] = frozenset({"jsonrpc", "id", "result", "error"})


class EnvelopeError(Exception):
    """A message that is not a valid JSON-RPC 2.0 request, notification or response. ``id`` is the
    message's id when it could be read (so the error can be correlated), else None."""

    def __init__(self, message: str, id: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id


class Message:
    """One checked JSON-RPC message. ``kind`` is ``request``, ``notification`` or ``response``."""

    __slots__ = ("kind", "id", "method", "params")

    def __init__(self, kind: str, id: Any, method: str | None, params: dict[str, Any] | None) -> None:
        self.kind = kind
        self.id = id
        self.method = method
        self.params = params


def _valid_id(value: Any) -> bool:
    t = type(value)
    if t is int:
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    if t is str:
        return len(value) <= _MAX_ID_LEN
    return False


def classify(obj: Any) -> Message:
    """Check one parsed JSON-RPC message's envelope; raise :class:`EnvelopeError` when it is not one."""
    if type(obj) is not dict:
        raise EnvelopeError("a JSON-RPC message must be a JSON object")
    rid = obj.get("id")
    id_for_error = rid if _valid_id(rid) else None
    if obj.get("jsonrpc") != "2.0":
        raise EnvelopeError('"jsonrpc" must be exactly "2.0"', id_for_error)
    if "method" in obj:
        if not obj.keys() <= _REQUEST_KEYS:
            extra = sorted(set(obj) - _REQUEST_KEYS)
            raise EnvelopeError(f"unexpected members {extra} in a request or notification", id_for_error)
        method = obj["method"]
        if type(method) is not str or not method:
            raise EnvelopeError('"method" must be a non-empty string', id_for_error)
        params = obj.get("params")
        if params is not None and type(params) is not dict:
            raise EnvelopeError('"params" must be an object', id_for_error)
        if "params" in obj and params is None:
            raise EnvelopeError('"params" must be an object', id_for_error)
        if "id" not in obj:
            return Message("notification", None, method, params)
        if not _valid_id(rid):
            raise EnvelopeError("a request id must be a string (at most 256 characters) or an integer "
                                "between -(2**53-1) and 2**53-1; null, fractions and booleans are refused")
        return Message("request", rid, method, params)
    if "result" in obj or "error" in obj:
        if not obj.keys() <= _RESPONSE_KEYS or ("result" in obj) == ("error" in obj):
            raise EnvelopeError("a response carries exactly one of result or error", id_for_error)
        return Message("response", rid, None, None)
    raise EnvelopeError("neither a request, a notification nor a response", id_for_error)


_HEAD: Final[bytes] = b'{"jsonrpc":"2.0","id":'


def response_bytes(rid: Any, result_json: bytes) -> bytes:
    """A JSON-RPC response around an already serialised result (no second encoding pass)."""
    return b"".join((_HEAD, orjson.dumps(rid), b',"result":', result_json, b"}"))


def error_obj(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": err}


def error_bytes(rid: Any, code: int, message: str, data: Any = None) -> bytes:
    return orjson.dumps(error_obj(rid, code, message, data))
