"""Forwarding fidelity against real servers nobody here wrote (issue 21): nginx, Node's http module,
gunicorn, uvicorn (h11 and httptools) and hypercorn, each a process on 127.0.0.1 (tests/realservers.py).

Agent → Tether (in-process, real sockets) → real server. Each test names the issue item it proves; the
scripted raw servers of test_upstream_http.py pin the client's byte-level edge cases, these show that
what real servers send reaches the agent as they sent it. bench/fidelity.py runs the same cases
direct / through the bare aiohttp forwarder / through Tether and prints the comparison table.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.cli.certs import make_dev_cert
from proxy.transport.upstream_http import OriginPool, UpstreamError
from tests import realservers as R
from tests.conftest import SECRET, GatewayHandle, MakeGateway

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- real servers (one per module)


def _start(factory: Any) -> R.ServerProcess:
    try:
        return factory()
    except R.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fidelity")


@pytest.fixture(scope="module")
def tls_files(workdir: Path) -> tuple[Path, Path]:
    return make_dev_cert(workdir / "certs", ["127.0.0.1", "localhost"])


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[R.ServerProcess]:
    srv = _start(lambda: R.start_node(workdir / "node"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def node_tls(workdir: Path, tls_files: tuple[Path, Path]) -> Iterator[R.ServerProcess]:
    srv = _start(lambda: R.start_node(workdir / "node-tls", tls=tls_files))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def nginx(workdir: Path) -> Iterator[R.ServerProcess]:
    srv = _start(lambda: R.start_nginx(workdir))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gunicorn(workdir: Path) -> Iterator[R.ServerProcess]:
    srv = _start(lambda: R.start_gunicorn(workdir / "gunicorn"))
    yield srv
    srv.stop()


ASGI_SERVERS = ["uvicorn-h11", "uvicorn-httptools", "hypercorn"]


@pytest.fixture(scope="module", params=ASGI_SERVERS)
def asgi(request: pytest.FixtureRequest, workdir: Path) -> Iterator[R.ServerProcess]:
    name = request.param
    d = workdir / name
    if name == "hypercorn":
        srv = _start(lambda: R.start_hypercorn(d))
    else:
        srv = _start(lambda: R.start_uvicorn(d, name.split("-")[1]))
    yield srv
    srv.stop()


def direct_json(url: str, method: str = "GET") -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
        return orjson.loads(r.read())


# --------------------------------------------------------------------------- Tether in front of them


def fidelity_rules(store: str, upstreams: dict[str, Any], caps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Agent ``bot`` granted every capability, writes live."""
    grants: list[Any] = [c if spec["method"] in ("GET", "HEAD", "OPTIONS") else {"capability": c, "mode": "live"}
                         for c, spec in caps.items()]
    return {
        "version": 1,
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store},
        "identity": {"hs_secret": {"value": SECRET}},
        "upstreams": {n: (u if isinstance(u, dict) else {"url": u}) for n, u in upstreams.items()},
        "agents": {"bot": {"grants": grants}},
        "capabilities": caps,
    }


def cap(upstream: str, method: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": upstream, "method": method, "path": path, **extra}


async def raw_request(gw: GatewayHandle, method: str, path: str, *, upstream: str, body: bytes = b"",
                      headers: dict[str, str] | None = None, timeout: float = 10.0) -> bytes:
    """One request to Tether over a raw socket (``Connection: close``): every byte of the answer."""
    port = gw.gw.listeners[0].bound_port
    hdrs = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {gw.token()}", "X-Tether-Intent": "fidelity",
            "Connection": "close", **(headers or {})}
    if body or method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = str(len(body))
    head = f"{method} /{upstream}{path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + body)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def raw_direct(url: str, path: str, method: str = "GET", timeout: float = 10.0) -> bytes:
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def head_fields(raw: bytes) -> dict[bytes, list[bytes]]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    out: dict[bytes, list[bytes]] = {}
    for line in head[1:]:
        k, _, v = line.partition(b":")
        out.setdefault(k.strip().lower(), []).append(v.strip())
    return out


