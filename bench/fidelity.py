#!/usr/bin/env python3
"""Forwarding fidelity, compared (issue 21): each case against real servers nobody here wrote — nginx,
Node's http module, gunicorn, uvicorn (h11, httptools), hypercorn — called directly, through the bare
aiohttp forwarder (bench/bare_forwarder.py) and through Tether. Prints the comparison table (markdown)
that bench/README.md ("Fidelity") shows.

    python bench/fidelity.py                               # the table, for this checkout's Tether
    python bench/fidelity.py --tether DIR=before --tether .  # a column per Tether (e.g. an older commit in DIR)

Not timed, not a benchmark: every case is one or a few requests. The servers' programs come from the
system (nginx, node) and the test extras (gunicorn, uvicorn, hypercorn); a missing one is reported.
tests/test_transport_fidelity.py asserts Tether's column.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from proxy.cli.certs import make_dev_cert  # noqa: E402
from proxy.config import parse_rules  # noqa: E402
from proxy.policy.identity import mint_token  # noqa: E402
from tests import realservers as R  # noqa: E402

SECRET = "fidelity-secret-0123456789abcdef-0123456789abcdef"


@dataclass
class Seen:
    """What the agent saw, and whether that is the server's answer, faithfully."""

    text: str
    ok: bool | None  # None: the reference (what the server itself does)


