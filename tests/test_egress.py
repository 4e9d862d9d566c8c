"""How Tether reaches upstreams (proxy/transport/egress.py, the connect side of proxy/transport/upstream_http.py).

- the per-origin connection limit: requests past ``max_connections`` wait first come first served for a
  connection given back, at most ``timeouts.pool``, then 503 ``upstream_busy`` with nothing sent; a waiter
  that gives up or is cancelled leaks no slot; a failed connect frees its slot;
- happy eyeballs (RFC 8305): a gateway process whose upstream name resolves to a dead IPv6 address first
  and a live IPv4 one still connects within the connect timeout (a private /etc/hosts in a mount namespace);
- egress through a real forward proxy (tinyproxy from the system packages) with credentials: CONNECT for
  https and http upstreams, HTTPS_PROXY/HTTP_PROXY/NO_PROXY from the environment (never for loopback
  upstreams), a refused tunnel reported without the proxy's password anywhere;
- TLS to an upstream that requires a client certificate (Python's ssl server): the client certificate
  (with an encrypted key), a CA bundle of the upstream's own, SNI/verified name and Host overrides; and
  the configuration errors naming the key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import ConfigError, parse_rules
from proxy.policy.identity import mint_token
from proxy.transport.egress import EgressError, build_egress, proxy_for
from proxy.transport.upstream_http import ConnectOptions, OriginPool, UpstreamError
from tests.conftest import MakeGateway, base_rules
from tests.procs import ROOT

PROXY_USER, PROXY_PASSWORD = "tether", "pr0xy-S3cret-Do-Not-Log"


# --------------------------------------------------------------------------- an upstream that counts connections


@dataclass
class CountingUpstream:
    """A keep-alive HTTP/1.1 server (raw asyncio) that answers each request once ``gate`` is open, and counts
    the TCP connections open at once."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    open: int = 0
    peak: int = 0
    accepted: int = 0
    paths: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> "CountingUpstream":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.gate.set()
        if self.server is not None:
            self.server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        self.peak = max(self.peak, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                               if k.strip().lower() == "content-length"), 0)
                if length:
                    await reader.readexactly(length)
                self.paths.append(lines[0].split(" ")[1])
                await self.gate.wait()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                             b'{"ok":true}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def counting() -> AsyncIterator[CountingUpstream]:
    up = await CountingUpstream().start()
    yield up
    await up.stop()


async def _get(pool: OriginPool, target: str) -> int:
    resp = await pool.request("GET", target, {}, None, connect_timeout=5, read_timeout=30)
    await resp.read(1 << 16)
    resp.release()
    return resp.status


# --------------------------------------------------------------------------- connection limit