async def outcome(gw: GatewayHandle, request_id: str) -> dict[str, Any]:
    """The outcome record of a request (a streamed answer's is written after its last byte went out)."""
    for _ in range(100):
        recs = await gw.journal()
        found = [r for r in recs if r["kind"] == "outcome" and r["request_id"] == request_id]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no outcome record for {request_id}")


# --------------------------------------------------------------------------- 1. a write's answer is never lost


async def test_large_write_answer_is_relayed_whole_and_arms_its_undo(make_gateway: MakeGateway, store_url: str,
                                                                      gunicorn: R.ServerProcess) -> None:
    """Issue 21 item 1: a 6 MiB answer to a live create (past the old 4 MiB read-whole limit, which
    answered 502 to a write the upstream had applied) reaches the agent whole; the created id comes from
    the answer's first bytes, so the undo is armed and a rollback deletes the record."""
    gw = await make_gateway(fidelity_rules(store_url, {"wsgi": gunicorn.url}, {
        "item.create": cap("wsgi", "POST", "/api/items", operation="create")}))
    pad = 6 * 1024 * 1024
    h = gw.headers(**{"X-Tether-Transaction": "big-1"})
    async with gw.session.post(f"{gw.url}/wsgi/api/items?pad={pad}", json={"name": "big"}, headers=h) as r:
        assert r.status == 201, await r.text()
        body = await r.read()
        rid = r.headers["X-Tether-Request-Id"]
    assert len(body) == pad + len(b'{"id": "item-1", "name": "big", "pad": ""}') and body.endswith(b'x"}')
    created = orjson.loads(body)["id"]
    rec = await outcome(gw, rid)
    assert rec["status"] == 201 and rec.get("error") is None and rec["upstream_ids"] == [created]
    async with gw.session.get(f"{gw.url}/_tether/transactions/big-1", headers=gw.headers()) as r:
        (step,) = (await r.json())["steps"]
    assert step["state"] == "armed" and step["created_ids"] == [created]
    async with gw.session.post(f"{gw.url}/_tether/transactions/big-1/rollback", headers=gw.headers()) as r:
        assert (await r.json())["state"] == "rolled_back"
    assert f"DELETE /api/items/{created}" in direct_json(gunicorn.url + "/api/log")


async def test_write_answer_that_cannot_be_relayed_says_the_write_was_applied(
        make_gateway: MakeGateway, store_url: str, gunicorn: R.ServerProcess, node: R.ServerProcess) -> None:
    """Issue 21 item 1: over ``max_response_bytes``, or cut off before its first byte could be sent, the
    answer to an applied write is a distinct error saying it was applied — never a retryable-looking 502
    ``upstream_response_too_large`` — and the journal says so too."""
    gw = await make_gateway(fidelity_rules(store_url, {
        "wsgi": {"url": gunicorn.url, "max_response_bytes": "1MB"}, "node": node.url}, {
        "item.create": cap("wsgi", "POST", "/api/items", operation="create"),
        "cut.create": cap("node", "POST", "/write-cut", operation="create")}))
    for path, why in (("/wsgi/api/items?pad=2000000", "over the response limit"),
                      ("/node/write-cut", "broke the connection")):
        async with gw.session.post(f"{gw.url}{path}", json={"name": "x"}, headers=gw.headers()) as r:
            doc = await r.json()
            assert r.status == 502, doc
            assert doc["error"]["code"] == "upstream_applied_response_lost"
            assert doc["error"]["details"] == {"applied": True, "upstream_status": 201}
            assert r.headers["X-Tether-Upstream-Status"] == "201"
            assert why in doc["error"]["message"]
            rec = await outcome(gw, r.headers["X-Tether-Request-Id"])
        assert rec["error"] == "upstream_applied_response_lost"
        assert rec["applied"] is True and rec["upstream_status"] == 201