class Env:
    """The servers, a bare forwarder in front of each, one Tether in front of all."""

    def __init__(self, work: Path, tethers: list[Path]) -> None:
        self.work = work
        self.tether_roots = tethers
        self.servers: dict[str, R.ServerProcess] = {}
        self.bare: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tethers: dict[str, str] = {}  # "tether0", "tether1", ... -> main listener URL
        self.token = ""
        self.cert: Path | None = None
        self.missing: list[str] = []

    def start(self) -> None:
        self.cert, key = make_dev_cert(self.work / "certs", ["127.0.0.1", "localhost"])
        starters: dict[str, Callable[[], R.ServerProcess]] = {
            "nginx": lambda: R.start_nginx(self.work),
            "node": lambda: R.start_node(self.work / "node"),
            "node-tls": lambda: R.start_node(self.work / "node-tls", tls=(self.cert, key)),  # type: ignore[arg-type]
            "node-ka": lambda: R.start_node(self.work / "node-ka", keepalive_ms=2000),
            "gunicorn": lambda: R.start_gunicorn(self.work / "gunicorn"),
            "uvicorn-h11": lambda: R.start_uvicorn(self.work / "uvicorn-h11", "h11"),
            "uvicorn-httptools": lambda: R.start_uvicorn(self.work / "uvicorn-httptools", "httptools"),
            "hypercorn": lambda: R.start_hypercorn(self.work / "hypercorn"),
        }
        for name, start in starters.items():
            try:
                self.servers[name] = start()
            except R.Unavailable as exc:
                self.missing.append(f"{name}: {exc}")
        env = {**os.environ, "SSL_CERT_FILE": str(self.cert)}  # the bare forwarder trusts the dev cert
        for name, srv in self.servers.items():
            port = R.free_port()
            self._spawn([sys.executable, str(BENCH / "bare_forwarder.py"), "--port", str(port), "--upstream", srv.url],
                        env, ROOT)
            self.bare[name] = f"http://127.0.0.1:{port}"
        for n, root in enumerate(self.tether_roots):
            self._start_tether(f"tether{n}", root)
        for url in self.bare.values():
            _wait_port(int(url.rsplit(":", 1)[1]))

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                                stderr=open(self.work / f"proc-{len(self.procs)}.log", "wb"), start_new_session=True)
        self.procs.append(proc)
        return proc

    def _start_tether(self, kind: str, root: Path) -> None:
        ups: dict[str, Any] = {}
        caps: dict[str, Any] = {}
        for name, srv in self.servers.items():
            key = name.replace("-", "_")
            ups[key] = {"url": srv.url}
            if srv.tls:
                ups[key]["ca_file"] = str(self.cert)
            for m in ("GET", "HEAD", "POST", "DELETE"):
                caps[f"{key}.{m.lower()}"] = {"upstream": key, "method": m, "path": "/{tail}",
                                              "params": {"tail": "[A-Za-z0-9._-]+"},
                                              "compensation": "non_compensable"}
                caps[f"{key}.{m.lower()}2"] = {"upstream": key, "method": m, "path": "/{a}/{b}",
                                               "params": {"a": "[A-Za-z0-9._-]+", "b": "[A-Za-z0-9._-]+"},
                                               "compensation": "non_compensable"}
            caps[f"{key}.put"] = {"upstream": key, "method": "PUT", "path": "/flaky", "compensation": "non_compensable"}
            caps[f"{key}.upload"] = {"upstream": key, "method": "PUT", "path": "/upload", "stream_request": True,
                                     "compensation": "non_compensable"}
        grants = [c if c.split(".")[1].startswith(("get", "head")) else {"capability": c, "mode": "live"}
                  for c in caps]
        rules = {"version": 1,
                 "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                            "store": str(self.work / f"{kind}.db")},
                 "identity": {"hs_secret": {"value": SECRET}}, "upstreams": ups,
                 # the cases provoke upstream errors on purpose: no quarantine may turn writes into dry-runs
                 "governance": {"error_budget": {"max_bad_ratio": 1.0, "min_requests": 1000000}},
                 "agents": {"bot": {"grants": grants}}, "capabilities": caps}
        path = self.work / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        self.token = mint_token(parse_rules(rules).identity, "bot")
        env = {**os.environ, "PYTHONPATH": str(root)}
        proc = self._spawn([sys.executable, "-m", "proxy", "serve", "--config", str(path)], env, root)
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"tether at {root} exited; see {self.work}")
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "ready":
                self.tethers[kind] = doc["listeners"]["main"]
                return
        raise RuntimeError("tether not ready")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for srv in self.servers.values():
            srv.stop()

    # -- one request, the agent's way

    def url(self, kind: str, server: str, path: str) -> str:
        if kind == "direct":
            return self.servers[server].url + path
        if kind == "bare":
            return self.bare[server] + path
        return f"{self.tethers[kind]}/{server.replace('-', '_')}{path}"

    def headers(self, kind: str, **extra: str) -> dict[str, str]:
        h = dict(extra)
        if kind.startswith("tether"):
            h.update({"Authorization": f"Bearer {self.token}", "X-Tether-Intent": "fidelity comparison"})
        return h

    async def raw(self, kind: str, server: str, method: str, path: str) -> bytes:
        """Every byte of one answer, over a raw socket (Connection: close)."""
        url = self.url(kind, server, path)
        scheme, rest = url.split("://")
        hostport, _, target = rest.partition("/")
        host, port = hostport.split(":")
        ctx = None
        if scheme == "https":
            ctx = ssl.create_default_context(cafile=str(self.cert))
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        hdrs = "".join(f"{k}: {v}\r\n" for k, v in self.headers(kind).items())
        writer.write(f"{method} /{target} HTTP/1.1\r\nHost: {hostport}\r\n{hdrs}Connection: close\r\n\r\n".encode())
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except (ConnectionError, ssl.SSLError):
            return b"<reset>"
        finally:
            writer.close()


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def fields(raw: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        out[k.strip().lower()] = v.strip()
    return out


def status_line(raw: bytes) -> str:
    return raw.split(b"\r\n", 1)[0].decode("latin-1")


def release(url: str) -> None:
    urllib.request.urlopen(url, timeout=5).read()


# --------------------------------------------------------------------------- the cases


Probe = Callable[[Env, str, aiohttp.ClientSession], Awaitable[Seen]]
CASES: list[tuple[str, str, str, Probe]] = []  # (item, case, server, probe)


def case(item: str, text: str, server: str) -> Callable[[Probe], Probe]:
    def register(fn: Probe) -> Probe:
        CASES.append((item, text, server, fn))
        return fn
    return register


PAD = 6 * 1024 * 1024


@case("1", "POST answered with 6 MiB of JSON", "gunicorn")
async def big_write(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    async with s.post(env.url(kind, "gunicorn", f"/api/items?pad={PAD}"), json={"name": "big"},
                      headers=env.headers(kind)) as r:
        body = await r.read()
    ok = r.status == 201 and len(body) > PAD
    return Seen(f"{r.status}, {len(body):,} bytes", None if kind == "direct" else ok)


@case("1", "POST whose answer is cut after 1,000 of its 100,000 bytes (the write was applied)", "node")
async def cut_write(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    try:
        async with s.post(env.url(kind, "node", "/write-cut"), json={}, headers=env.headers(kind)) as r:
            try:
                body = await r.read()
            except aiohttp.ClientPayloadError:
                return Seen(f"{r.status}, then the body breaks off", None)
            code = ""
            if r.content_type == "application/json":
                code = json.loads(body).get("error", {}).get("code", "")
            applied = r.headers.get("X-Tether-Upstream-Status")
    except aiohttp.ClientError as exc:
        return Seen(type(exc).__name__, None if kind == "direct" else False)
    text = f"{r.status} {code}".strip() + (f", X-Tether-Upstream-Status: {applied}" if applied else "")
    return Seen(text, None if kind == "direct" else code == "upstream_applied_response_lost")


async def first_part_early(s: aiohttp.ClientSession, url: str, headers: dict[str, str], release_url: str,
                           first: Callable[[aiohttp.ClientResponse], Awaitable[bytes]]) -> tuple[int, bool, bytes]:
    """POST, then let the server send the rest only 2 s later: did the first part reach the agent before
    that? Returns (status, early, everything after the first part)."""
    got_first: list[float] = []

    async def go() -> tuple[int, bytes]:
        async with s.post(url, json={"prompt": "hi"}, headers=headers) as r:
            await first(r)
            got_first.append(time.monotonic())
            return r.status, await r.read()

    task = asyncio.ensure_future(go())
    try:
        await asyncio.sleep(2)
        released = time.monotonic()
        await asyncio.to_thread(release, release_url)
        status, rest = await asyncio.wait_for(task, 15)
    finally:
        await asyncio.to_thread(release, release_url)
        task.cancel()
    return status, bool(got_first) and got_first[0] < released, rest


def sse_case(server: str) -> Probe:
    async def probe(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
        key = f"{kind}-{time.monotonic_ns()}"
        status, early, rest = await first_part_early(
            s, env.url(kind, server, f"/v1/completions?key={key}"), env.headers(kind),
            f"{env.servers[server].url}/release?key={key}", lambda r: r.content.readuntil(b"\n\n"))
        whole = rest.endswith(b"data: [DONE]\n\n")
        text = (f"{status}, " + ("first event at once" if early else "nothing until the stream ended")
                + ("" if whole else ", incomplete"))
        return Seen(text, None if kind == "direct" else early and whole)
    return probe


for _srv in ("uvicorn-h11", "uvicorn-httptools", "hypercorn"):
    case("2", "POST answered with text/event-stream (an LLM completion)", _srv)(sse_case(_srv))


@case("2", "POST answered by a chunked generator (an export)", "gunicorn")
async def export(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    status, early, rest = await first_part_early(s, env.url(kind, "gunicorn", "/export"), env.headers(kind),
                                                 f"{env.servers['gunicorn'].url}/release",
                                                 lambda r: r.content.readline())
    return Seen(f"{status}, " + ("first row at once" if early else "nothing until the end"),
                None if kind == "direct" else early)


def head_case(name: str) -> Probe:
    async def probe(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
        ref = fields(await env.raw("direct", "nginx", "HEAD", f"/files/{name}"))
        got = fields(await env.raw(kind, "nginx", "HEAD", f"/files/{name}"))
        same = [h for h in (b"content-length", b"etag", b"last-modified", b"accept-ranges", b"content-type")
                if got.get(h) == ref.get(h)]
        cl = got.get(b"content-length", b"none").decode()
        return Seen(f"Content-Length: {cl}" + ("" if len(same) == 5 else f" ({5 - len(same)} entity headers differ)"),
                    None if kind == "direct" else len(same) == 5)
    return probe


case("3", "HEAD of a 300-byte file", "nginx")(head_case("small.txt"))
case("3", "HEAD of a 3 MiB file", "nginx")(head_case("large.bin"))


def cut_case(server: str) -> Probe:
    async def probe(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
        ctx = ssl.create_default_context(cafile=str(env.cert)) if kind == "direct" and server == "node-tls" else None
        try:
            async with s.get(env.url(kind, server, "/reset-close"), headers=env.headers(kind), ssl=ctx) as r:
                body = await r.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            return Seen(f"error ({type(exc).__name__})", None if kind == "direct" else True)
        return Seen(f"{r.status}, {len(body)} bytes, ended as if complete", None if kind == "direct" else False)
    return probe


case("5", "close-delimited body ended by a TCP reset", "node")(cut_case("node"))
case("5", "close-delimited body ended by a TLS close without close_notify", "node-tls")(cut_case("node-tls"))


def latin1_case(server: str, path: str) -> Probe:
    async def probe(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
        got = fields(await env.raw(kind, server, "GET", path)).get(b"content-disposition", b"")
        fname = got.partition(b"filename=")[2]
        return Seen(f"filename={fname!r}"[:60], None if kind == "direct" else fname == b'"caf\xe9.txt"')
    return probe


case("6", "latin-1 filename in Content-Disposition", "gunicorn")(latin1_case("gunicorn", "/latin1"))
case("6", "latin-1 filename in Content-Disposition", "nginx")(latin1_case("nginx", "/files/latin1.txt"))


def te_case(codings: str) -> Probe:
    async def probe(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
        raw = await env.raw(kind, "node", "GET", f"/te?codings={codings.replace(', ', '%2C%20')}")
        te = fields(raw).get(b"transfer-encoding")
        st = status_line(raw)
        body = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
        if kind == "direct":
            return Seen(f"{st[9:]}, Transfer-Encoding: {te.decode() if te else '-'}, body to the close", None)
        if st.startswith("HTTP/1.1 502"):
            return Seen("502, refused: names the coding", True)
        return Seen(f"{st[9:]}, {len(body)} coded bytes as the content, Transfer-Encoding: "
                    f"{te.decode() if te else 'dropped'}", False)
    return probe


case("7", "Transfer-Encoding: gzip, body to the close", "node")(te_case("gzip"))
case("7", "Transfer-Encoding: chunked, gzip (chunked not last)", "node")(te_case("chunked, gzip"))


def flaky_case(method: str, key: bool) -> Probe:
    async def probe(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
        async with s.get(env.url(kind, "node", "/flaky"), headers=env.headers(kind)) as r:  # warm a connection
            await r.read()
        extra = {"Idempotency-Key": f"k-{time.monotonic_ns()}"} if key else {}
        try:
            async with s.request(method, env.url(kind, "node", "/flaky"), headers=env.headers(kind, **extra)) as r:
                await r.read()
            text = f"{r.status}" + (" (sent again on a new connection)" if r.status == 200 else "")
            answered = r.status == 200
        except aiohttp.ClientError as exc:
            text, answered = f"error ({type(exc).__name__})", False
        want = method != "POST" or key
        return Seen(text, None if kind == "direct" else answered == want)
    return probe


case("8", "PUT on a reused connection the server drops unanswered", "node")(flaky_case("PUT", False))
case("8", "POST with Idempotency-Key, same", "node")(flaky_case("POST", True))
case("8", "POST without Idempotency-Key, same (must not be retried)", "node")(flaky_case("POST", False))


@case("8", "Keep-Alive: timeout=2; a request after 1.3 s idle", "node-ka")
async def keepalive(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    base = env.servers["node-ka"].url

    def conns() -> int:
        with urllib.request.urlopen(base + "/stats", timeout=5) as r:
            return int(json.loads(r.read())["connections"])

    async with s.get(env.url(kind, "node-ka", "/echo"), headers=env.headers(kind)) as r:
        await r.read()
    c0 = await asyncio.to_thread(conns)
    await asyncio.sleep(1.3)
    async with s.get(env.url(kind, "node-ka", "/echo"), headers=env.headers(kind)) as r:
        await r.read()
    fresh = await asyncio.to_thread(conns) - c0 - 1 > 0
    return Seen("new connection" if fresh else "reused the connection the server is about to close",
                None if kind == "direct" else fresh)


@case("12", "PUT of 1 MiB with Content-Length to an object store that refuses chunked (411)", "nginx")
async def upload(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    payload = b"u" * (1 << 20)
    path = "/upload"
    async with s.put(env.url(kind, "nginx", path), data=payload, headers=env.headers(kind)) as r:
        body = await r.read()
    return Seen(f"{r.status} {body[:40]!r}", None if kind == "direct" else r.status == 200)


@case("14", "103 Early Hints before the answer", "node")
async def hints(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    raw = await env.raw(kind, "node", "GET", "/hints")
    lines = [ln.decode()[9:12] for ln in raw.split(b"\r\n") if ln.startswith(b"HTTP/1.1 ")]
    intact = raw.endswith(b'{"final":true}')
    return Seen(" then ".join(lines) + ("" if intact else ", final answer damaged"),
                None if kind == "direct" else intact)


@case("14", "Via on the forwarded request (RFC 9110 §7.6.3)", "node")
async def via(env: Env, kind: str, s: aiohttp.ClientSession) -> Seen:
    async with s.get(env.url(kind, "node", "/echo"), headers=env.headers(kind)) as r:
        raw = (await r.json())["headers"]
    vias = [raw[i + 1] for i in range(0, len(raw), 2) if raw[i].lower() == "via"]
    return Seen(", ".join(vias) or "none", None if kind == "direct" else bool(vias))


# --------------------------------------------------------------------------- the table


async def run(env: Env, only: str | None = None) -> list[list[str]]:
    rows = []
    for item, text, server, probe in CASES:
        if only and not re.search(only, f"{item} {text} {server}"):
            continue
        if server not in env.servers:
            rows.append([item, text, server, "-", "-", "-"])
            continue
        cells = []
        for kind in ("direct", "bare", *env.tethers):
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                try:
                    seen = await asyncio.wait_for(probe(env, kind, s), 30)
                except Exception as exc:  # noqa: BLE001 - a probe that fails says so in its cell
                    seen = Seen(f"probe failed: {type(exc).__name__}: {exc}"[:80], False)
            mark = "" if seen.ok is None else (" ✓" if seen.ok else " ✗")
            cells.append(seen.text + mark)
        rows.append([item, text, server, *cells])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tether", action="append", metavar="DIR[=LABEL]",
                    help="a Tether checkout to run, one column each (default: this one)")
    ap.add_argument("--only", help="only the cases whose 'item case server' matches this regular expression")
    args = ap.parse_args()
    roots: list[Path] = []
    labels: list[str] = []
    for spec in args.tether or [str(ROOT)]:
        d, _, label = spec.partition("=")
        root = Path(d).resolve()
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        roots.append(root)
        labels.append(f"Tether {label or commit or root}")
    with tempfile.TemporaryDirectory(prefix="tether-fidelity-") as tmp:
        env = Env(Path(tmp), roots)
        try:
            env.start()
            rows = asyncio.run(run(env, args.only))
        finally:
            env.stop()
    print("✓: what the agent gets is the server's answer (or an honest, stated refusal); ✗: it is not. "
          "Direct (an aiohttp client) is the reference.\n")
    print("| item | case | server | direct | bare aiohttp forwarder | " + " | ".join(labels) + " |")
    print("|---|---|---|---|---|" + "---|" * len(labels))
    for row in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    for m in env.missing:
        print(f"\nnot run: {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
