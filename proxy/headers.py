"""Which headers cross the gateway, in each direction. Module constants, decided once.

Request headers from the agent are forwarded except:

* hop-by-hop headers (RFC 9110 §7.6.1) and any header the ``Connection`` header names — unless that
  would drop a header Tether itself relies on (its own ``X-Tether-*`` or a credential header), which is
  refused as ambiguous instead;
* ``Host`` (the upstream's is set), ``Content-Length`` (recomputed);
* credentials: ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and the upstream's own credential
  headers — Tether injects the upstream's real credentials;
* anything that claims provenance or routing the agent may not assert: every ``X-Tether-*`` header
  (including aliases spelled with ``_`` or ``.``, which some servers fold into ``-``), ``Forwarded``,
  ``X-Forwarded-*``, ``X-Real-IP``, ``X-Original-URL``, ``X-Rewrite-URL``.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization",
})

# Never forwarded upstream from the agent.
STRIPPED_REQUEST = frozenset({
    "host", "content-length", "authorization", "proxy-authorization", "cookie", "expect",
    "forwarded", "x-real-ip", "x-original-url", "x-rewrite-url", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "x-client-ip",
    "true-client-ip", "x-http-method-override", "x-method-override", "x-http-method",
    # Tether asks for identity-encoded answers (ACCEPT_IDENTITY) so it can redact a reflected credential
    "accept-encoding",
})

ACCEPT_IDENTITY = ("Accept-Encoding", "identity")

# Never returned to the agent from the upstream.
STRIPPED_RESPONSE = frozenset({"content-length"}) | HOP_BY_HOP

# Headers the agent sends to Tether itself (consumed, not forwarded as sent).
INTENT = "X-Tether-Intent"
TRANSACTION = "X-Tether-Transaction"

# Provenance headers Tether adds to every forwarded call.
AGENT = "X-Tether-Agent"
ON_BEHALF_OF = "X-Tether-On-Behalf-Of"
REQUEST_ID = "X-Tether-Request-Id"
AUTHZ_EVENT = "X-Tether-Authz-Event"
DRY_RUN = "X-Tether-Dry-Run"
QUARANTINED = "X-Tether-Quarantined"
DECISION = "X-Tether-Decision"
UPSTREAM_STATUS = "X-Tether-Upstream-Status"  # on an error about an answer the upstream did give

METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")

_ALIAS = re.compile(r"[_.]")


def canonical_name(name: str) -> str:
    """Fold a header name the way lenient servers do: case-insensitive, '_' and '.' read as '-'."""
    return _ALIAS.sub("-", name).lower()


def is_tether_header(name: str) -> bool:
    return canonical_name(name).startswith("x-tether-")


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection (they are hop-by-hop for this message)."""
    out: set[str] = set()
    for value in headers.getall("Connection", ()):
        for tok in value.split(","):
            tok = tok.strip().lower()
            if tok:
                out.add(tok)
    return out