async def test_replayed_write_with_a_large_answer_counts_as_replayed(make_gateway: MakeGateway, store_url: str,
                                                                       gunicorn: R.ServerProcess) -> None:
    """Issue 21 item 1, for approved dry-run writes: the replay's 6 MiB answer no longer marks an applied
    write ``replay_failed`` (which invites a second approval, a duplicate); its status and the answer's
    top-level fields (the created id) are kept."""
    rules = fidelity_rules(store_url, {"wsgi": gunicorn.url}, {
        "item.create": cap("wsgi", "POST", "/api/items", operation="create")})
    rules["agents"]["bot"]["grants"] = [{"capability": "item.create", "mode": "dry_run"}]
    gw = await make_gateway(rules)
    async with gw.session.post(f"{gw.url}/wsgi/api/items?pad={6 << 20}", json={"name": "replayed"},
                               headers=gw.headers()) as r:
        assert r.status == 201
        item_id = r.headers["X-Tether-Dry-Run"]
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={"note": "ok"})
    item = await r.json()
    assert r.status == 200 and item["state"] == "replayed", item.get("replay")
    assert item["replay"]["status"] == 201 and item["replay"]["body"]["id"].startswith("item-")
    assert item["replay"]["body"]["name"] == "replayed" and "pad" not in item["replay"]["body"]


async def test_max_response_bytes_null_means_no_limit_for_reads_and_writes(make_gateway: MakeGateway,
                                                                         store_url: str, nginx: R.ServerProcess,
                                                                         gunicorn: R.ServerProcess) -> None:
    """Issue 21 item 1: ``max_response_bytes: null`` (the default) is no limit — for writes too."""
    gw = await make_gateway(fidelity_rules(store_url, {"web": nginx.url, "wsgi": gunicorn.url}, {
        "file.read": cap("web", "GET", "/files/{name}", params={"name": "[a-z0-9.]+"}),
        "item.create": cap("wsgi", "POST", "/api/items", operation="create")}))
    async with gw.session.get(f"{gw.url}/web/files/large.bin", headers=gw.headers()) as r:
        assert r.status == 200 and len(await r.read()) == R.LARGE_FILE_SIZE
    async with gw.session.post(f"{gw.url}/wsgi/api/items?pad=5000000", json={}, headers=gw.headers()) as r:
        assert r.status == 201 and len(await r.read()) > 5_000_000


# --------------------------------------------------------------------------- 2. streamed answers to writes stream


async def read_event(resp: aiohttp.ClientResponse) -> bytes:
    return await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)


@pytest.mark.parametrize("in_tx", [False, True], ids=["plain", "transaction"])
async def test_event_stream_answer_to_a_post_streams_event_by_event(make_gateway: MakeGateway, store_url: str,
                                                                    asgi: R.ServerProcess, in_tx: bool) -> None:
    """Issue 21 item 2: an LLM-style completion (POST answered text/event-stream) reaches the agent event
    by event: the first event arrives while the server still holds back the rest. Inside a transaction
    the undo is armed from the answer's Location once the stream ends, and a rollback runs it."""
    gw = await make_gateway(fidelity_rules(store_url, {"llm": asgi.url}, {
        "completion.create": cap("llm", "POST", "/v1/completions", operation="create")}))
    key = f"{asgi.name}-{in_tx}"
    h = gw.headers(**({"X-Tether-Transaction": f"tx-{key}"} if in_tx else {}))
    try:
        async with gw.session.post(f"{gw.url}/llm/v1/completions?key={key}", json={"prompt": "hi"}, headers=h) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            first = await read_event(r)  # the server sends the rest only after /release
            assert first.startswith(b'data: {"id": "cmpl-') and b'"Hel"' in first
            urllib.request.urlopen(f"{asgi.url}/release?key={key}", timeout=5).read()
            rest = await asyncio.wait_for(r.read(), 10)
            rid = r.headers["X-Tether-Request-Id"]
    finally:
        urllib.request.urlopen(f"{asgi.url}/release?key={key}", timeout=5).read()
    assert rest.count(b"data: ") == 3 and rest.endswith(b"data: [DONE]\n\n")
    created = orjson.loads(first[len(b"data: "):])["id"]
    rec = await outcome(gw, rid)
    assert rec["status"] == 200 and rec.get("error") is None and rec["upstream_ids"] == [created]
    if in_tx:
        async with gw.session.get(f"{gw.url}/_tether/transactions/tx-{key}", headers=gw.headers()) as r:
            (step,) = (await r.json())["steps"]
        assert step["state"] == "armed" and step["created_ids"] == [created]
        async with gw.session.post(f"{gw.url}/_tether/transactions/tx-{key}/rollback", headers=gw.headers()) as r:
            assert (await r.json())["state"] == "rolled_back"
        assert f"DELETE /v1/completions/{created}" in direct_json(asgi.url + "/log")


