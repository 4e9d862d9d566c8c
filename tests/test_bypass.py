"""Request handling that cannot be bypassed: a table of attacks sent as raw bytes over a real socket.

Each row is a request an attacker (or a prompt-injected agent) might send, and what Tether must do:
refuse it with a given status and code (and the fake upstream receives nothing), or resolve it to the
exact request the upstream then receives.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import TetherError
from proxy.normalise import canonical_path, decode_segments, split_target
from tests.conftest import base_rules


def bypass_rules(upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["capabilities"]["contact.update"]["body"] = {"allow_fields": ["name", "stage"]}
    rules["capabilities"]["admin.secrets"] = {"upstream": "crm", "method": "GET", "path": "/api/admin/secrets"}
    rules["capabilities"]["contact.update"]["params"] = {"id": "[0-9]+"}
    rules["capabilities"]["contact.read"]["params"] = {"id": "[0-9]+"}
    rules["upstreams"]["crm"]["credential_params"] = ["api_key"]
    return rules


async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    is_head = data.startswith(b"HEAD ")
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers and not is_head:
            body = await asyncio.wait_for(r.readexactly(int(headers["content-length"])), timeout)
        return status, headers, body
    finally:
        w.close()


def req(method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"",
        default_headers: bool = True) -> Any:
    """Template of a raw request; {host}, {token} are filled in per test."""
    return ("req", method, target, headers or [], body, default_headers)


def raw(data: bytes) -> Any:
    return ("raw", data)


DENY = "deny"

# (id, request, status, code or None, forwarded (method, raw path) or None)
TABLE: list[tuple[str, Any, int, str | None, tuple[str, str] | None]] = [
    # --- path tricks -------------------------------------------------------------------------
    ("dotdot", req("GET", "/crm/api/contacts/1/../../admin/secrets"), 400, "ambiguous_request", None),
    ("dotdot-encoded", req("GET", "/crm/api/contacts/1/%2e%2e/%2e%2e/admin/secrets"), 400, "ambiguous_request", None),
    ("dotdot-mixed", req("GET", "/crm/api/contacts/1/.%2e/admin"), 400, "ambiguous_request", None),
    ("dot", req("GET", "/crm/./api/contacts/1"), 400, "ambiguous_request", None),
    ("dot-encoded", req("GET", "/crm/api/contacts/%2e"), 400, "ambiguous_request", None),
    ("slash-encoded", req("GET", "/crm/api/contacts/1%2fdelete"), 400, "ambiguous_request", None),
    ("slash-encoded-upper", req("GET", "/crm/api/contacts/1%2Fdelete"), 400, "ambiguous_request", None),
    ("backslash-encoded", req("GET", "/crm/api/contacts/1%5cdelete"), 400, "ambiguous_request", None),
    ("backslash-raw", req("GET", "/crm/api/contacts\\1"), 400, "ambiguous_request", None),
    ("semicolon", req("GET", "/crm/api/contacts/1;jsessionid=x"), 400, "ambiguous_request", None),
    ("dotdot-semicolon", req("GET", "/crm/api/contacts/..;/admin/secrets"), 400, "ambiguous_request", None),
    ("semicolon-encoded", req("GET", "/crm/api/contacts/1%3bx"), 400, "ambiguous_request", None),
    ("double-slash", req("GET", "/crm//api/contacts/1"), 400, "ambiguous_request", None),
    ("double-slash-inner", req("GET", "/crm/api//contacts/1"), 400, "ambiguous_request", None),
    ("nul-encoded", req("GET", "/crm/api/contacts/1%00"), 400, "ambiguous_request", None),
    ("double-encoding", req("GET", "/crm/api/contacts/1%252f"), 400, "ambiguous_request", None),
    ("overlong-utf8", req("GET", "/crm/api/contacts/%c0%af"), 400, "ambiguous_request", None),
    ("invalid-utf8", req("GET", "/crm/api/contacts/%ff"), 400, "ambiguous_request", None),
    ("tab-encoded", req("GET", "/crm/api/contacts/1%09"), 400, "ambiguous_request", None),
    ("crlf-encoded", req("GET", "/crm/api/contacts/1%0d%0aX-Injected:%20y"), 400, "ambiguous_request", None),
    ("malformed-escape", req("GET", "/crm/api/contacts/1%zz"), 400, "ambiguous_request", None),
    ("fragment", req("GET", "/crm/api/contacts/1#/../admin"), 400, "ambiguous_request", None),
    ("absolute-form", req("GET", "http://evil.example/crm/api/contacts/1"), 400, "ambiguous_request", None),
    ("absolute-form-upstream", req("GET", "http://{upstream}/api/contacts/1"), 400, "ambiguous_request", None),
    ("asterisk-form", req("OPTIONS", "*"), 400, "ambiguous_request", None),
    ("network-path", req("GET", "//evil.example/crm/api/contacts/1"), 400, "ambiguous_request", None),
    ("raw-non-ascii", raw(b"GET /crm/api/contacts/\xc3\xa9 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                          b"\r\n\r\n"), 400, "ambiguous_request", None),
    ("raw-nul", raw(b"GET /crm/api/contacts/1\x00 HTTP/1.1\r\nHost: {host}\r\n\r\n"), 400, "ambiguous_request", None),
    ("prefix-case", req("GET", "/CRM/api/contacts/1"), 403, "route_not_registered", None),
    ("segment-case", req("GET", "/crm/API/contacts/1"), 403, "route_not_registered", None),
    ("homoglyph", req("GET", "/crm/api/contact%D1%95/1"), 403, "route_not_registered", None),
    ("id-pattern-fullmatch", req("GET", "/crm/api/contacts/1abc"), 403, "route_not_registered", None),
    ("id-pattern-newline", req("GET", "/crm/api/contacts/1%0a"), 400, "ambiguous_request", None),
    ("unregistered-admin", req("GET", "/crm/api/admin/secrets"), 403, "capability_not_granted", None),
    # the path forwarded is the path matched: one escaping, a trailing '/' only where the template has one
    ("trailing-slash-resolves", req("GET", "/crm/api/contacts/1/"), 404, None, ("GET", "/api/contacts/1")),
    ("encoded-digit-resolves", req("GET", "/crm/api/contacts/%31"), 404, None, ("GET", "/api/contacts/1")),
    ("encoded-letter-resolves", req("GET", "/crm/ech%6F"), 200, None, ("GET", "/echo")),
    # --- Unicode lookalikes of '/', '\', '.' and separators, percent-encoded ------------------------
    ("fullwidth-solidus", req("GET", "/crm/api/contacts/1%EF%BC%8Fdelete"), 400, "ambiguous_request", None),
    ("division-slash", req("GET", "/crm/api/contacts/1%E2%88%95..%E2%88%95admin"), 400, "ambiguous_request", None),
    ("fraction-slash", req("GET", "/crm/api/contacts/1%E2%81%84x"), 400, "ambiguous_request", None),
    ("fullwidth-reverse-solidus", req("GET", "/crm/api/contacts/1%EF%BC%BCx"), 400, "ambiguous_request", None),
    ("one-dot-leader", req("GET", "/crm/api/contacts/%E2%80%A4%E2%80%A4"), 400, "ambiguous_request", None),
    ("two-dot-leader", req("GET", "/crm/api/%E2%80%A5/admin/secrets"), 400, "ambiguous_request", None),
    ("fullwidth-full-stop", req("GET", "/crm/api/contacts/%EF%BC%8E%EF%BC%8E"), 400, "ambiguous_request", None),
    ("ideographic-full-stop", req("GET", "/crm/api/contacts/%E3%80%82%E3%80%82"), 400, "ambiguous_request", None),
    ("line-separator-encoded", req("GET", "/crm/api/contacts/1%E2%80%A8"), 400, "ambiguous_request", None),
    ("bidi-override-encoded", req("GET", "/crm/api/contacts/%E2%80%AE1"), 400, "ambiguous_request", None),
    ("c1-next-line-encoded", req("GET", "/crm/api/contacts/1%C2%85"), 400, "ambiguous_request", None),
    # --- method tricks -----------------------------------------------------------------------
    ("override-header", req("POST", "/crm/api/contacts", [("X-HTTP-Method-Override", "DELETE")], b"{}"),
     400, "ambiguous_request", None),
    ("override-header-2", req("GET", "/crm/api/contacts/1", [("X-Method-Override", "DELETE")]), 400,
     "ambiguous_request", None),
    ("override-header-3", req("GET", "/crm/api/contacts/1", [("X-HTTP-Method", "DELETE")]), 400,
     "ambiguous_request", None),
    ("override-param", req("GET", "/crm/api/contacts/1?_method=DELETE"), 400, "ambiguous_request", None),
    ("override-param-dup", req("GET", "/crm/api/contacts/1?_method=GET&_method=DELETE"), 400, "ambiguous_request", None),
    ("override-param-sf", req("GET", "/crm/api/contacts/1?_HttpMethod=DELETE"), 400, "ambiguous_request", None),
    ("override-param-semicolon", req("GET", "/crm/api/contacts/1?a=1;_method=DELETE"), 400, "ambiguous_request",
     None),
    ("override-param-x-http-method", req("GET", "/crm/api/contacts/1?X-HTTP-Method=DELETE"), 400,
     "ambiguous_request", None),
    ("override-form-body", req("POST", "/crm/api/contacts", [("Content-Type", "application/x-www-form-urlencoded")],
                               b"name=a&_method=DELETE"), 400, "ambiguous_request", None),
    ("override-form-body-encoded", req("POST", "/crm/api/contacts",
                                       [("Content-Type", "application/x-www-form-urlencoded")],
                                       b"name=a&%5FMETHOD=DELETE"), 400, "ambiguous_request", None),
    ("override-form-body-semicolon", req("POST", "/crm/api/contacts",
                                         [("Content-Type", "application/x-www-form-urlencoded")],
                                         b"name=a;_method=DELETE"), 400, "ambiguous_request", None),
    ("override-json-body", req("POST", "/crm/api/contacts", [("Content-Type", "application/json")],
                               b'{"name": "a", "_method": "DELETE"}'), 400, "ambiguous_request", None),
    ("override-json-body-escaped", req("POST", "/crm/api/contacts", [("Content-Type", "application/json")],
                                       b'{"name": "a", "\\u005fmethod": "DELETE"}'), 400, "ambiguous_request", None),
    ("override-multipart-body", req("POST", "/crm/api/contacts", [("Content-Type", "multipart/form-data; boundary=B")],
                                    b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\na\r\n'
                                    b'--B\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n'
                                    b"--B--\r\n"), 400, "ambiguous_request", None),
    ("override-multipart-rfc2231", req("POST", "/crm/api/contacts", [("Content-Type", "multipart/form-data; boundary=B")],
                                       b"--B\r\nContent-Disposition: form-data; name*=utf-8''%5Fmethod\r\n\r\n"
                                       b"DELETE\r\n--B--\r\n"), 400, "ambiguous_request", None),
    ("override-read-form-body", req("GET", "/crm/echo", [("Content-Type", "application/x-www-form-urlencoded")],
                                    b"_method=DELETE"), 400, "ambiguous_request", None),
    ("override-read-json-body", req("GET", "/crm/echo", [("Content-Type", "application/json")],
                                    b'{"_method": "DELETE"}'), 400, "ambiguous_request", None),
    # --- credentials where a server reads them -----------------------------------------------------
    ("credential-param", req("GET", "/crm/echo?api_key=stolen"), 400, "credential_in_request", None),
    ("credential-param-semicolon", req("GET", "/crm/echo?a=1;api_key=stolen"), 400, "credential_in_request", None),
    ("credential-param-encoded", req("GET", "/crm/echo?API%5FKEY=stolen"), 400, "credential_in_request", None),
    ("credential-form-body", req("POST", "/crm/api/contacts", [("Content-Type", "application/x-www-form-urlencoded")],
                                 b"name=a&api_key=stolen"), 400, "credential_in_request", None),
    ("credential-multipart-body", req("POST", "/crm/api/contacts", [("Content-Type", "multipart/form-data; boundary=B")],
                                      b'--B\r\nContent-Disposition: form-data; name="api_key"\r\n\r\nstolen\r\n'
                                      b"--B--\r\n"), 400, "credential_in_request", None),
    ("lowercase-method", raw(b"get /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\n\r\n"), 405,
     "method_not_allowed", None),
    ("unknown-method", raw(b"FOO /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\n\r\n"), 405, "method_not_allowed", None),
    ("webdav-method", req("PROPFIND", "/crm/api/contacts/1"), 405, "method_not_allowed", None),
    ("trace", req("TRACE", "/crm/api/contacts/1"), 405, "method_not_allowed", None),
    ("connect", raw(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"), 405, None, None),
    ("head-is-not-get", req("HEAD", "/crm/api/contacts/1"), 403, None, None),
    # --- header tricks -----------------------------------------------------------------------
    ("alias-underscore", req("GET", "/crm/api/contacts/1", [("X_Tether_Agent", "admin")]), 400,
     "ambiguous_request", None),
    ("alias-dot", req("GET", "/crm/api/contacts/1", [("X.Tether.Agent", "admin")]), 400, "ambiguous_request", None),
    ("alias-authorization", req("GET", "/crm/api/contacts/1", [("X_Forwarded_For", "1.2.3.4")]), 400,
     "ambiguous_request", None),
    ("spoofed-provenance-stripped", req("GET", "/crm/echo", [("X-Tether-Agent", "admin"),
                                                             ("X-Tether-On-Behalf-Of", "ceo")]), 200, None,
     ("GET", "/echo")),
    ("connection-names-intent", req("GET", "/crm/api/contacts/1", [("Connection", "close, X-Tether-Intent")]), 400,
     "ambiguous_request", None),
    ("connection-names-authorization", req("GET", "/crm/api/contacts/1", [("Connection", "Authorization")]), 400,
     "ambiguous_request", None),
    ("forwarded-stripped", req("GET", "/crm/echo", [("Forwarded", "for=1.2.3.4;host=evil.example"),
                                                    ("X-Forwarded-Host", "evil.example"),
                                                    ("X-Original-URL", "/api/admin/secrets"),
                                                    ("X-Rewrite-URL", "/api/admin/secrets")]), 200, None,
     ("GET", "/echo")),
    ("cookie-stripped", req("GET", "/crm/echo", [("Cookie", "tenant=other")]), 200, None, ("GET", "/echo")),
    ("foreign-host", req("GET", "/crm/api/contacts/1", [("Host", "evil.example")], default_headers=False), 400,
     "ambiguous_request", None),
    ("duplicate-host", raw(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\n\r\n"), 400,
     "ambiguous_request", None),
    ("cl-and-te", raw(b"POST /crm/api/contacts HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400, "ambiguous_request", None),
    ("two-authorizations", raw(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                               b"Authorization: Bearer {token}\r\n\r\n"), 400, "ambiguous_request", None),
    ("two-intents", req("GET", "/crm/api/contacts/1", [("X-Tether-Intent", "a"), ("X-Tether-Intent", "b")]), 400,
     "ambiguous_request", None),
    ("host-loopback-lookalike", req("GET", "/crm/api/contacts/1", [("Host", "127.attacker.example")],
                                    default_headers=False), 400, "ambiguous_request", None),
    ("host-localhost-suffix", req("GET", "/crm/api/contacts/1", [("Host", "localhost.attacker.example")],
                                  default_headers=False), 400, "ambiguous_request", None),
    ("host-foreign-control", req("GET", "/_tether/whoami", [("Host", "evil.example")], default_headers=False), 400,
     "ambiguous_request", None),
    ("host-lookalike-control", req("GET", "/_tether/healthz", [("Host", "127.0.0.1.nip.io")], default_headers=False),
     400, "ambiguous_request", None),
    # --- agent text an operator reads: control, line-separator and bidi characters ----------------
    ("intent-bidi-override", raw(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                                 b"\r\nX-Tether-Intent: refund \xe2\x80\xae001$ \r\n\r\n"), 400, "bad_request", None),
    ("intent-line-separator", raw(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                                  b"\r\nX-Tether-Intent: ok\xe2\x80\xa8decision=live\r\n\r\n"), 400, "bad_request",
     None),
    ("intent-c1-control", raw(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                              b"\r\nX-Tether-Intent: ok\xc2\x9b2J\r\n\r\n"), 400, "bad_request", None),
    ("intent-invalid-utf8", raw(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}"
                                b"\r\nX-Tether-Intent: ok\xff\r\n\r\n"), 400, "bad_request", None),
    # --- vendor session and tenant headers ---------------------------------------------------------
    ("vendor-headers-stripped", req("GET", "/crm/echo", [("X-SFDC-Session", "00Dstolen!session"),
                                                        ("Stripe-Account", "acct_other"),
                                                        ("Stripe-Context", "ctx_other")]), 200, None,
     ("GET", "/echo")),
    ("vendor-header-alias", req("GET", "/crm/echo", [("X_SFDC_Session", "00Dstolen!session")]), 400,
     "ambiguous_request", None),
    # --- body tricks -------------------------------------------------------------------------
    ("duplicate-json-key", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                               b'{"name": "a", "owner": "x", "owner": "y"}'), 400, "duplicate_json_key", None),
    ("escaped-key", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                        b'{"\\u006fwner": "x"}'), 422, "field_not_allowed", None),
    ("no-content-type-json", req("PATCH", "/crm/api/contacts/1", [], b'{"owner": "x"}'), 422, "field_not_allowed",
     None),
    ("lying-content-type", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                               b"owner=x"), 400, "malformed_json", None),
    ("text-plain-body", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "text/plain")], b'{"owner": "x"}'), 400,
     "body_content_type_mismatch", None),
    ("form-as-json-type", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/x-www-form-urlencoded")],
                              b'{"owner":"x"}'), 400, "body_content_type_mismatch", None),
    ("gzip-body", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json"),
                                                      ("Content-Encoding", "gzip")], b"\x1f\x8b..."), 400,
     "bad_request", None),
    ("deep-json", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                      b'{"name": ' + b"[" * 200 + b"]" * 200 + b"}"), 400, "json_too_deep", None),
    ("nan-json", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")], b'{"name": NaN}'), 400,
     "malformed_json", None),
    ("bom-json", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                     b'\xef\xbb\xbf{"name": "a"}'), 400, "malformed_json", None),
    ("valid-write-resolves", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                                 b'{"name": "a"}'), 404, None, ("PATCH", "/api/contacts/1")),
    # --- size limits -------------------------------------------------------------------------
    ("uri-too-long", req("GET", "/crm/api/contacts/1?q=" + "x" * 9000), 414, "uri_too_long", None),
    ("too-many-headers", req("GET", "/crm/api/contacts/1", [(f"X-H{i}", "v") for i in range(140)]), 431,
     "headers_too_large", None),
    ("huge-header", req("GET", "/crm/api/contacts/1", [("X-Big", "v" * 20000)]), 431, "headers_too_large", None),
    ("body-too-large", req("PATCH", "/crm/api/contacts/1", [("Content-Type", "application/json")],
                           b'{"name": "' + b"x" * (11 * 1024 * 1024) + b'"}'), 413, "body_too_large", None),
]


def build(row: Any, host: str, token: str, upstream_host: str) -> bytes:
    if row[0] == "raw":
        return row[1].replace(b"{host}", host.encode()).replace(b"{token}", token.encode())
    _, method, target, headers, body, default_headers = row
    target = target.replace("{upstream}", upstream_host)
    lines = [f"{method} {target} HTTP/1.1"]
    if default_headers:
        lines.append(f"Host: {host}")
    lines.append(f"Authorization: Bearer {token}")
    if not any(k.lower() == "x-tether-intent" for k, _ in headers):
        lines.append("X-Tether-Intent: bypass test")
    for k, v in headers:
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PATCH", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close") if not any(k.lower() == "connection" for k, _ in headers) else None
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
async def bypass_gw(make_gateway, upstream, tmp_path):
    return await make_gateway(bypass_rules(upstream, tmp_path))


def test_the_table_is_big_enough():
    assert len(TABLE) >= 60


@pytest.mark.parametrize("name, row, status, code, forwarded", TABLE, ids=[t[0] for t in TABLE])
async def test_bypass_attempt(bypass_gw, upstream, name, row, status, code, forwarded):
    port = bypass_gw.gw.listeners[0].bound_port
    token = bypass_gw.token("bot")
    data = build(row, f"127.0.0.1:{port}", token, f"127.0.0.1:{upstream.port}")
    got_status, headers, body = await raw_request(port, data)
    assert got_status == status, (got_status, body[:300])
    if code is not None:
        doc = orjson.loads(body)
        assert doc["error"]["code"] == code, doc
        assert doc["error"]["request_id"]
    if forwarded is None:
        assert upstream.received == [], [r.raw_path for r in upstream.received]
    else:
        assert [(r.method, r.raw_path) for r in upstream.received] == [forwarded]
        got = upstream.received[0]
        assert got.headers.get("X-Tether-Agent") == "bot"
        for h in ("Forwarded", "X-Forwarded-Host", "X-Original-URL", "X-Rewrite-URL", "Cookie", "X-Tether-On-Behalf-Of",
                  "X-SFDC-Session", "Stripe-Account", "Stripe-Context"):
            assert h not in got.headers


async def test_refusals_are_journaled(bypass_gw):
    port = bypass_gw.gw.listeners[0].bound_port
    token = bypass_gw.token("bot")
    for row in (TABLE[0][1], TABLE[27][1]):  # one pipeline refusal, one parser refusal
        await raw_request(port, build(row, f"127.0.0.1:{port}", token, "x"))
    recs = [r for r in await bypass_gw.journal() if r["kind"] == "request"]
    assert any(r["reason"] == "ambiguous_request" and r.get("stage") == "http_parser" for r in recs)
    assert any(r["reason"] == "ambiguous_request" and r.get("stage") == "parse_request" for r in recs)


# ------------------------------------------------------------------------------- properties

_SEG_ALPHABET = st.sampled_from(list("abcXYZ019-._~!$&'()*+,=:@") + ["%2e", "%2f", "%2F", "%5c", "%25", "%3b", "%00",
                                                                       "%41", "%c3%a9", "%ff", "%e2%82%ac", ";",
                                                                       "..", ".", "\\", "%20", "%7e"])
_SEGMENT = st.lists(_SEG_ALPHABET, min_size=0, max_size=5).map("".join)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=6).map(lambda segs: "/" + "/".join(segs))


def upstream_reading(raw_path: str) -> tuple[str, ...]:
    """How a typical upstream server reads a path: resolve nothing, split on '/', then percent-decode."""
    body = raw_path[1:]
    if body.endswith("/"):
        body = body[:-1]
    return tuple(unquote(s, errors="strict") for s in body.split("/")) if body else ()


def naive_reading(raw_path: str) -> tuple[str, ...]:
    """How a careless server reads it: decode first, then split and resolve dot segments."""
    import posixpath

    decoded = unquote(raw_path, errors="replace")
    norm = posixpath.normpath(decoded.replace("\\", "/"))
    return tuple(s for s in norm.split("/") if s)


@settings(max_examples=600, deadline=None)
@given(_PATH)
def test_accepted_paths_read_the_same_by_every_server(path):
    """Whatever Tether accepts, a careful and a careless server read exactly as Tether did."""
    try:
        _, _ = split_target(path, 8192)
        segs = decode_segments(path)
    except TetherError as err:
        assert err.code in ("ambiguous_request", "uri_too_long")
        return
    assert segs == upstream_reading(path)
    assert segs == naive_reading(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_SEGMENT, min_size=1, max_size=3).map(lambda s: "/" + "/".join(s)))
async def test_the_route_matched_is_the_route_the_upstream_receives(bypass_gw, upstream, suffix):
    """Random paths under a registered prefix: if Tether forwards, the upstream got the same path, and the
    capability journaled is the one the upstream's own reading of that path matches."""
    upstream.received.clear()
    port = bypass_gw.gw.listeners[0].bound_port
    target = "/crm/api/contacts" + suffix
    data = build(req("GET", target), f"127.0.0.1:{port}", bypass_gw.token("bot"), "x")
    status, headers, _ = await raw_request(port, data)
    if not upstream.received:
        assert status in (400, 403, 414), status
        return
    got = upstream.received[-1]
    # the upstream got the very segments Tether matched, in their one canonical spelling
    matched = decode_segments(target)[1:]
    assert upstream_reading(got.raw_path) == matched
    assert got.raw_path == canonical_path(target[len("/crm"):], matched, False)
    rid = headers["x-tether-request-id"]
    recs = [r for r in await bypass_gw.journal() if r["request_id"] == rid and r["kind"] == "request"]
    found = bypass_gw.gw.state.registry.match("crm", "GET", upstream_reading(got.path))
    assert found is not None and recs[0]["capability"] == found[0].name


def test_param_patterns_use_fullmatch():
    from proxy.core.rules import build_state
    from proxy.config import parse_rules

    rules = parse_rules(bypass_rules(type("U", (), {"url": "http://127.0.0.1:1"}), __import__("pathlib").Path("/tmp")))
    state = build_state(rules, lambda: None)
    assert state.registry.match("crm", "GET", ("api", "contacts", "12")) is not None
    for bad in ("12\n", "12a", "a12", "", "1 2"):
        assert state.registry.match("crm", "GET", ("api", "contacts", bad)) is None, bad
    assert re.fullmatch("[0-9]+", "12\n") is None


def test_the_security_model_counts_the_table():
    """docs/security.md ("Hard to bypass") says how many attempts this file sends: it must stay true."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    m = re.search(r"`tests/test_bypass.py` sends (\d+) such attempts", page)
    assert m is not None and int(m.group(1)) == len(TABLE)