async def test_connection_limit_queues_requests_and_the_upstream_never_sees_more(
        make_gateway: MakeGateway, counting: CountingUpstream, store_url: str) -> None:
    rules = base_rules(counting.url, store_url)
    rules["upstreams"]["crm"]["max_connections"] = 2
    rules["upstreams"]["crm"]["timeouts"] = {"pool": "60s"}
    gw = await make_gateway(rules)
    tasks = [asyncio.ensure_future(gw.request("GET", f"/slow?n={i}")) for i in range(8)]
    for _ in range(200):
        if len(counting.paths) >= 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the other six are queued in Tether, not at the upstream
    assert len(counting.paths) == 2 and counting.open == 2
    counting.gate.set()
    statuses = [r.status for r in await asyncio.gather(*tasks)]
    assert statuses == [200] * 8
    assert counting.peak == 2 and counting.accepted == 2  # two connections, reused for all eight
    assert sorted(counting.paths) == sorted(f"/slow?n={i}" for i in range(8))


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """nginx (the system's) answering every request at once; its access log holds each request's connection
    serial number, so the test counts the TCP connections Tether opened."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None:
        pytest.skip("nginx is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path / "nginx"
    d.mkdir()
    log = d / "access.log"
    conf = d / "nginx.conf"
    temps = "\n".join(f"    {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process off;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
{temps}
    log_format conn '$connection $request_uri';
    access_log {log} conn;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
    }}
}}
""")
    proc = subprocess.Popen([exe, "-p", str(d), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"nginx did not start: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
            time.sleep(0.05)
    yield port, log
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def test_nginx_sees_no_more_connections_than_the_limit(make_gateway: MakeGateway, nginx: tuple[int, Path],
                                                             store_url: str) -> None:
    port, log = nginx
    rules = base_rules(f"http://127.0.0.1:{port}", store_url)
    rules["upstreams"]["crm"]["max_connections"] = 3
    rules["upstreams"]["crm"]["timeouts"] = {"pool": "60s"}
    gw = await make_gateway(rules)
    rs = await asyncio.gather(*(gw.request("GET", f"/echo?i={i}") for i in range(60)))
    assert [r.status for r in rs] == [200] * 60
    for _ in range(100):  # nginx writes its log line after the answer
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= 60:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 60
    assert 1 <= len({ln.split()[0] for ln in lines}) <= 3


async def test_a_wait_past_the_pool_timeout_is_upstream_busy_and_nothing_is_sent(
        make_gateway: MakeGateway, counting: CountingUpstream, store_url: str) -> None:
    rules = base_rules(counting.url, store_url)
    rules["upstreams"]["crm"]["max_connections"] = 1
    rules["upstreams"]["crm"]["timeouts"] = {"pool": "0.3s"}
    gw = await make_gateway(rules)
    first = asyncio.ensure_future(gw.request("GET", "/slow?first"))
    for _ in range(200):
        if counting.paths:
            break
        await asyncio.sleep(0.02)
    r = await gw.request("PATCH", "/api/contacts/7", json={"name": "x"})
    body = await r.json()
    assert r.status == 503 and body["error"]["code"] == "upstream_busy", body
    assert body["error"]["details"] == {"applied": False}
    assert "all 1 connections to the upstream are busy" in body["error"]["message"]
    assert r.headers["Retry-After"] == "1"
    counting.gate.set()
    assert (await first).status == 200
    assert counting.paths == ["/slow?first"]  # the write never left
    outcome = [x for x in await gw.journal() if x["kind"] == "outcome" and x["method"] == "PATCH"]
    assert outcome and outcome[-1]["error"] == "upstream_busy"


async def test_waiters_are_served_first_come_first_served(counting: CountingUpstream) -> None:
    pool = OriginPool(counting.url, None, asyncio.get_running_loop(), ConnectOptions(max_connections=1))
    try:
        tasks = [asyncio.ensure_future(_get(pool, "/0"))]
        await asyncio.sleep(0.05)
        for i in range(1, 5):
            tasks.append(asyncio.ensure_future(_get(pool, f"/{i}")))
            await asyncio.sleep(0.01)
        assert len(pool.waiters) == 4
        counting.gate.set()
        assert await asyncio.gather(*tasks) == [200] * 5
        assert counting.paths == ["/0", "/1", "/2", "/3", "/4"] and counting.accepted == 1
    finally:
        pool.close()


async def test_a_cancelled_or_expired_waiter_leaks_no_slot(counting: CountingUpstream) -> None:
    loop = asyncio.get_running_loop()
    pool = OriginPool(counting.url, None, loop, ConnectOptions(max_connections=1, pool_timeout=0.2))
    try:
        a = asyncio.ensure_future(pool.request("GET", "/a", {}, None, connect_timeout=5, read_timeout=30))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamError) as ei:  # expires while /a holds the only connection
            await pool.request("GET", "/expired", {}, None, connect_timeout=5, read_timeout=30)
        assert (ei.value.kind, ei.value.applied) == ("pool_timeout", False)
        pool.pool_timeout = 30.0
        b = asyncio.ensure_future(_get(pool, "/b"))
        c = asyncio.ensure_future(_get(pool, "/c"))
        await asyncio.sleep(0.05)
        assert len(pool.waiters) == 2
        counting.gate.set()
        resp = await a
        await resp.read(100)
        resp.release()  # hands the connection to /b's waiter ...
        b.cancel()  # ... which is cancelled before it runs: the connection must pass on to /c
        assert await c == 200
        with pytest.raises(asyncio.CancelledError):
            await b
        assert counting.paths == ["/a", "/c"]
        assert pool.opening == 0 and len(pool.live) == 1 and not pool.waiters
        assert await _get(pool, "/d") == 200 and counting.accepted == 1
    finally:
        pool.close()


async def test_a_failed_connect_frees_its_slot() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    pool = OriginPool(f"http://127.0.0.1:{port}", None, asyncio.get_running_loop(),
                      ConnectOptions(max_connections=1, pool_timeout=30))
    results = await asyncio.gather(*(pool.request("GET", "/", {}, None, connect_timeout=5, read_timeout=5)
                                     for _ in range(3)), return_exceptions=True)
    assert [(type(r), getattr(r, "kind", None)) for r in results] == [(UpstreamError, "connect")] * 3
    assert pool.opening == 0 and not pool.live and not pool.waiters


# --------------------------------------------------------------------------- happy eyeballs


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount are not installed"
    r = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a mount namespace: {r.stderr.strip()[:200]}"
    return None


def _dead_ipv6_listener(port: int) -> tuple[socket.socket, list[socket.socket]] | None:
    """[::1]:port with a full accept queue: the kernel drops further SYNs, so a connect hangs."""
    try:
        lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        lsock.bind(("::1", port))
        lsock.listen(0)
    except OSError:
        return None
    fillers = []
    for _ in range(3):
        c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(("::1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    return lsock, fillers


@pytest.mark.slow
async def test_happy_eyeballs_a_dead_ipv6_address_does_not_eat_the_connect_timeout(
        upstream: Any, tmp_path: Path) -> None:
    why = _unshare_works()
    if why:
        pytest.skip(why)
    dead = _dead_ipv6_listener(upstream.port)
    if dead is None:
        pytest.skip("no IPv6 loopback here (or its port is taken)")
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 he-upstream.test\n127.0.0.1 he-upstream.test localhost\n")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind {hosts} /etc/hosts && exec "
                            f"{sys.executable} -c \"import socket; print(socket.getaddrinfo('he-upstream.test', 1, "
                            "type=socket.SOCK_STREAM)[0][4][0])\""], capture_output=True, text=True)
    if probe.stdout.strip() != "::1":
        pytest.skip(f"the resolver does not put the IPv6 address first here ({probe.stdout.strip() or probe.stderr})")
    rules = base_rules(f"http://he-upstream.test:{upstream.port}", str(tmp_path / "t.db"))
    rules["upstreams"]["crm"]["timeouts"] = {"connect": "4s", "read": "10s"}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    proc = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", f"mount --bind {hosts} /etc/hosts && exec {sys.executable} -m proxy serve "
         f"--config {tmp_path / 'rules.yaml'}"], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        banner: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not banner:
            line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
            if not line:
                break
            if line.startswith("{") and '"ready"' in line:
                banner = orjson.loads(line)
        assert banner, proc.stderr.read() if proc.poll() is not None else "no banner"
        token = mint_token(parse_rules(rules).identity, "bot")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{banner['listeners']['main']}/crm/echo",
                             headers={"Authorization": f"Bearer {token}"}) as r:
                body = await r.json()
                # without happy eyeballs the connect to [::1] hangs until the 4 s connect timeout: 502
                assert r.status == 200 and body["raw_path"] == "/echo", body
        assert upstream.seen("GET", "/echo")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        dead[0].close()
        for c in dead[1]:
            c.close()