async def test_chunked_generator_answer_to_a_post_streams(make_gateway: MakeGateway, store_url: str,
                                                           gunicorn: R.ServerProcess) -> None:
    """Issue 21 item 2: a long export answered by a chunked generator (gunicorn) streams row by row."""
    gw = await make_gateway(fidelity_rules(store_url, {"wsgi": gunicorn.url}, {
        "export.run": cap("wsgi", "POST", "/export", operation="action")}))
    try:
        async with gw.session.post(f"{gw.url}/wsgi/export", json={}, headers=gw.headers()) as r:
            assert r.status == 200
            first = await asyncio.wait_for(r.content.readline(), 10)
            assert first == b'{"row": 1}\n'
            urllib.request.urlopen(f"{gunicorn.url}/release", timeout=5).read()
            rest = await asyncio.wait_for(r.read(), 10)
    finally:
        urllib.request.urlopen(f"{gunicorn.url}/release", timeout=5).read()
    assert rest == b'{"row": 2}\n{"row": 3}\n{"row": 4}\n'


# --------------------------------------------------------------------------- 3. HEAD keeps its Content-Length


ENTITY = [b"content-length", b"content-type", b"etag", b"last-modified", b"accept-ranges"]


@pytest.mark.parametrize("name", ["small.txt", "large.bin"])
async def test_head_keeps_content_length_and_entity_headers(make_gateway: MakeGateway, store_url: str,
                                                            nginx: R.ServerProcess, name: str) -> None:
    """Issue 21 item 3: nginx's HEAD answer — Content-Length and every entity header — reaches the agent
    as nginx sent it, for a small (one-read) and a large (streamed-size) resource."""
    gw = await make_gateway(fidelity_rules(store_url, {"web": nginx.url}, {
        "file.head": cap("web", "HEAD", "/files/{name}", params={"name": "[a-z0-9.]+"}),
        "file.read": cap("web", "GET", "/files/{name}", params={"name": "[a-z0-9.]+"})}))
    direct = head_fields(await raw_direct(nginx.url, f"/files/{name}", "HEAD"))
    via = await raw_request(gw, "HEAD", f"/files/{name}", upstream="web")
    assert via.startswith(b"HTTP/1.1 200 OK\r\n") and via.endswith(b"\r\n\r\n")  # no body
    fields = head_fields(via)
    assert direct[b"content-length"] != [b"0"]
    for h in ENTITY:
        assert fields.get(h) == direct[h], h
    got = await raw_request(gw, "GET", f"/files/{name}", upstream="web")
    assert head_fields(got)[b"content-length"] == direct[b"content-length"]


# --------------------------------------------------------------------------- 5. a body cut by a reset is an error


