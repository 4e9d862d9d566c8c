"""Every error Tether answers with, in one place.

A request that Tether refuses gets a JSON body
``{"error": {"code": ..., "message": ..., "request_id": ...}}`` whose ``code`` is one of the stable,
machine-readable reason codes below (agents and dashboards switch on it; the message is for people).
Each code has exactly one HTTP status, so the code alone tells what happened.

Hierarchy::

    TetherError                     base: code, status, message, extra headers
    ├── AuthError (401)             token_missing, token_malformed, token_expired, ...
    ├── Denied (403)                route_not_registered, capability_not_granted, agent_unknown, ...
    ├── BadRequest (400)            ambiguous_request, malformed_json, intent_required, ...
    ├── ValidationFailed (422)      field_not_allowed, constraint_violated, ...
    ├── RateLimited (429)           rate_limited (with Retry-After)
    └── Unavailable (5xx)           journal_unavailable, upstream_unavailable, upstream_timeout, ...

``ERROR_CODES`` lists every code with its status and meaning; the README's error table is generated
from it so the two cannot drift.
"""

from __future__ import annotations

from typing import Any, Mapping

# code -> (HTTP status, one-line meaning). Keep sorted by status, then code.
ERROR_CODES: dict[str, tuple[int, str]] = {
    # 400: the request cannot be decided as sent
    "ambiguous_request": (400, "the request target, method or headers could be read two ways; refused"),
    "bad_request": (400, "the request is malformed"),
    "body_content_type_mismatch": (400, "the body does not parse as its declared Content-Type"),
    "credential_in_request": (400, "the agent sent an upstream credential (header, cookie or query parameter)"),
    "duplicate_json_key": (400, "a JSON object repeats a key"),
    "intent_required": (400, "writes must declare X-Tether-Intent"),
    "json_too_deep": (400, "the JSON body nests deeper than allowed"),
    "malformed_json": (400, "the body is not valid JSON"),
    "unresolved_reference": (400, "a composite sub-request refers to a result Tether cannot resolve"),
    "unrepresentable_value": (400, "a JSON value cannot be read the same way everywhere (lone surrogate, "
                                   "integer beyond 64 bits, number beyond a double); refused with the field named"),
    "unsupported_composite": (400, "a composite/batch request Tether cannot unpack safely"),
    # 401: who is calling?
    "token_missing": (401, "no Authorization: Bearer token"),
    "token_malformed": (401, "the token is not a well-formed JWT"),
    "token_algorithm_not_allowed": (401, "the token's alg is not one of the pinned algorithms"),
    "token_unknown_key": (401, "the token's kid names no configured key"),
    "token_invalid_signature": (401, "the token's signature does not verify"),
    "token_expired": (401, "the token's exp is in the past"),
    "token_not_yet_valid": (401, "the token's nbf is in the future"),
    "token_issuer_mismatch": (401, "the token's iss is not the configured issuer"),
    "token_audience_mismatch": (401, "the token's aud does not include the configured audience"),
    "token_missing_claim": (401, "a required claim (sub, exp, ...) is missing"),
    "token_user_mismatch": (401, "X-Tether-User-Token proves a different person than the agent's token names"),
    # 403: known caller, not allowed
    "agent_unknown": (403, "the token's agent is not declared in the rules"),
    "agent_quarantined": (403, "the agent spent its error budget and is quarantined"),
    "capability_not_granted": (403, "the route is registered but not granted to this agent"),
    "forbidden": (403, "not allowed"),
    "non_compensable_in_transaction": (403, "this write cannot be undone, so it may not run live inside a transaction"),
    "reviewer_required": (403, "the admin API needs a reviewer token"),
    "route_not_registered": (403, "no capability matches this method and path (default deny)"),
    "self_approval": (403, "a reviewer may not decide items made by their own identity, on their behalf, "
                           "or be an agent"),
    "tenant_switch_refused": (403, "the agent asked for another account/tenant the capability does not allow"),
    "transaction_not_owned": (403, "the transaction belongs to another agent"),
    "verified_user_required": (403, "the grant needs a person verified by the identity provider, not one the token asserts"),
    # 404 / 405 / 409 / 410
    "not_found": (404, "no such object"),
    "method_not_allowed": (405, "TRACE, CONNECT and unknown methods are refused"),
    "client_timeout": (408, "the client did not send its request in time"),
    "client_closed": (499, "the client closed the connection before the response was complete (journaled only)"),
    "call_cancelled": (499, "the agent cancelled the tool call; the MCP server was told to stop (it may have "
                            "applied it)"),
    "already_decided": (409, "the review item was already decided"),
    "conflict": (409, "the object changed; the operation was not applied"),
    "tool_definition_changed": (409, "the MCP server changed this tool's definition since it was pinned; hidden and "
                                     "refused until a person re-approves it (tether rules pin --accept)"),
    "transaction_closed": (409, "the transaction is no longer open"),
    "transaction_expired": (410, "the transaction passed its deadline"),
    "review_expired": (410, "the review item passed its TTL (server.review.ttl); it can no longer be decided"),
    # 413 / 414 / 422 / 429 / 431
    "body_too_large": (413, "the request body exceeds the configured limit"),
    "uri_too_long": (414, "the request target exceeds the configured limit"),
    "constraint_violated": (422, "a field value breaks a capability constraint"),
    "field_not_allowed": (422, "the body carries a field the capability does not allow"),
    "field_required": (422, "the body lacks a field the capability requires"),
    "schema_violation": (422, "the body does not satisfy the capability's JSON Schema"),
    "rate_limited": (429, "a rate limit is exhausted; see Retry-After"),
    "review_queue_full": (429, "the agent already has as many items pending review as allowed; "
                                "nothing was captured (a reviewer must decide some first)"),
    "upstream_quota": (429, "the upstream's shared quota is at its reserve or the upstream asked to wait; not forwarded; see Retry-After"),
    "headers_too_large": (431, "too many or too large request headers"),
    # 5xx: Tether could not do its part, so it did nothing
    "internal_error": (500, "an unexpected error inside Tether; nothing was forwarded unless journaled"),
    "upstream_unavailable": (502, "the upstream could not be reached or broke the connection"),
    "upstream_response_too_large": (502, "the upstream's response exceeded the configured limit"),
    "upstream_auth_failed": (502, "the MCP server refused Tether's own credential for it (401/403)"),
    "upstream_protocol_error": (502, "the MCP server answered something that is not valid MCP (JSON, shapes, version)"),
    "upstream_rpc_error": (502, "the MCP server answered the request with a JSON-RPC error"),
    "identity_unavailable": (503, "Tether cannot verify tokens now: an issuer's keys or its own token key are unavailable"),
    "upstream_applied_response_lost": (502, "the upstream APPLIED the write, but its answer could not be relayed "
                                            "(X-Tether-Upstream-Status has its status); do not send it again"),
    "journal_unavailable": (503, "the audit journal could not be written, so nothing was forwarded"),
    "overloaded": (503, "too many requests in flight; see Retry-After"),
    "not_ready": (503, "the gateway is starting or draining"),
    "upstream_busy": (503, "every connection to the upstream stayed busy past timeouts.pool; nothing was sent; "
                           "see Retry-After"),
    "rate_limit_unavailable": (503, "the shared rate-limit buckets could not be reached, so nothing was forwarded"),
    "upstream_timeout": (504, "the upstream did not answer in time"),
}