# --------------------------------------------------------------------------- certificates for the TLS tests


@dataclass
class PKI:
    server_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path  # encrypted with CLIENT_KEY_PASSWORD
    plain_client_key: Path


CLIENT_KEY_PASSWORD = "k3y-pass"
SERVER_NAME = "api.upstream.test"


def _issue(cn: str, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False, sans: tuple[str, ...] = (),
           client: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, issuer_key = issuer or (name, key)
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                   else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any, password: str | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    sca_key, cca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    sca = _issue("Upstream Test CA", sca_key, None, ca=True)
    cca = _issue("Tether Clients CA", cca_key, None, ca=True)
    srv = _issue(SERVER_NAME, srv_key, (sca.subject, sca_key), sans=(SERVER_NAME,))
    cli = _issue("tether-client", cli_key, (cca.subject, cca_key), client=True)
    files = {"server_ca": _pem(sca), "server_cert": _pem(srv), "server_key": _key_pem(srv_key),
             "client_ca": _pem(cca), "client_cert": _pem(cli), "client_key": _key_pem(cli_key, CLIENT_KEY_PASSWORD),
             "plain_client_key": _key_pem(cli_key)}
    paths = {}
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
        paths[name] = d / f"{name}.pem"
    return PKI(**paths)


@dataclass
class TLSUpstream:
    port: int
    sni: list[str | None]
    seen: list[dict[str, Any]]


@pytest.fixture
async def mtls_upstream(pki: PKI) -> AsyncIterator[TLSUpstream]:
    """An https server that requires a client certificate from the clients' CA; echoes what it saw."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(pki.client_ca))
    sni: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: sni.append(name)  # type: ignore[assignment,misc]
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        cn = next((v for rdn in (peer or {}).get("subject", ()) for k, v in rdn if k == "commonName"), None)
        doc = {"client_cn": cn, "host": request.headers.get("Host"), "path": request.path,
               "auth": request.headers.get("Authorization")}
        seen.append(doc)
        return web.json_response(doc)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield TLSUpstream(port, sni, seen)
    await runner.cleanup()


def _tls_rules(pki: PKI, port: int, store_url: str, **up: Any) -> dict[str, Any]:
    rules = base_rules(f"https://127.0.0.1:{port}", store_url)
    rules["upstreams"]["crm"].update(up)
    return rules


# --------------------------------------------------------------------------- TLS options


async def test_mutual_tls_with_ca_bundle_sni_and_host_override(make_gateway: MakeGateway, pki: PKI,
                                                               mtls_upstream: TLSUpstream, store_url: str) -> None:
    gw = await make_gateway(_tls_rules(
        pki, mtls_upstream.port, store_url, ca_file=str(pki.server_ca), server_name=SERVER_NAME,
        host_header=f"{SERVER_NAME}:8443",
        client_cert={"cert": str(pki.client_cert), "key": str(pki.client_key),
                     "password": {"value": CLIENT_KEY_PASSWORD}}))
    r = await gw.request("GET", "/echo")
    doc = await r.json()
    assert r.status == 200, doc
    assert doc["client_cn"] == "tether-client"  # the upstream verified Tether's certificate
    assert doc["host"] == f"{SERVER_NAME}:8443"
    # the credential went out (the echo holds it) and was masked on its way back (issue 20 item 12)
    assert doc["auth"] == "*" * len("Bearer UPSTREAM-SECRET-TOKEN")
    assert mtls_upstream.sni == [SERVER_NAME]
    r = await gw.request("GET", "/echo")  # the pooled connection is reused: no second handshake
    assert r.status == 200 and mtls_upstream.sni == [SERVER_NAME]


@pytest.mark.parametrize("leave_out, expect", [
    ("client_cert", None),  # the upstream refuses the handshake
    ("server_name", "certificate is not valid for '127.0.0.1'"),  # it names api.upstream.test
    ("ca_file", "unable to get local issuer certificate"),  # the upstream's CA is not a system CA
])
async def test_each_tls_option_is_needed(make_gateway: MakeGateway, pki: PKI, mtls_upstream: TLSUpstream,
                                         store_url: str, leave_out: str, expect: str | None) -> None:
    up: dict[str, Any] = {"ca_file": str(pki.server_ca), "server_name": SERVER_NAME,
                          "client_cert": {"cert": str(pki.client_cert), "key": str(pki.plain_client_key)}}
    del up[leave_out]
    gw = await make_gateway(_tls_rules(pki, mtls_upstream.port, store_url, **up))
    r = await gw.request("GET", "/echo")
    body = await r.json()
    assert r.status == 502 and body["error"]["code"] == "upstream_unavailable", body
    if expect:
        assert expect in body["error"]["message"], body
    assert mtls_upstream.seen == []


@pytest.mark.parametrize("up, path, reason", [
    ({"client_cert": {"cert": "/nonexistent/c.pem"}}, "upstreams.crm.client_cert", "cannot load the client cert"),
    ({"client_cert": {"cert": "CERT", "key": "KEY", "password": "wrong"}}, "upstreams.crm.client_cert",
     "cannot load the client certificate"),
    ({"client_cert": {"cert": "CERT", "key": "KEY"}}, "upstreams.crm.client_cert.password",
     "the client certificate's key is encrypted: give its password"),
    ({"ca_file": "/nonexistent/ca.pem"}, "upstreams.crm.ca_file", "cannot load the CA bundle"),
    ({"ca_file": "KEY"}, "upstreams.crm.ca_file", "cannot load the CA bundle"),
    ({"client_cert": {"cert": "CERT", "key": "KEY", "password_env": "TETHER_TEST_UNSET_PW"}},
     "upstreams.crm.client_cert.password", "TETHER_TEST_UNSET_PW is not set"),
])
def test_unusable_tls_files_are_config_errors(pki: PKI, up: dict[str, Any], path: str, reason: str) -> None:
    def fill(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return {"CERT": str(pki.client_cert), "KEY": str(pki.client_key)}.get(v, v) if isinstance(v, str) else v
    rules = parse_rules(_tls_rules(pki, 1, "x.db", **fill(up)))
    with pytest.raises(EgressError) as ei:
        build_egress("crm", rules.upstreams["crm"])
    assert ei.value.path == path and reason in str(ei.value), (ei.value.path, str(ei.value))
    from proxy.core.rules import build_state
    with pytest.raises(ConfigError) as ce:
        build_state(rules, lambda: None, "rules.yaml")
    assert f"rules.yaml: {path}: " in str(ce.value)
    assert CLIENT_KEY_PASSWORD not in str(ce.value)


@pytest.mark.parametrize("up, path, reason", [
    ({"url": "http://127.0.0.1:1", "client_cert": {"cert": "/c.pem"}}, "upstreams.crm",
     "client_cert apply to https:// upstreams only"),
    ({"server_name": "https://api.example.com"}, "upstreams.crm.server_name", "must be a DNS name"),
    ({"host_header": "api.example.com\r\nX-Evil: 1"}, "upstreams.crm.host_header", "must be host or host:port"),
    ({"max_connections": 0}, "upstreams.crm.max_connections", "greater than or equal to 1"),
    ({"timeouts": {"pool": "soon"}}, "upstreams.crm.timeouts.pool", "is not a duration"),
    ({"proxy": "https://proxy.corp:3128"}, "upstreams.crm.proxy.url", "https:// proxies are not supported"),
    ({"proxy": "socks5://proxy.corp:1080"}, "upstreams.crm.proxy.url", "must be http://host[:port]"),
    ({"proxy": {"url": "http://proxy.corp:3128", "pasword": "x"}}, "upstreams.crm.proxy.pasword", "unknown key"),
    ({"proxy": {"url": "http://u:p@proxy.corp:3128", "username": "v"}}, "upstreams.crm.proxy",
     "in the URL or as username/password"),
    ({"client_cert": {"cert": "/c.pem", "passwd": "x"}}, "upstreams.crm.client_cert.passwd", "unknown key"),
])
def test_new_upstream_keys_are_validated(up: dict[str, Any], path: str, reason: str) -> None:
    rules = base_rules("https://127.0.0.1:1", "x.db")
    rules["upstreams"]["crm"].update(up)
    with pytest.raises(ConfigError) as ei:
        parse_rules(rules, "rules.yaml")
    lines = [ln for ln in str(ei.value).splitlines() if f"rules.yaml: {path}: " in ln]
    assert lines and reason in lines[0], str(ei.value)


def test_a_password_in_the_proxy_url_becomes_a_secret() -> None:
    rules = base_rules("https://api.example.com", "x.db")
    rules["upstreams"]["crm"]["proxy"] = f"http://{PROXY_USER}:{PROXY_PASSWORD}@proxy.corp:3128"
    cfg = parse_rules(rules).upstreams["crm"]
    assert cfg.proxy.url == "http://proxy.corp:3128" and cfg.proxy.username == PROXY_USER  # type: ignore[union-attr]
    assert PROXY_PASSWORD not in repr(cfg) and PROXY_PASSWORD not in cfg.model_dump_json()
    tunnel, key = proxy_for("upstreams.crm", cfg)
    assert tunnel is not None and PROXY_PASSWORD not in repr(tunnel) and PROXY_PASSWORD not in repr(key)


# --------------------------------------------------------------------------- a real forward proxy


@dataclass
class Tinyproxy:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        """The CONNECT targets the proxy was asked for, in order."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [ln.split("CONNECT ", 2)[-1].split(" ")[0] for ln in text.splitlines() if "Request (file descriptor" in ln
                and ": CONNECT " in ln]


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    exe = shutil.which("tinyproxy")
    if exe is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy; .ci/run does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    # no ConnectPort line: CONNECT is allowed to any port (the test upstreams are on ephemeral ports)
    conf.write_text(f'Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nLogFile "{log}"\n'
                    f'LogLevel Connect\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\nAllow 127.0.0.1\n'
                    f'Allow 0.0.0.0/0\n')
    proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"tinyproxy did not start: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
            time.sleep(0.05)
    yield Tinyproxy(port, log)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _proxy(tp: Tinyproxy, password: str = PROXY_PASSWORD) -> dict[str, Any]:
    return {"url": tp.url, "username": PROXY_USER, "password": {"value": password}}


async def test_https_upstream_through_the_proxy_with_credentials(
        make_gateway: MakeGateway, pki: PKI, mtls_upstream: TLSUpstream, tinyproxy: Tinyproxy,
        store_url: str) -> None:
    gw = await make_gateway(_tls_rules(
        pki, mtls_upstream.port, store_url, ca_file=str(pki.server_ca), server_name=SERVER_NAME,
        client_cert={"cert": str(pki.client_cert), "key": str(pki.plain_client_key)}, proxy=_proxy(tinyproxy)))
    for _ in range(2):
        r = await gw.request("GET", "/echo")
        doc = await r.json()
        assert r.status == 200 and doc["client_cn"] == "tether-client", doc  # mTLS inside the tunnel
    assert tinyproxy.connects() == [f"127.0.0.1:{mtls_upstream.port}"]  # one tunnel, kept alive
    assert mtls_upstream.sni == [SERVER_NAME]


async def test_http_upstream_is_tunnelled_too(make_gateway: MakeGateway, upstream: Any, tinyproxy: Tinyproxy,
                                              store_url: str) -> None:
    rules = base_rules(upstream.url, store_url)
    rules["upstreams"]["crm"]["proxy"] = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{tinyproxy.port}"
    gw = await make_gateway(rules)
    r = await gw.request("GET", "/echo")
    doc = await r.json()
    assert r.status == 200
    assert doc["raw_path"] == "/echo"  # origin-form request line inside the tunnel
    assert "Proxy-Authorization" not in doc["headers"]  # the proxy's credentials stay at the proxy
    assert tinyproxy.connects() == [f"127.0.0.1:{upstream.port}"]


async def test_a_refused_tunnel_is_reported_without_the_proxy_password(
        make_gateway: MakeGateway, upstream: Any, tinyproxy: Tinyproxy, store_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = "Wr0ng-" + PROXY_PASSWORD
    rules = base_rules(upstream.url, store_url)
    rules["upstreams"]["crm"]["proxy"] = _proxy(tinyproxy, wrong)
    gw = await make_gateway(rules)
    with caplog.at_level(logging.DEBUG):
        r = await gw.request("PATCH", "/api/contacts/1", json={"name": "x"})
        text = await r.text()
    body = orjson.loads(text)
    assert r.status == 502 and body["error"]["code"] == "upstream_unavailable"
    assert body["error"]["details"] == {"applied": False}
    msg = body["error"]["message"]
    # (tinyproxy answers a CONNECT with bad credentials 401, not 407)
    assert f"the proxy {tinyproxy.url} refused the tunnel to 127.0.0.1:{upstream.port}: 401 " in msg, msg
    journal = orjson.dumps(await gw.journal()).decode()
    for secret in (wrong, PROXY_PASSWORD):
        assert secret not in text and secret not in caplog.text and secret not in journal
    assert upstream.received == []


def _outward_ipv4() -> str | None:
    """This machine's address on its default route (not loopback), without sending anything."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(ip).is_loopback or ip == "0.0.0.0" else ip


async def test_proxy_from_the_environment_with_no_proxy(make_gateway: MakeGateway, upstream: Any,
                                                        tinyproxy: Tinyproxy, store_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ip = _outward_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address (the environment's proxy is never used for loopback)")

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"at": request.path})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, ip, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                    "no_proxy", "REQUEST_METHOD"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{tinyproxy.port}")
        monkeypatch.setenv("NO_PROXY", "internal.example, .corp.example")
        gw = await make_gateway(base_rules(f"http://{ip}:{port}", store_url))
        r = await gw.request("GET", "/echo")
        assert r.status == 200 and (await r.json()) == {"at": "/echo"}
        assert tinyproxy.connects() == [f"{ip}:{port}"]
        # NO_PROXY naming the upstream: direct
        monkeypatch.setenv("NO_PROXY", f"internal.example,{ip}")
        gw2 = await make_gateway(base_rules(f"http://{ip}:{port}", store_url))
        r = await gw2.request("GET", "/echo")
        assert r.status == 200 and len(tinyproxy.connects()) == 1
        # a loopback upstream never takes the environment's proxy; proxy: direct ignores it altogether
        monkeypatch.setenv("NO_PROXY", "")
        gw3 = await make_gateway(base_rules(upstream.url, store_url))
        assert (await gw3.request("GET", "/echo")).status == 200
        rules = base_rules(f"http://{ip}:{port}", store_url)
        rules["upstreams"]["crm"]["proxy"] = "direct"
        gw4 = await make_gateway(rules)
        assert (await gw4.request("GET", "/echo")).status == 200
        assert len(tinyproxy.connects()) == 1
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("env, url, expect", [
    ({"HTTPS_PROXY": "http://p.corp:3128"}, "https://api.example.com", "http://p.corp:3128"),
    ({"HTTPS_PROXY": "p.corp:3128"}, "https://api.example.com", "http://p.corp:3128"),  # no scheme, as curl
    ({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}, "https://api.example.com", "http://lower:1"),
    ({"HTTP_PROXY": "http://p.corp:3128"}, "https://api.example.com", None),  # the scheme's own variable only
    ({"HTTP_PROXY": "http://p.corp:3128"}, "http://api.example.com", "http://p.corp:3128"),
    ({"ALL_PROXY": "http://all.corp:8080"}, "https://api.example.com", "http://all.corp:8080"),
    ({"HTTPS_PROXY": "http://p.corp:3128", "NO_PROXY": ".example.com"}, "https://api.example.com", None),
    ({"HTTPS_PROXY": "http://p.corp:3128", "NO_PROXY": "example.com"}, "https://api.example.com", None),
    ({"HTTPS_PROXY": "http://p.corp:3128", "NO_PROXY": "other.com"}, "https://api.example.com", "http://p.corp:3128"),
    ({"HTTPS_PROXY": "http://p.corp:3128", "NO_PROXY": "*"}, "https://api.example.com", None),
    ({"HTTPS_PROXY": "http://p.corp:3128"}, "https://127.0.0.1:8443", None),  # loopback: never
    ({"HTTPS_PROXY": "http://p.corp:3128"}, "https://localhost:8443", None),
    ({"HTTPS_PROXY": "http://p.corp:3128"}, "https://[::1]:8443", None),
    ({"HTTPS_PROXY": "http://[fd00::5]:3128"}, "https://api.example.com", "http://[fd00::5]:3128"),
])
def test_environment_proxy_resolution(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str,
                                      expect: str | None) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rules = base_rules(url, "x.db")
    tunnel, _ = proxy_for("upstreams.crm", parse_rules(rules).upstreams["crm"])
    assert (tunnel.display if tunnel else None) == expect


def test_an_unusable_environment_proxy_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "https://user:hunter2@p.corp:3128")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    cfg = parse_rules(base_rules("https://api.example.com", "x.db")).upstreams["crm"]
    with pytest.raises(EgressError) as ei:
        build_egress("crm", cfg)
    assert ei.value.path == "upstreams.crm.proxy" and "https:// proxies are not supported" in str(ei.value)
    assert "hunter2" not in str(ei.value)
    cfg = cfg.model_copy(update={"proxy": "direct"})
    assert build_egress("crm", cfg).options.proxy is None  # proxy: direct ignores the environment


def test_the_pool_key_follows_every_connection_setting(pki: PKI) -> None:
    """A reload that changes any connection setting gets a fresh pool; an unchanged upstream keeps its own."""
    base = {"ca_file": str(pki.server_ca), "client_cert": {"cert": str(pki.client_cert),
                                                           "key": str(pki.plain_client_key)}}

    def key(**up: Any) -> Any:
        return build_egress("crm", parse_rules(_tls_rules(pki, 1, "x.db", **{**base, **up})).upstreams["crm"]).key

    k = key()
    assert key() == k
    for change in ({"server_name": "a.example"}, {"host_header": "h.example"}, {"max_connections": 5},
                   {"timeouts": {"pool": 3}}, {"proxy": "http://p.corp:1"}, {"verify_tls": False}):
        assert key(**change) != k, change
    os.utime(pki.client_cert, ns=(time.time_ns(), time.time_ns() + 10**9))  # a renewed certificate file
    assert key() != k