@pytest.mark.parametrize("tls", [False, True], ids=["tcp-rst", "tls-no-close-notify"])
async def test_close_delimited_body_cut_by_a_reset_is_an_error(make_gateway: MakeGateway, store_url: str,
                                                               node: R.ServerProcess, node_tls: R.ServerProcess,
                                                               tls_files: tuple[Path, Path], tls: bool) -> None:
    """Issue 21 item 5: Node ends a close-delimited body with a TCP reset (or tears TLS down without
    close_notify). The agent's connection is aborted — never a clean, silently short 200 — and the journal
    records upstream_unavailable with the bytes sent. The same body ended in order passes whole."""
    srv = node_tls if tls else node
    up: dict[str, Any] = {"url": srv.url}
    if tls:
        up["ca_file"] = str(tls_files[0])
    gw = await make_gateway(fidelity_rules(store_url, {"node": up}, {
        "cut.read": cap("node", "GET", "/reset-close"), "whole.read": cap("node", "GET", "/clean-close")}))
    async with gw.session.get(f"{gw.url}/node/clean-close", headers=gw.headers()) as r:
        assert (r.status, await r.read()) == (200, b"part-1\npart-2\n")
    rid = None
    with pytest.raises(aiohttp.ClientPayloadError):
        async with gw.session.get(f"{gw.url}/node/reset-close", headers=gw.headers()) as r:
            rid = r.headers["X-Tether-Request-Id"]
            assert r.status == 200  # the head had gone out before the reset
            await r.read()
    assert rid is not None
    rec = await outcome(gw, rid)
    assert rec["error"] == "upstream_unavailable"
    assert 0 < rec["bytes_sent"] <= len(b"part-1\npart-2\n")


def test_read_until_close_over_tls_needs_close_notify_on_both_event_loops(node_tls: R.ServerProcess,
                                                                          tls_files: tuple[Path, Path]) -> None:
    """Issue 21 item 5, the client alone: asyncio's and uvloop's TLS transports report a close without
    close_notify differently (uvloop never calls eof_received); both must fail the body."""
    import ssl

    import uvloop

    async def scenario() -> list[str]:
        pool = OriginPool(node_tls.url, ssl.create_default_context(cafile=str(tls_files[0])),
                          asyncio.get_running_loop())
        seen = []
        try:
            for path in ("/clean-close", "/reset-close"):
                resp = await pool.request("GET", path, {}, None, connect_timeout=5, read_timeout=5)
                try:
                    seen.append((await resp.read(1000)).decode())
                except UpstreamError as exc:
                    seen.append(f"{exc.kind}: {exc}")
                resp.release()
        finally:
            pool.close()
        return seen

    for run in (asyncio.run, uvloop.run):
        clean, cut = run(scenario())
        assert clean == "part-1\npart-2\n"
        assert cut.startswith("broken") and "close_notify" in cut


# --------------------------------------------------------------------------- 6. non-UTF-8 header bytes survive


@pytest.mark.parametrize("server", ["gunicorn", "nginx"])
async def test_latin1_header_bytes_are_forwarded_as_sent(make_gateway: MakeGateway, store_url: str,
                                                         gunicorn: R.ServerProcess, nginx: R.ServerProcess,
                                                         server: str) -> None:
    """Issue 21 item 6: a latin-1 filename in Content-Disposition (gunicorn writes WSGI headers as latin-1;
    nginx copies its config's bytes) reaches the agent as the same bytes, not UTF-8 nor dropped."""
    srv, path = (gunicorn, "/latin1") if server == "gunicorn" else (nginx, "/files/latin1.txt")
    gw = await make_gateway(fidelity_rules(store_url, {"up": srv.url}, {"f.read": cap("up", "GET", path)}))
    direct = head_fields(await raw_direct(srv.url, path))[b"content-disposition"]
    assert direct == [b'attachment; filename="caf\xe9.txt"']
    via = await raw_request(gw, "GET", path, upstream="up")
    assert via.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head_fields(via)[b"content-disposition"] == direct
    assert via.endswith(b"\r\n\r\nx")


# --------------------------------------------------------------------------- 7. Transfer-Encoding per RFC 9112