class TetherError(Exception):
    """A refusal with a stable code. Raised by any stage; the pipeline turns it into a JSON reply."""

    __slots__ = ("code", "status", "message", "headers", "details")

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        details: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        known = ERROR_CODES.get(code)
        if status is None:
            if known is None:
                raise ValueError(f"unknown error code {code!r}: add it to ERROR_CODES")
            status = known[0]
        self.code = code
        self.status = status
        self.message = message or (known[1] if known else code)
        self.headers = dict(headers or {})
        self.details = details
        super().__init__(f"{code}: {self.message}")

    def body(self, request_id: str | None) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "request_id": request_id}
        if self.details:
            err["details"] = self.details
        return {"error": err}


class AuthError(TetherError):
    """401: the caller could not be identified; carries a WWW-Authenticate challenge."""

    def __init__(self, code: str, message: str | None = None) -> None:
        # a header value: quotes and anything outside printable ASCII escaped (a claim echoed in a message
        # must never split the header or make the response fail)
        desc = (message or ERROR_CODES[code][1]).replace('"', "'").encode("ascii", "backslashreplace").decode()
        desc = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in desc)
        super().__init__(
            code,
            message,
            headers={"WWW-Authenticate": f'Bearer realm="tether", error="invalid_token", error_description="{desc}"'
                     if code != "token_missing" else 'Bearer realm="tether"'},
        )


def error_table_markdown() -> str:
    """The README's error table, generated from ERROR_CODES."""
    rows = ["| code | status | meaning |", "|---|---|---|"]
    for code, (status, meaning) in sorted(ERROR_CODES.items(), key=lambda kv: (kv[1][0], kv[0])):
        rows.append(f"| `{code}` | {status} | {meaning} |")
    return "\n".join(rows)
