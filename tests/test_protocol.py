"""The agent listeners' HTTP handling (proxy/doors/rest/protocol.py): ``Expect: 100-continue``.

An agent that announces its upload with ``Expect: 100-continue`` (curl does, and SDKs built on it) holds the
body back until Tether says ``100 Continue``. Tether says it once the request passed every check that does
not need the body (identity, route, grant, intent, rate limit), right before reading it; a request refused
before that gets its refusal instead of the 100, marked ``Connection: close``. Before this, Tether never
sent the 100: curl stalled for its expect timeout (1 s by default) on every upload, and a refused request
waited for a body that never came until ``client_timeout`` cut it off with 408.

The client side is real: curl (its trace shows what it received), and raw sockets that hold the body back
the way a waiting client does.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import orjson
import pytest

from tests.conftest import GatewayHandle, MakeGateway, base_rules
from tests.fakes import FakeUpstream

WAIT = 10.0  # for a 100 that is sent at once; without the fix it never comes (the gateway waits for the body)


def _rules(upstream: FakeUpstream, store_url: str) -> dict[str, Any]:
    rules = base_rules(upstream.url, store_url)
    caps = rules["capabilities"]
    caps["upload.put"] = {"upstream": "crm", "method": "PUT", "path": "/files/{id}", "stream_request": True,
                          "compensation": "non_compensable"}
    caps["note.create"] = {"upstream": "crm", "method": "POST", "path": "/api/notes", "rate_limit":
                           {"per_minute": 1, "burst": 1}}
    rules["agents"]["bot"]["grants"] += [{"capability": "upload.put", "mode": "live"},
                                         {"capability": "note.create", "mode": "live"}]
    return rules


async def _open(gw: GatewayHandle) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.gw.listeners[0].bound_port)


def _head(gw: GatewayHandle, method: str, path: str, length: int, *, agent: str = "bot",
          intent: str | None = "upload a file", token: str | None = None, expect: str = "100-continue",
          version: str = "1.1", extra: str = "") -> bytes:
    tok = token if token is not None else gw.token(agent)
    lines = [f"{method} /crm{path} HTTP/{version}", "Host: 127.0.0.1", f"Authorization: Bearer {tok}",
             "Content-Type: application/json", f"Content-Length: {length}"]
    if expect:
        lines.append(f"Expect: {expect}")
    if intent:
        lines.append(f"X-Tether-Intent: {intent}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    return status, {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers = await _read_head(reader)
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), WAIT)
    return status, headers, body


async def test_100_continue_then_the_body_is_read_and_forwarded(make_gateway: MakeGateway, upstream: FakeUpstream,
                                                               store_url: str) -> None:
    gw = await make_gateway(_rules(upstream, store_url))
    body = orjson.dumps({"name": "Ada", "notes": "x" * 300_000})
    reader, writer = await _open(gw)
    try:
        writer.write(_head(gw, "POST", "/api/contacts", len(body)))
        status, _ = await _read_head(reader)  # the body has not been sent: only Tether's 100 can come
        assert status == 100
        writer.write(body)
        status, headers, answer = await _read_response(reader)
        assert status == 201, answer
        assert orjson.loads(answer)["name"] == "Ada"
        # the connection carries the next request as usual (no Expect this time)
        writer.write(_head(gw, "GET", "/api/contacts/1", 0, expect="", intent=None))
        status, _, _ = await _read_response(reader)
        assert status == 200
    finally:
        writer.close()
    [got] = upstream.seen("POST", "/api/contacts")
    assert got.body == body
    assert "Expect" not in got.headers  # Tether answered the expectation; the upstream gets a plain request


async def test_streamed_upload_gets_its_100_when_forwarding_starts(make_gateway: MakeGateway,
                                                                  upstream: FakeUpstream, store_url: str) -> None:
    gw = await make_gateway(_rules(upstream, store_url))
    body = b"y" * 200_000
    reader, writer = await _open(gw)
    try:
        writer.write(_head(gw, "PUT", "/files/f1", len(body)))
        status, _ = await _read_head(reader)
        assert status == 100
        writer.write(body)
        status, _, _ = await _read_response(reader)
        assert status == 200
    finally:
        writer.close()
    [got] = upstream.seen("PUT", "/files/f1")
    assert got.body == body


@pytest.mark.parametrize("case, code, status", [
    ("not_granted", "capability_not_granted", 403),
    ("no_intent", "intent_required", 400),
    ("rate_limited", "rate_limited", 429),
    ("bad_token", "token_malformed", 401),
    ("unregistered", "route_not_registered", 403),
    ("too_large", "body_too_large", 413),
])
async def test_a_request_refused_before_its_body_gets_the_refusal_instead_of_100(
        make_gateway: MakeGateway, upstream: FakeUpstream, store_url: str, case: str, code: str, status: int) -> None:
    rules = _rules(upstream, store_url)
    rules["server"]["limits"] = {"max_body_bytes": 1000}
    gw = await make_gateway(rules)
    path, agent, intent, token, length = "/api/notes", "bot", "note it", None, 500
    if case == "not_granted":
        agent = "other-bot"
    elif case == "no_intent":
        intent = None
    elif case == "rate_limited":
        r = await gw.request("POST", "/api/notes", json={"text": "first"})  # spends the one token
        assert r.status == 201
    elif case == "bad_token":
        token = "not-a-jwt"
    elif case == "unregistered":
        path = "/api/secrets"
    elif case == "too_large":
        length = 5000
    before = len(upstream.received)
    reader, writer = await _open(gw)
    try:
        writer.write(_head(gw, "POST", path, length, agent=agent, intent=intent, token=token))
        got, headers, answer = await _read_response(reader)
    finally:
        writer.close()
    assert got == status, answer
    assert orjson.loads(answer)["error"]["code"] == code
    assert headers.get("connection", "").lower() == "close"  # the announced body never comes
    assert len(upstream.received) == before
    recs = [r for r in await gw.journal() if r.get("reason") == code and r["kind"] == "request"]
    assert recs, "the refusal is journaled"


async def test_a_body_sent_without_waiting_for_100_is_read_as_usual(make_gateway: MakeGateway,
                                                                  upstream: FakeUpstream, store_url: str) -> None:
    """A client that sends Expect and its body at once (allowed) gets no stray 100 before its answer."""
    gw = await make_gateway(_rules(upstream, store_url))
    body = orjson.dumps({"name": "Bo"})
    reader, writer = await _open(gw)
    try:
        writer.write(_head(gw, "POST", "/api/contacts", len(body)) + body)
        status, _, _ = await _read_response(reader)
        assert status == 201
    finally:
        writer.close()


async def test_http_1_0_client_gets_no_100(make_gateway: MakeGateway, upstream: FakeUpstream,
                                          store_url: str) -> None:
    """RFC 9110 §10.1.1: never a 100 to an HTTP/1.0 client; it sends its body when it likes."""
    gw = await make_gateway(_rules(upstream, store_url))
    body = orjson.dumps({"name": "Cy"})
    reader, writer = await _open(gw)
    try:
        writer.write(_head(gw, "POST", "/api/contacts", len(body), version="1.0"))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        writer.write(body)
        status, _, _ = await _read_response(reader)
        assert status == 201
    finally:
        writer.close()


async def test_transaction_endpoint_answers_100(make_gateway: MakeGateway, upstream: FakeUpstream,
                                                store_url: str) -> None:
    gw = await make_gateway(_rules(upstream, store_url))
    body = orjson.dumps({"name": "renewal"})
    reader, writer = await _open(gw)
    try:
        writer.write(_head(gw, "POST", "", len(body)).replace(b"POST /crm HTTP", b"POST /_tether/transactions HTTP"))
        status, _ = await _read_head(reader)
        assert status == 100
        writer.write(body)
        status, _, answer = await _read_response(reader)
        assert status == 201, answer
    finally:
        writer.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_upload_does_not_wait_for_its_expect_timeout(make_gateway: MakeGateway, upstream: FakeUpstream,
                                                                store_url: str, tmp_path: Any) -> None:
    """curl with a 20 s expect timeout: it sends the body only after Tether's 100 (or after 20 s without)."""
    gw = await make_gateway(_rules(upstream, store_url))
    data = tmp_path / "contact.json"
    data.write_bytes(orjson.dumps({"name": "Dee", "bio": "z" * 2_000_000}))
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-v", "--expect100-timeout", "20", "-H", "Expect: 100-continue",
        "-H", f"Authorization: Bearer {gw.token()}", "-H", "X-Tether-Intent: add a contact",
        "-H", "Content-Type: application/json", "--data-binary", f"@{data}", "-o", "/dev/null",
        "-w", "%{http_code}", f"{gw.url}/crm/api/contacts",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    trace = err.decode(errors="replace")
    assert out.decode() == "201", trace[-2000:]
    assert "< HTTP/1.1 100 Continue" in trace, trace[-2000:]
    assert "Done waiting for 100-continue" not in trace  # curl's line when its expect timeout ran out
    [got] = upstream.seen("POST", "/api/contacts")
    assert got.body == data.read_bytes()