@pytest.mark.parametrize("codings", ["gzip", "chunked, gzip"])
async def test_transfer_coding_other_than_chunked_last_is_refused_not_misframed(
        make_gateway: MakeGateway, store_url: str, node: R.ServerProcess, codings: str) -> None:
    """Issue 21 item 7: Node sends ``Transfer-Encoding: gzip`` (or ``chunked, gzip``) and closes. The body
    runs to the close (RFC 9112 §6.3); Tether cannot hand a transfer-coded body to the agent as its content,
    so it refuses it with a clear error instead of relaying coded bytes as a 200 or calling it broken."""
    gw = await make_gateway(fidelity_rules(store_url, {"node": node.url}, {"te.read": cap("node", "GET", "/te")}))
    async with gw.session.get(f"{gw.url}/node/te", params={"codings": codings}, headers=gw.headers()) as r:
        doc = await r.json()
        assert r.status == 502, doc
    assert doc["error"]["code"] == "upstream_unavailable"
    assert "transfer coding" in doc["error"]["message"] and "gzip" in doc["error"]["message"]
    assert r.headers["X-Tether-Upstream-Status"] == "200"


# --------------------------------------------------------------------------- 8. retries and Keep-Alive


@pytest.mark.parametrize(("method", "headers", "retried"), [
    ("PUT", {}, True), ("DELETE", {}, True), ("GET", {}, True),
    ("POST", {"Idempotency-Key": "order-7"}, True), ("POST", {}, False),
], ids=["PUT", "DELETE", "GET", "POST-idempotency-key", "POST"])
async def test_request_dropped_on_a_reused_connection_is_retried_when_idempotent(
        make_gateway: MakeGateway, store_url: str, node: R.ServerProcess, method: str, headers: dict[str, str],
        retried: bool) -> None:
    """Issue 21 item 8: Node drops a request that arrives on a reused connection without answering (as a
    server closing an idle connection does). Idempotent methods and requests with an Idempotency-Key are
    sent again on a fresh connection; a plain POST is not (its fate is unknown: 502)."""
    gw = await make_gateway(fidelity_rules(store_url, {"node": node.url}, {
        "flaky.get": cap("node", "GET", "/flaky"), "flaky.put": cap("node", "PUT", "/flaky"),
        "flaky.delete": cap("node", "DELETE", "/flaky"), "flaky.post": cap("node", "POST", "/flaky")}))
    async with gw.session.get(f"{gw.url}/node/flaky", headers=gw.headers()) as r:  # warms one connection
        assert r.status == 200
    before = direct_json(node.url + "/stats")["requests"].get("/flaky", 0)
    async with gw.session.request(method, f"{gw.url}/node/flaky", headers=gw.headers(**headers)) as r:
        doc = await r.json()
    after = direct_json(node.url + "/stats")["requests"]["/flaky"]
    if retried:
        assert r.status == 200 and doc["method"] == method
        assert after - before == 2  # dropped once, answered on a fresh connection
    else:
        assert r.status == 502 and doc["error"]["code"] == "upstream_unavailable"
        assert after - before == 1


async def test_keep_alive_timeout_hint_closes_idle_connections_before_the_server(
        make_gateway: MakeGateway, store_url: str, workdir: Path) -> None:
    """Issue 21 item 8: Node announces ``Keep-Alive: timeout=2``; Tether reuses the connection at once but
    not after 1.3 s idle (2 s minus its 1 s margin), so it never sends into a connection Node is closing."""
    srv = _start(lambda: R.start_node(workdir / "node-ka", keepalive_ms=2000))
    try:
        gw = await make_gateway(fidelity_rules(store_url, {"node": srv.url}, {"echo": cap("node", "GET", "/echo")}))

        async def get() -> None:
            async with gw.session.get(f"{gw.url}/node/echo", headers=gw.headers()) as r:
                assert r.status == 200

        c0 = direct_json(srv.url + "/stats")["connections"]  # (this look opens one connection itself)
        await get()
        await get()
        c1 = direct_json(srv.url + "/stats")["connections"]
        assert c1 - c0 == 2  # Tether's one connection, reused, + this look
        await asyncio.sleep(1.3)
        await get()
        c2 = direct_json(srv.url + "/stats")["connections"]
        assert c2 - c1 == 2  # a fresh connection for Tether + this look
    finally:
        srv.stop()


# --------------------------------------------------------------------------- 12. stream_request keeps Content-Length


async def test_streamed_upload_passes_its_content_length(make_gateway: MakeGateway, store_url: str,
                                                         nginx: R.ServerProcess, node: R.ServerProcess) -> None:
    """Issue 21 item 12: a ``stream_request`` upload with a Content-Length is sent with it, not re-chunked
    (nginx and Node here answer 411 to a chunked upload, as object stores do); one sent chunked by the
    agent stays chunked (and gets the object store's own 411)."""
    gw = await make_gateway(fidelity_rules(store_url, {"store": nginx.url, "node": node.url}, {
        "object.put": cap("store", "PUT", "/upload", stream_request=True, compensation="non_compensable"),
        "blob.put": cap("node", "PUT", "/upload", stream_request=True, compensation="non_compensable")}))
    payload = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4
    async with gw.session.put(f"{gw.url}/store/upload", data=payload, headers=gw.headers()) as r:
        assert (r.status, await r.text()) == (200, f"length={len(payload)}\n")
    async with gw.session.put(f"{gw.url}/node/upload", data=payload, headers=gw.headers()) as r:
        doc = await r.json()
    assert r.status == 200 and doc == {"length": len(payload), "content_length": str(len(payload)),
                                       "sha256": hashlib.sha256(payload).hexdigest()}

    async def chunks() -> AsyncIterator[bytes]:
        yield payload[:1000]
        yield payload[1000:]

    async with gw.session.put(f"{gw.url}/node/upload", data=chunks(), headers=gw.headers()) as r:
        assert r.status == 411


# --------------------------------------------------------------------------- 14. 1xx answers and Via


async def test_early_hints_are_dropped_and_the_final_answer_is_intact(make_gateway: MakeGateway, store_url: str,
                                                                      node: R.ServerProcess) -> None:
    """Issue 21 item 14 (documented in README "Forwarding"): Node sends 103 Early Hints before its answer.
    Tether drops 1xx answers (an agent's HTTP client has no use for preload hints, and a 1xx must not
    reach an HTTP/1.0 client); the final answer arrives intact."""
    gw = await make_gateway(fidelity_rules(store_url, {"node": node.url}, {"hints": cap("node", "GET", "/hints")}))
    direct = await raw_direct(node.url, "/hints")
    assert direct.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    via = await raw_request(gw, "GET", "/hints", upstream="node")
    assert via.startswith(b"HTTP/1.1 200 OK\r\n") and b"103" not in via.split(b"\r\n")[0]
    assert b"preload" not in via and via.endswith(b'{"final":true}')


@pytest.mark.parametrize("via", [True, False])
async def test_via_header_is_added_upstream_unless_configured_off(make_gateway: MakeGateway, store_url: str,
                                                                  node: R.ServerProcess, via: bool) -> None:
    """Issue 21 item 14: RFC 9110 §7.6.3 — a forwarded request carries ``Via: 1.1 tether`` (after any
    Via the agent sent) unless the upstream's ``via: false``."""
    gw = await make_gateway(fidelity_rules(store_url, {"node": {"url": node.url, "via": via}},
                                           {"echo": cap("node", "GET", "/echo")}))
    async with gw.session.get(f"{gw.url}/node/echo", headers=gw.headers(Via="1.1 corp-proxy")) as r:
        raw = (await r.json())["headers"]
    vias = [raw[i + 1] for i in range(0, len(raw), 2) if raw[i].lower() == "via"]
    assert vias == (["1.1 corp-proxy", "1.1 tether"] if via else ["1.1 corp-proxy"])
