#!/usr/bin/env python3
"""Tether benchmark harness (issues 13, 22 and 27). See bench/README.md.

    python bench/run.py                 # full: 3 interleaved rounds x 10 s per configuration
    python bench/run.py --quick         # smoke check: 1 round x 3 s
    python bench/run.py --soak          # memory over a 5-minute run (--soak-duration S)
    python bench/run.py --profile       # py-spy profile of Tether under the GET and PATCH loads

Everything runs on loopback: an nginx upstream answering ~200 bytes of JSON at once (and
bench/slow_upstream.py answering the same after 20 ms), then wrk (pinned to one core) against: the
upstream directly, nginx as a reverse proxy, a bare aiohttp forwarder (bench/bare_forwarder.py),
mitmproxy in reverse mode, and Tether with its full policy (and variants), on its REST and MCP doors.
After each run against a Tether on SQLite the harness reads the store: journal bytes per request.
Results are printed and written as JSON to bench/results/. Missed targets print FAIL; they never make
the harness crash. Every process started is stopped on exit (process groups, try/finally).
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import hmac
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
MITM_VENV = BENCH / ".venv-mitm"
SF_SPEC = Path(os.environ.get("TETHER_BENCH_SF_SPEC", "/work/shared/specs/salesforce.oas.json"))
SF_PREFIX = "/services/data/v59.0"
# The PostgreSQL server; the harness creates a database of its own there for the run and drops it after,
# so it never writes into a database someone's tests use. TETHER_BENCH_PG_DSN uses a given database as is.
PG_SERVER = os.environ.get("TETHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
PG_DSN_GIVEN = os.environ.get("TETHER_BENCH_PG_DSN")

SECRET = "bench-secret-0123456789abcdef-0123456789abcdef"
AGENT, HUMAN = "bench-bot", "ae:jane@acme.example"
DRY_AGENT = "bench-bot-dry"
RECORD_ID = "003xx000004TmiQAAS"
SF_ID = "001xx000003DGb2AAG"
MARKER = "bench-upstream-nginx"
INTENT = "bench: move the renewal to negotiation"
SLOW_DELAY_MS = 20.0  # the slow upstream's answer time (issue 27: "a realistic SaaS call")
MCP_VERSION = "2026-07-28"  # the stateless revision: every tools/call stands alone (docs/mcp.md)
MCP_TOOL = "contact_read"  # the MCP tool of the capability the REST GET calls (contact.read)
# Store growth per request at commit 92941b0 (before issue 27's compact record), measured by this
# harness (2 rounds x 3 s, 32 connections; two journal records per request, 1,393 / 1,556 / 1,692 bytes of
# journal rows, the dry-run's review item 3,955 more): what "halve the bytes per request" is measured
# against. GET and PATCH are targets (half of this); the dry-run's figure is reported against it.
STORE_BASELINE_BYTES = {"GET": 1870.0, "PATCH": 2043.0, "dry-run PATCH": 6407.0}
STORE_BASELINE_COMMIT = "92941b0"

# ~200 bytes of JSON, answered by nginx for any method and path.
UPSTREAM_BODY = json.dumps({
    "id": RECORD_ID, "object": "contact", "name": "Ada Lovelace", "email": "ada@example.com",
    "StageName": "Negotiation", "Amount": 125000, "updated": "2026-11-01T12:00:00Z", "served_by": MARKER,
}, separators=(",", ":"))
UPSTREAM_BODY += " " * max(0, 200 - len(UPSTREAM_BODY))


def patch_body(size: int = 500) -> str:
    """A 500-byte JSON PATCH body that the field rules accept."""
    doc = {"StageName": "Negotiation", "CloseDate": "2026-12-31", "Amount": 125000,
           "NextStep": "send the renewal quote", "Description": ""}
    base = len(json.dumps(doc, separators=(",", ":")))
    doc["Description"] = "x" * (size - base)
    out = json.dumps(doc, separators=(",", ":"))
    assert len(out) == size, len(out)
    return out


PATCH_BODY = patch_body()

# --------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(sub: str, actor: str | None, ttl: int = 7 * 86400) -> str:
    """HS256 JWT (stdlib only, so the harness does not depend on the gateway's internals)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iss": "tether", "aud": "tether", "iat": now, "nbf": now - 5,
                              "exp": now + ttl}
    if actor:
        claims["act"] = {"sub": actor}
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def run_text(argv: list[str], timeout: float = 30) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"


def http_call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
              body: str | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body.encode() if body is not None else None, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- tools


def ensure_tool(binary: str, apt_packages: list[str], *, install: bool) -> str:
    """Path of ``binary``; installed from the system packages if missing. SystemExit if impossible."""
    for cand in (binary, f"/usr/sbin/{binary}", f"/usr/bin/{binary}"):
        path = shutil.which(cand)
        if path:
            return path
    if not install:
        raise SystemExit(f"bench: {binary} is missing and --no-install was given; install it "
                         f"(apt-get install -y {apt_packages[0]})")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"bench: {binary} is missing and cannot be installed here (need root and apt-get); "
                         f"install one of: {', '.join(apt_packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    errors = []
    for attempt in ("direct", "after apt-get update"):
        if attempt != "direct":
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        for pkg in apt_packages:
            log(f"  installing {pkg} (apt-get install -y {pkg}) ...")
            p = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, capture_output=True, text=True)
            path = shutil.which(binary) or shutil.which(f"/usr/sbin/{binary}")
            if p.returncode == 0 and path:
                return path
            errors.append(f"{pkg}: {(p.stderr or p.stdout).strip().splitlines()[-1:] or p.returncode}")
    raise SystemExit(f"bench: {binary} is missing and could not be installed: {'; '.join(map(str, errors))}")


def ensure_mitmdump(install: bool) -> tuple[str | None, str]:
    """(path to mitmdump in bench/.venv-mitm, '') or (None, reason it is skipped)."""
    exe = MITM_VENV / "bin" / "mitmdump"
    if exe.exists():
        return str(exe), ""
    if not install:
        return None, "mitmproxy is not installed in bench/.venv-mitm and --no-install was given"
    log("  creating bench/.venv-mitm and installing mitmproxy into it (pip install mitmproxy) ...")
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    p = subprocess.run([base_python, "-m", "venv", str(MITM_VENV)], capture_output=True, text=True)
    if p.returncode != 0:
        return None, f"python -m venv failed: {(p.stderr or p.stdout).strip()[-300:]}"
    p = subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "mitmproxy"], capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0 or not exe.exists():
        return None, f"pip install mitmproxy failed: {(p.stderr or p.stdout).strip()[-300:]}"
    return str(exe), ""


def ensure_pyspy(install: bool) -> str:
    for cand in (Path(sys.executable).parent / "py-spy", shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    if not install:
        raise SystemExit("bench: py-spy is missing (pip install py-spy)")
    log("  installing py-spy (pip install py-spy) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    cand = Path(sys.executable).parent / "py-spy"
    if cand.exists():
        return str(cand)
    raise SystemExit("bench: py-spy could not be installed (pip install py-spy)")


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process the harness starts, each in its own process group; stop_all() ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], *, cpus: str | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[Any]:
        if cpus is not None and TASKSET:
            argv = [TASKSET, "-c", cpus, *argv]
        if NICE:
            argv = ["nice", "-n", str(NICE), *argv]
        out = self.workdir / f"{name}.out"
        self.logs[name] = out
        fh = open(out, "w")
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=str(cwd or self.workdir), env={**os.environ, **(env or {})}, start_new_session=True)
        fh.close()
        self.procs[name] = p
        return p

    def output(self, name: str) -> str:
        try:
            return self.logs[name].read_text(errors="replace")
        except (KeyError, OSError):
            return ""

    def stop(self, name: str, timeout: float = 10) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            try:
                self.stop(name)
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                log(f"  (could not stop {name}: {exc})")


TASKSET = shutil.which("taskset")
NICE = 0  # --nice
NPROC = os.cpu_count() or 1
if NPROC >= 2:
    LOAD_CPUS, PROXY_CPUS = "0", "1"
    MULTI_CPUS = "1,2" if NPROC >= 3 else "0,1"
else:
    LOAD_CPUS = PROXY_CPUS = MULTI_CPUS = None  # type: ignore[assignment]
if not TASKSET:
    LOAD_CPUS = PROXY_CPUS = MULTI_CPUS = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- servers


def nginx_conf(workdir: Path, name: str, port: int, proxy_to: int | None = None) -> Path:
    d = workdir / name
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    body = UPSTREAM_BODY.replace("'", "\\'")
    if proxy_to is None:
        server = f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location / {{ return 200 '{body}'; }}
    }}"""
    else:
        server = f"""
    upstream tether_bench_up {{
        server 127.0.0.1:{proxy_to};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://tether_bench_up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
master_process off;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
worker_rlimit_nofile 65536;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    {server}
}}
""")
    return conf


@dataclass
class Server:
    key: str
    label: str
    port: int = 0          # the port wrk targets
    pids: list[int] = field(default_factory=list)
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def sf_operations() -> list[tuple[str, str]]:
    """(METHOD, path) for every operation of the Salesforce spec, paths prefixed with /services/data/v59.0."""
    doc = json.loads(SF_SPEC.read_text())
    ops = []
    for path, item in doc["paths"].items():
        for method in item:
            if method.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
                ops.append((method.upper(), SF_PREFIX + path))
    return ops


def cap_name(method: str, path: str, taken: set[str]) -> str:
    slug = re.sub(r"[{}]", "", path[len(SF_PREFIX):].strip("/")).replace("/", ".") or "root"
    name = f"sf.{slug}.{method.lower()}"
    n, i = name, 2
    while n in taken:
        n, i = f"{name}.{i}", i + 1
    taken.add(n)
    return n


def tether_rules(upstream_url: str, store: str, *, main_port: int, up_port: int, admin_port: int,
                 workers: int = 1, synchronous: str = "full", registry: str = "default",
                 mcp: bool = False) -> dict[str, Any]:
    """The full-policy rules: JWT (HS256, iss/aud/exp), delegated identity, route match with parameter
    patterns, field rules and constraints on the PATCH, a live write grant, a dry-run grant (another
    agent), bearer credential injection, provenance headers; journal committed before forwarding. ``mcp``
    turns the MCP door on (only where a configuration uses it: with --workers it logs that 2025-era MCP
    sessions live in one worker, a warning the harness would report)."""
    id_pattern = "[A-Za-z0-9]{15,18}"
    caps: dict[str, Any] = {
        "contact.read": {"upstream": "crm", "method": "GET", "path": "/api/contacts/{id}",
                         "params": {"id": id_pattern}},
        "contact.update": {
            "upstream": "crm", "method": "PATCH", "path": "/api/contacts/{id}", "params": {"id": id_pattern},
            "effect": "write",
            "body": {
                "allow_fields": ["StageName", "CloseDate", "Amount", "NextStep", "Description"],
                "constraints": {
                    "StageName": {"enum": ["Prospecting", "Negotiation", "Closed Won", "Closed Lost"]},
                    "Amount": {"type": "number", "min": 0, "max": 10_000_000},
                    "CloseDate": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                    "Description": {"type": "string", "max_length": 2000},
                },
                "max_bytes": 65536,
            },
            "audit_fields": ["StageName", "Amount"],
        },
    }
    fillers = [("contact.list", "GET", "/api/contacts"), ("contact.create", "POST", "/api/contacts"),
               ("contact.delete", "DELETE", "/api/contacts/{id}"), ("account.read", "GET", "/api/accounts/{id}"),
               ("account.update", "PATCH", "/api/accounts/{id}"), ("account.list", "GET", "/api/accounts"),
               ("deal.read", "GET", "/api/deals/{id}"), ("deal.update", "PATCH", "/api/deals/{id}")]
    for name, method, path in fillers:
        caps[name] = {"upstream": "crm", "method": method, "path": path}
    grants: list[Any] = ["contact.read", {"capability": "contact.update", "mode": "live"}]
    grants += [n if caps[n]["method"] == "GET" else {"capability": n, "mode": "live"} for n, _, _ in fillers]
    dry_grants: list[Any] = ["contact.read", {"capability": "contact.update", "mode": "dry_run"}]
    if registry != "default":
        # registry comparison: only Salesforce operations, on the same upstream
        ops = sf_operations()
        if registry == "small":
            wanted = {("GET", f"{SF_PREFIX}/sobjects/Account/{{id}}")}
            keep = [op for op in ops if op in wanted]
            keep += [op for op in ops if op not in wanted][:10 - len(keep)]
            ops = keep
        caps, taken = {}, set()
        for method, path in ops:
            caps[cap_name(method, path, taken)] = {"upstream": "crm", "method": method, "path": path}
        grants = [n if c["method"] == "GET" else {"capability": n, "mode": "live"} for n, c in caps.items()]
        dry_grants = []
    # rate limits far above what wrk sends: they cost their bookkeeping (shared buckets and leases with
    # --workers and on PostgreSQL), never a refusal
    agents: dict[str, Any] = {AGENT: {"grants": grants, "rate_limit": {"requests_per_minute": 60_000_000}}}
    if dry_grants:
        agents[DRY_AGENT] = {"grants": dry_grants}
    rules: dict[str, Any] = {
        "version": 1,
        "server": {"listen": f"127.0.0.1:{main_port}", "admin_listen": f"127.0.0.1:{admin_port}", "store": store,
                   "workers": workers, "log_level": "warning", "grace_period": 2,
                   "journal": {"synchronous": synchronous},
                   # the dry-run target captures far more than any reviewer would let pile up
                   "review": {"max_pending_per_agent": 1_000_000_000, "max_pending_bytes_per_agent": 2 ** 50}},
        "identity": {"hs_secret": {"value": SECRET}, "issuer": "tether", "audience": "tether",
                     "algorithms": ["HS256"]},
        "upstreams": {"crm": {"url": upstream_url, "listen": f"127.0.0.1:{up_port}",
                              "rate_limit": {"per_minute": 60_000_000},
                              "credentials": {"type": "bearer", "token": {"value": "UPSTREAM-REAL-SECRET"}},
                              "provenance": {"headers": True}}},
        "agents": agents,
        "capabilities": caps,
    }
    if mcp:  # the MCP front door on the main listener (the REST door is the upstream's own listener)
        rules["server"]["mcp"] = {"path": "/mcp"}
    return rules


class Lab:
    """Starts and owns the servers of one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = Procs(workdir)
        self.servers: dict[str, Server] = {}
        self.shm_dirs: list[Path] = []
        self.nginx = ""
        self.upstream_port = 0
        self.slow_port = 0  # bench/slow_upstream.py, when a configuration needs it
        self.fsync_samples: list[float] = []
        self.fsync: dict[str, Any] = {}

    # each starter returns a Server (error set on failure); nothing raises out of here
    def start_upstream(self) -> Server:
        port = free_port()
        conf = nginx_conf(self.workdir, "nginx-upstream", port)
        p = self.procs.start("nginx-upstream", [self.nginx, "-c", str(conf)])
        wait_port(port, 15, p)
        self.upstream_port = port
        s = Server("direct", "nginx upstream, called directly", port, [p.pid])
        self.servers["direct"] = s
        return s

    def _guard(self, key: str, label: str, fn: Callable[[Server], None]) -> Server:
        s = Server(key, label)
        try:
            fn(s)
        except Exception as exc:  # noqa: BLE001 - a server that cannot start is reported, not fatal
            s.error = str(exc).strip()[-1200:] or type(exc).__name__
            log(f"  ! {key}: {s.error.splitlines()[-1] if s.error else ''}")
            self.procs.stop(key)
        self.servers[key] = s
        return s

    def start_nginx_proxy(self) -> Server:
        def go(s: Server) -> None:
            s.port = free_port()
            conf = nginx_conf(self.workdir, "nginx-proxy", s.port, proxy_to=self.upstream_port)
            p = self.procs.start("nginx", [self.nginx, "-c", str(conf)], cpus=PROXY_CPUS)
            wait_port(s.port, 15, p)
            s.pids = [p.pid]
        return self._guard("nginx", "nginx 1 worker, plain reverse proxy (keepalive pool)", go)

    def start_slow_upstream(self) -> Server:
        """bench/slow_upstream.py: the same answer as the nginx upstream, SLOW_DELAY_MS after each request
        (not pinned, like the nginx upstream; its docstring says why it is not nginx or an event loop)."""
        def go(s: Server) -> None:
            s.port = free_port()
            body = self.workdir / "upstream-body.json"
            body.write_text(UPSTREAM_BODY)
            p = self.procs.start("direct-20ms", [sys.executable, str(BENCH / "slow_upstream.py"), "--port",
                                                 str(s.port), "--delay-ms", f"{SLOW_DELAY_MS:g}",
                                                 "--body-file", str(body)])
            wait_port(s.port, 20, p)
            s.pids = [p.pid]
            self.slow_port = s.port
        return self._guard("direct-20ms", f"upstream answering after {SLOW_DELAY_MS:g} ms, called directly", go)

    def start_bare(self, key: str = "bare", upstream_port: int | None = None) -> Server:
        def go(s: Server) -> None:
            s.port = free_port()
            up = upstream_port or self.upstream_port
            p = self.procs.start(key, [sys.executable, str(BENCH / "bare_forwarder.py"), "--port", str(s.port),
                                       "--upstream", f"http://127.0.0.1:{up}"], cpus=PROXY_CPUS)
            wait_port(s.port, 20, p)
            s.pids = [p.pid]
        return self._guard(key, "bare aiohttp forwarder, uvloop, 1 pooled ClientSession", go)

    def start_mitm(self, exe: str | None, reason: str) -> Server:
        def go(s: Server) -> None:
            if exe is None:
                raise RuntimeError(f"skipped: {reason}")
            s.port = free_port()
            conf_dir = self.workdir / "mitm-conf"
            conf_dir.mkdir(exist_ok=True)
            p = self.procs.start("mitm", [exe, "--mode", f"reverse:http://127.0.0.1:{self.upstream_port}",
                                          "--listen-host", "127.0.0.1", "--listen-port", str(s.port), "-q",
                                          "--set", f"confdir={conf_dir}", "--set", "flow_detail=0",
                                          "--set", "termlog_verbosity=error"], cpus=PROXY_CPUS)
            wait_port(s.port, 60, p)
            s.pids = [p.pid]
            s.info["version"] = run_text([exe, "--version"]).splitlines()[0:1]
        return self._guard("mitm", "mitmproxy (mitmdump) in reverse mode", go)

    def start_tether(self, key: str, label: str, *, workers: int = 1, synchronous: str = "full",
                     store: str | None = None, registry: str = "default", cpus: str | None = "proxy",
                     slow: bool = False, mcp: bool = False) -> Server:
        def go(s: Server) -> None:
            main_port, up_port, admin_port = free_port(), free_port(), free_port()
            if store is None:
                st = str(self.workdir / f"{key}.db")
            elif store == "tmpfs":
                d = Path(tempfile.mkdtemp(prefix="tether-bench-", dir="/dev/shm"))
                self.shm_dirs.append(d)
                st = str(d / "tether.db")
            else:
                st = store
            up = self.slow_port if slow else self.upstream_port
            if not up:
                raise RuntimeError("its upstream did not start")
            rules = tether_rules(f"http://127.0.0.1:{up}", st, main_port=main_port, up_port=up_port,
                                 admin_port=admin_port, workers=workers, synchronous=synchronous, registry=registry,
                                 mcp=mcp)
            path = self.workdir / f"{key}.rules.json"  # JSON is YAML
            path.write_text(json.dumps(rules, indent=1))
            s.info.update(store=st, workers=workers, synchronous=synchronous, capabilities=len(rules["capabilities"]),
                          rules=str(path), main_port=main_port, upstream=f"http://127.0.0.1:{up}")
            pin = {"proxy": PROXY_CPUS, "multi": MULTI_CPUS}.get(cpus or "", None)
            p = self.procs.start(key, [sys.executable, "-m", "proxy", "serve", "--config", str(path)], cpus=pin,
                                 env={"PYTHONPATH": str(ROOT)}, cwd=self.workdir)
            deadline = time.monotonic() + 120
            banners: list[dict[str, Any]] = []
            while time.monotonic() < deadline and len(banners) < workers:
                if p.poll() is not None:
                    raise RuntimeError(f"tether exited with code {p.returncode}: {self.procs.output(key)[-1500:]}")
                banners = []
                for line in self.procs.output(key).splitlines():
                    if line.startswith("{") and '"ready"' in line:
                        try:
                            banners.append(json.loads(line))
                        except ValueError:
                            pass
                time.sleep(0.1)
            if len(banners) < workers:
                raise RuntimeError(f"tether not ready after 120s: {self.procs.output(key)[-1500:]}")
            s.port = up_port
            s.info["banner"] = banners[0]
            s.pids = tree_pids(p.pid)
        return self._guard(key, label, go)

    def pg_database(self) -> tuple[str | None, str]:
        """A fresh database for this run on the PostgreSQL server (dropped in close())."""
        if PG_DSN_GIVEN:
            return PG_DSN_GIVEN, ""
        name = f"tether_bench_{os.getpid()}"
        err = _pg_admin(f"CREATE DATABASE {name}")
        if err:
            return None, f"cannot create database {name} on {PG_SERVER}: {err}"
        self.pg_db = name
        return f"{PG_SERVER}/{name}", ""

    def close(self) -> None:
        self.procs.stop_all()
        if getattr(self, "pg_db", None):
            err = _pg_admin(f"DROP DATABASE IF EXISTS {self.pg_db}")
            if err:
                log(f"  (could not drop database {self.pg_db}: {err})")
        for d in self.shm_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _pg_admin(sql: str) -> str:
    """Run one statement on the server's maintenance database; '' on success, else the error."""
    try:
        import asyncio

        import asyncpg  # a dependency of the project's PostgreSQL store
    except ImportError as exc:
        return f"asyncpg is not installed ({exc})"

    async def go() -> None:
        conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(go())
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (a multi-worker Tether forks its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return out


def rss_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------- wrk

LUA_DONE = r"""
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + (t:get("bad_body") or 0) end
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d,\"write\":%d," ..
    "\"timeout\":%d,\"status\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d,\"mean\":%.1f,\"max\":%d," ..
    "\"bad_body\":%d}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max, bad))
end
"""


def lua_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_script(method: str, headers: dict[str, str], body: str | None, *, expect: tuple[str, ...] = (),
               reject: tuple[str, ...] = ()) -> str:
    """wrk's script: the request, and — when ``expect``/``reject`` are given — a check of every answer's
    body (each ``expect`` string present, no ``reject`` string), counted as ``bad_body``. Used where a
    failure is not an HTTP error status (an MCP tool result with ``isError`` is a 200)."""
    lines = [f"wrk.method = {lua_string(method)}"]
    for k, v in headers.items():
        lines.append(f"wrk.headers[{lua_string(k)}] = {lua_string(v)}")
    if body is not None:
        lines.append(f"wrk.body = {lua_string(body)}")
    if expect or reject:
        lines.append("bad_body = 0")
        conds = [f"not string.find(body, {lua_string(x)}, 1, true)" for x in expect]
        conds += [f"string.find(body, {lua_string(x)}, 1, true)" for x in reject]
        lines.append("response = function(status, headers, body)\n"
                     f"  if body == nil or {' or '.join(conds)} then bad_body = bad_body + 1 end\nend")
    return "\n".join(lines) + "\n" + LUA_DONE


def mixed_lua(get_path: str, patch_path: str, headers: dict[str, str], body: str) -> str:
    """Alternate GET and PATCH on each connection (the soak load)."""
    hdr = "{" + ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()) + "}"
    return f"""
local n = 0
local get_req, patch_req
init = function(args)
  local h = {hdr}
  get_req = wrk.format("GET", {lua_string(get_path)}, h, nil)
  h["Content-Type"] = "application/json"
  patch_req = wrk.format("PATCH", {lua_string(patch_path)}, h, {lua_string(body)})
end
request = function()
  n = n + 1
  if n % 2 == 0 then return patch_req end
  return get_req
end
""" + LUA_DONE


def run_wrk(wrk: str, url: str, script: Path, *, connections: int, duration: float, threads: int = 1,
            timeout: str = "5s") -> dict[str, Any]:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(round(duration)))}s", "--latency",
            f"--timeout={timeout}", "-s", str(script), url]
    if LOAD_CPUS is not None:
        argv = [TASKSET, "-c", LOAD_CPUS, *argv]  # type: ignore[list-item]
    if NICE:
        argv = ["nice", "-n", str(NICE), *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-500:]}")
    d = json.loads(m.group(1))
    secs = d["duration_us"] / 1e6
    errors = d["connect"] + d["read"] + d["write"] + d["timeout"]
    return {"rps": round(d["requests"] / secs, 1) if secs else 0.0, "requests": d["requests"],
            "p50_ms": d["p50"] / 1000, "p90_ms": d["p90"] / 1000, "p99_ms": d["p99"] / 1000,
            "p999_ms": d["p999"] / 1000, "mean_ms": round(d["mean"] / 1000, 4), "max_ms": d["max"] / 1000,
            "non_2xx": d["status"], "socket_errors": errors, "bad_body": d.get("bad_body", 0)}


# --------------------------------------------------------------------------- other load on the machine


def _busy_ticks() -> int:
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # user nice system irq softirq steal


def _proc_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        f = stat[stat.rindex(")") + 2:].split()
        return int(f[11]) + int(f[12])
    except (OSError, ValueError, IndexError):
        return 0


def _dirty_kb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Dirty:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def settle(srv: "Server", max_wait: float = 15.0, window: float = 0.5, idle_cores: float = 0.06,
           dirty_kb: int = 32 * 1024) -> float:
    """Wait (at least one window, at most ``max_wait`` s) until the server's processes are idle and the
    kernel has written back what the last run left dirty; the seconds waited.

    Why: a run leaves work behind — a dry-run capture's WAL to checkpoint, its pages to flush, a batch to
    commit — and whatever is measured next on the same server paid for it (the MCP door, measured after
    the dry-run PATCH on the same gateway, lost up to 40% of its throughput that way in one full run, and
    its ratio to the REST GET with it). Each measurement now starts from a quiet server."""
    t0 = time.monotonic()
    pids = tree_pids(srv.pids[0]) if srv.pids else []
    tick = os.sysconf("SC_CLK_TCK")
    while True:
        before = sum(_proc_ticks(p) for p in pids)
        time.sleep(window)
        used = (sum(_proc_ticks(p) for p in pids) - before) / tick / window
        if (used <= idle_cores and _dirty_kb() <= dirty_kb) or time.monotonic() - t0 >= max_wait:
            return round(time.monotonic() - t0, 2)


class LoadProbe:
    """CPU used during a measurement by processes that are not the harness's (other people's test runs,
    cron, ...): all busy CPU time minus wrk's and the servers'. In cores (1.0 = one core fully busy)."""

    def __init__(self, lab: "Lab") -> None:
        self.pids = sorted({p for s in lab.servers.values() for root in s.pids[:1] for p in tree_pids(root)})
        self.t0 = time.monotonic()
        self.busy0 = _busy_ticks()
        self.ours0 = {p: _proc_ticks(p) for p in self.pids}
        self.self0 = os.times()

    def other_load(self) -> float:
        tick = os.sysconf("SC_CLK_TCK")
        busy = (_busy_ticks() - self.busy0) / tick
        ours = sum(_proc_ticks(p) - t for p, t in self.ours0.items()) / tick
        t = os.times()
        harness = (t.children_user - self.self0.children_user + t.children_system - self.self0.children_system
                   + t.user - self.self0.user + t.system - self.self0.system)
        secs = max(1e-6, time.monotonic() - self.t0)
        return round(max(0.0, busy - ours - harness) / secs, 3)


# --------------------------------------------------------------------------- the store's bytes, one fsync


def fs_of(path: Path) -> str:
    """'type at mount point' of the filesystem holding ``path``, from /proc/mounts (longest prefix)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            f = line.split()
            if len(f) >= 3 and (str(path) + "/").startswith(f[1].rstrip("/") + "/") and len(f[1]) >= len(best):
                best, kind = f[1], f[2]
    except OSError:
        pass
    return f"{kind} at {best or '?'}"


def measure_fsync(directory: Path, n: int = 200, size: int = 4096) -> list[float]:
    """Milliseconds of ``n`` fsyncs, each after appending ``size`` bytes to a file in ``directory``: what a
    durable commit of a small batch costs there (SQLite's WAL in ``synchronous: full`` appends its frames
    and syncs the file once per commit). Only the fsync is timed."""
    path = directory / f".fsync-probe-{os.getpid()}"
    block = os.urandom(size)
    out: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(n):
            os.write(fd, block)
            t = time.perf_counter()
            os.fsync(fd)
            out.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return out


def sqlite_store(srv: Server) -> Path | None:
    """The SQLite file a Tether keeps its journal in (None for PostgreSQL or another server)."""
    st = srv.info.get("store")
    return Path(st) if st and "://" not in st else None


def _ro(db: Path) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10, isolation_level=None)
    con.execute("PRAGMA query_only = 1")
    return con


def _tables(con: sqlite3.Connection) -> list[str]:
    return [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                      "AND name NOT LIKE 'sqlite_%'")]


def store_snapshot(db: Path, settle: float = 5.0) -> dict[str, Any] | None:
    """The store's position: each table's highest rowid, its size (pages x page size, as a reader sees it,
    WAL included) and its files' size. Waits first until the journal stops growing (outcome records are
    committed after the answer, without anyone waiting), at most ``settle`` seconds. None if unreadable."""
    if not db.exists():
        return None
    try:
        con = _ro(db)
    except sqlite3.Error:
        return None
    try:
        last, deadline = None, time.monotonic() + settle
        while True:
            con.execute("BEGIN")
            try:
                top: dict[str, int] = {}
                for t in _tables(con):
                    try:
                        top[t] = con.execute(f'SELECT max(rowid) FROM "{t}"').fetchone()[0] or 0
                    except sqlite3.OperationalError:
                        pass  # WITHOUT ROWID
                pages = con.execute("PRAGMA page_count").fetchone()[0] * con.execute("PRAGMA page_size").fetchone()[0]
            finally:
                con.execute("ROLLBACK")
            if top == last or time.monotonic() > deadline:
                break
            last = top
            time.sleep(0.15)
    except sqlite3.Error:
        return None
    finally:
        con.close()
    files = sum(f.stat().st_size for f in (db, Path(f"{db}-wal")) if f.exists())
    return {"top": top, "logical_bytes": pages, "file_bytes": files}


def store_delta(db: Path, before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a run added to the store: rows and value bytes per table (text and blobs by their length,
    numbers as 8 bytes: the data, not SQLite's page and index overhead), the journal's ``record`` bytes,
    and the growth of the store (pages) and of its files (database + WAL)."""
    if not before or not after:
        return None
    rows: dict[str, int] = {}
    values: dict[str, int] = {}
    record = 0
    try:
        con = _ro(db)
        try:
            con.execute("BEGIN")
            for t, top1 in after["top"].items():
                top0 = before["top"].get(t, 0)
                if top1 <= top0:
                    continue
                cols = [r[1] for r in con.execute(f'PRAGMA table_info("{t}")')]
                size = " + ".join(f"""(CASE typeof("{c}") WHEN 'null' THEN 0 WHEN 'integer' THEN 8 WHEN 'real' THEN 8 """
                                  f"""ELSE length(CAST("{c}" AS BLOB)) END)""" for c in cols)
                n, b = con.execute(f'SELECT count(*), total({size}) FROM "{t}" WHERE rowid > ? AND rowid <= ?',
                                   (top0, top1)).fetchone()
                rows[t], values[t] = n, int(b)
                if t == "journal" and "record" in cols:
                    record = int(con.execute('SELECT total(length(CAST(record AS BLOB))) FROM journal '
                                             'WHERE rowid > ? AND rowid <= ?', (top0, top1)).fetchone()[0])
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        return {"error": str(exc)}
    return {"rows": rows, "value_bytes": values, "record_bytes": record,
            "logical_growth": after["logical_bytes"] - before["logical_bytes"],
            "file_growth": after["file_bytes"] - before["file_bytes"]}


def store_per_request(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Bytes per request over the kept runs of one configuration (divided by wrk's count of answers)."""
    deltas = [(r["requests"], r["store"]) for r in runs if r.get("store") and "rows" in r["store"]]
    n = sum(req for req, _ in deltas)
    if not n:
        return None
    journal_rows = sum(d["rows"].get("journal", 0) for _, d in deltas)
    journal = sum(d["value_bytes"].get("journal", 0) for _, d in deltas)
    other = sum(v for _, d in deltas for t, v in d["value_bytes"].items() if t != "journal")
    other_tables = sorted({t for _, d in deltas for t in d["value_bytes"] if t != "journal"})
    return {
        "requests": n,
        "journal_rows_per_request": round(journal_rows / n, 3),
        "journal_bytes_per_request": round(journal / n, 1),
        "record_bytes_per_request": round(sum(d["record_bytes"] for _, d in deltas) / n, 1),
        "other_bytes_per_request": round(other / n, 1),
        "other_tables": other_tables,
        "stored_bytes_per_request": round((journal + other) / n, 1),
        "store_growth_per_request": round(sum(d["logical_growth"] for _, d in deltas) / n, 1),
        "file_growth_per_request": round(sum(d["file_growth"] for _, d in deltas) / n, 1),
    }


# --------------------------------------------------------------------------- the matrix


@dataclass
class Config:
    name: str
    server: str
    method: str
    path: str
    label: str
    connections: int = 32
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    group: str = "main"
    listener: str = "upstream"  # which of the server's ports: "upstream" (REST door), "main" (MCP door)
    expect: tuple[str, ...] = ()  # strings every timed answer's body must hold (checked by wrk's Lua)
    reject: tuple[str, ...] = ()  # strings no timed answer's body may hold
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    check: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "server": self.server, "method": self.method,
                               "path": self.path, "connections": self.connections, "group": self.group,
                               "listener": self.listener}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.check:
            out["check"] = self.check
        if self.runs:
            out["other_load_cores_max"] = max(r.get("other_load_cores", 0) for r in self.runs)
            for k in ("rps", "p50_ms", "p99_ms", "p90_ms", "mean_ms"):
                out[k] = round(statistics.median(r[k] for r in self.runs), 4 if k != "rps" else 1)
            out["non_2xx"] = sum(r["non_2xx"] for r in self.runs)
            out["socket_errors"] = sum(r["socket_errors"] for r in self.runs)
            out["bad_body"] = sum(r.get("bad_body", 0) for r in self.runs)
            out["requests"] = sum(r["requests"] for r in self.runs)
            store = store_per_request(self.runs)
            if store:
                out["store"] = store
            out["runs"] = self.runs
        return out


def tether_headers(agent: str = AGENT, write: bool = False) -> dict[str, str]:
    h = {"Authorization": f"Bearer {mint_jwt(HUMAN, agent)}"}
    if write:
        h["X-Tether-Intent"] = INTENT
        h["Content-Type"] = "application/json"
    return h


def mcp_call() -> tuple[dict[str, str], str]:
    """Headers and body of an MCP ``tools/call`` of the GET capability, in the stateless 2026-07-28 revision:
    no session, the version and client in ``params._meta``, the routing headers mirroring the body."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": MCP_TOOL, "arguments": {"id": RECORD_ID},
        "_meta": {"io.modelcontextprotocol/protocolVersion": MCP_VERSION,
                  "io.modelcontextprotocol/clientCapabilities": {},
                  "io.modelcontextprotocol/clientInfo": {"name": "tether-bench", "version": "1"}}}},
        separators=(",", ":"))
    headers = {**tether_headers(), "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": MCP_VERSION, "Mcp-Method": "tools/call", "Mcp-Name": MCP_TOOL}
    return headers, body


# every timed MCP answer must be a successful tool result that carries the upstream's answer
MCP_EXPECT = (f'"served_by":"{MARKER}"', '"result"')
MCP_REJECT = ('"isError":true', '"error"')


def build_configs(args: argparse.Namespace) -> list[Config]:
    get_path = f"/api/contacts/{RECORD_ID}"
    patch_h = {"Content-Type": "application/json"}
    tg, tp, td = tether_headers(), tether_headers(write=True), tether_headers(DRY_AGENT, write=True)
    mh, mb = mcp_call()
    mcp = dict(listener="main", expect=MCP_EXPECT, reject=MCP_REJECT)
    slow = f"upstream answering after {SLOW_DELAY_MS:g} ms, 1 connection"
    c = args.connections
    cfgs = [
        Config("direct GET", "direct", "GET", get_path, "nginx upstream directly", c),
        Config("nginx GET", "nginx", "GET", get_path, "nginx reverse proxy", c),
        Config("bare GET", "bare", "GET", get_path, "bare aiohttp forwarder", c),
        Config("mitm GET", "mitm", "GET", get_path, "mitmproxy reverse mode", c),
        Config("tether GET", "tether", "GET", get_path, "Tether full policy, 1 worker", c, tg),
        # measured next to the REST GET it is compared with (same capability, same server, same moment)
        Config("tether MCP tools/call", "tether", "POST", "/mcp", "MCP door: tools/call of the same GET (2026-07-28)",
               c, mh, mb, **mcp),  # type: ignore[arg-type]
        Config("direct PATCH", "direct", "PATCH", get_path, "nginx upstream directly", c, patch_h, PATCH_BODY),
        Config("nginx PATCH", "nginx", "PATCH", get_path, "nginx reverse proxy", c, patch_h, PATCH_BODY),
        Config("bare PATCH", "bare", "PATCH", get_path, "bare aiohttp forwarder", c, patch_h, PATCH_BODY),
        Config("mitm PATCH", "mitm", "PATCH", get_path, "mitmproxy reverse mode", c, patch_h, PATCH_BODY),
        Config("tether PATCH", "tether", "PATCH", get_path, "Tether full policy, journal durable (sync=full)", c,
               tp, PATCH_BODY),
        Config("tether dry-run PATCH", "tether", "PATCH", get_path, "Tether, grant mode: dry_run (capture)", c,
               td, PATCH_BODY),
        # sequential requests: added latency
        Config("direct GET c1", "direct", "GET", get_path, "1 connection, sequential", 1, group="latency"),
        Config("bare GET c1", "bare", "GET", get_path, "1 connection, sequential", 1, group="latency"),
        Config("tether GET c1", "tether", "GET", get_path, "1 connection, sequential", 1, tg, group="latency"),
        Config("direct PATCH c1", "direct", "PATCH", get_path, "1 connection, sequential", 1, patch_h, PATCH_BODY,
               group="latency"),
        Config("tether PATCH c1", "tether", "PATCH", get_path, "1 connection, sequential", 1, tp, PATCH_BODY,
               group="latency"),
        Config("tether MCP tools/call c1", "tether", "POST", "/mcp", "1 connection, MCP door", 1, mh, mb,
               group="latency", **mcp),  # type: ignore[arg-type]
        Config("tether GET c1 tmpfs", "tether-tmpfs", "GET", get_path, "1 connection, store on /dev/shm (no fsync)",
               1, tg, group="latency"),
        # an upstream that answers after 20 ms (a SaaS call), one connection: issue 27's latency targets
        Config("direct GET c1 20ms", "direct-20ms", "GET", get_path, slow, 1, group="20ms"),
        Config("bare GET c1 20ms", "bare-20ms", "GET", get_path, slow, 1, group="20ms"),
        Config("tether GET c1 20ms", "tether-20ms", "GET", get_path, slow, 1, tg, group="20ms"),
        Config("direct PATCH c1 20ms", "direct-20ms", "PATCH", get_path, slow, 1, patch_h, PATCH_BODY, group="20ms"),
        Config("tether PATCH c1 20ms", "tether-20ms", "PATCH", get_path, slow + ", journal durable", 1, tp,
               PATCH_BODY, group="20ms"),
        # registry size
        Config("tether GET reg10", "tether-reg10", "GET", f"{SF_PREFIX}/sobjects/Account/{SF_ID}",
               "10 Salesforce capabilities", c, tg, group="registry"),
        Config("tether GET regSF", "tether-regsf", "GET", f"{SF_PREFIX}/sobjects/Account/{SF_ID}",
               "every Salesforce operation as a capability", c, tg, group="registry"),
        # workers
        Config("tether GET w2", "tether-w2", "GET", get_path, "Tether, --workers 2", c, tg, group="workers"),
        Config("tether PATCH w2", "tether-w2", "PATCH", get_path, "Tether, --workers 2", c, tp, PATCH_BODY,
               group="workers"),
        # journal durability and store
        Config("tether PATCH sync=normal", "tether-normal", "PATCH", get_path, "journal synchronous=normal", c, tp,
               PATCH_BODY, group="journal"),
        Config("tether PATCH tmpfs", "tether-tmpfs", "PATCH", get_path,
               "store on /dev/shm (fsync ~free; approximates journal cost off)", c, tp, PATCH_BODY, group="journal"),
        Config("tether GET tmpfs", "tether-tmpfs", "GET", get_path, "store on /dev/shm", c, tg, group="journal"),
        Config("tether PATCH pg", "tether-pg", "PATCH", get_path, "PostgreSQL store", c, tp, PATCH_BODY,
               group="store"),
        Config("tether GET pg", "tether-pg", "GET", get_path, "PostgreSQL store", c, tg, group="store"),
    ]
    if args.only:
        pats = [re.compile(p, re.I) for p in args.only]
        cfgs = [cf for cf in cfgs if any(p.search(cf.name) for p in pats)]
    return cfgs


def start_servers(lab: Lab, needed: set[str], install: bool) -> None:
    if needed & {"direct-20ms", "bare-20ms", "tether-20ms"}:
        lab.start_slow_upstream()
    if "nginx" in needed:
        lab.start_nginx_proxy()
    if "bare" in needed:
        lab.start_bare()
    if "bare-20ms" in needed:
        lab.start_bare("bare-20ms", lab.slow_port)
    if "mitm" in needed:
        exe, reason = ensure_mitmdump(install)
        lab.start_mitm(exe, reason)
    tethers = {
        "tether": dict(label="Tether, full policy, SQLite sync=full, 1 worker, MCP door on", mcp=True),
        "tether-reg10": dict(label="Tether, 10 Salesforce capabilities", registry="small"),
        "tether-regsf": dict(label="Tether, every Salesforce operation as a capability", registry="sf"),
        "tether-w2": dict(label="Tether, 2 workers (SO_REUSEPORT)", workers=2, cpus="multi"),
        "tether-normal": dict(label="Tether, journal synchronous=normal", synchronous="normal"),
        "tether-tmpfs": dict(label="Tether, store on tmpfs (/dev/shm)", store="tmpfs"),
        "tether-pg": dict(label="Tether, PostgreSQL store"),
        "tether-20ms": dict(label=f"Tether, full policy, upstream answering after {SLOW_DELAY_MS:g} ms", slow=True),
    }
    for key, kw in tethers.items():
        if key == "tether-pg" and key in needed:
            dsn, why = lab.pg_database()
            if dsn is None:
                lab.servers[key] = Server(key, kw["label"], error=f"skipped: {why}")
                log(f"  ! {key}: {why}")
                continue
            kw["store"] = dsn
        if key in needed:
            log(f"  starting {key} ...")
            lab.start_tether(key, **kw)  # type: ignore[arg-type]


def port_of(srv: Server, cfg: Config) -> int:
    """The port wrk targets: the server's REST port, or a Tether's main listener for the MCP door."""
    return int(srv.info["main_port"]) if cfg.listener == "main" else srv.port


def mcp_tool_result(body: bytes) -> tuple[bool, str]:
    """(is this a successful tool result carrying the upstream's answer, why not)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False, "not JSON"
    res = doc.get("result") if isinstance(doc, dict) else None
    if not isinstance(res, dict):
        return False, f"no result: {json.dumps(doc.get('error') if isinstance(doc, dict) else doc)[:200]}"
    if res.get("isError"):
        return False, f"isError: {json.dumps(res.get('structuredContent'))[:200]}"
    if (res.get("structuredContent") or {}).get("served_by") != MARKER:
        return False, "structuredContent is not the upstream's answer"
    return True, ""


def sanity(lab: Lab, cfg: Config) -> None:
    """One request before measuring: is the answer what the configuration claims to measure? A
    configuration whose answer is not a success is not timed (see run_matrix): timing errors would
    report the speed of a refusal."""
    srv = lab.servers[cfg.server]
    try:
        status, hdrs, body = http_call(port_of(srv, cfg), cfg.method, cfg.path, cfg.headers, cfg.body)
    except Exception as exc:  # noqa: BLE001
        cfg.check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return
    forwarded = MARKER.encode() in body
    cfg.check = {"ok": status == 200, "status": status, "reached_upstream": forwarded}
    if cfg.listener == "main":
        ok, why = mcp_tool_result(body)
        cfg.check.update(ok=status == 200 and ok, tool_result_ok=ok)
        if not ok:
            cfg.check["error"] = why
    if cfg.expect or cfg.reject:
        text = body.decode(errors="replace")
        missing = [x for x in cfg.expect if x not in text] + [f"not {x}" for x in cfg.reject if x in text]
        if missing:
            cfg.check.update(ok=False, error=f"the answer fails wrk's body check: {missing}")
    if not cfg.check["ok"]:
        cfg.check["body"] = body[:300].decode(errors="replace")
    if cfg.server.startswith("tether") and cfg.method == "PATCH" and cfg.headers.get("Authorization"):
        if "dry" in cfg.name:
            cfg.check["capture_active"] = not forwarded and status < 300
            cfg.check["synthetic_body"] = body[:200].decode(errors="replace") if not forwarded else None


def policy_probe(lab: Lab) -> dict[str, Any]:
    """Does the full-policy Tether enforce what its rules say? (refusals expected)"""
    srv = lab.servers.get("tether")
    if srv is None or srv.error:
        return {}
    path = f"/api/contacts/{RECORD_ID}"
    out: dict[str, Any] = {}
    probes = {
        "no_token": ("GET", path, {}, None, "4xx"),
        "undeclared_field (field rules)": ("PATCH", path, tether_headers(write=True),
                                           json.dumps({"StageName": "Negotiation", "OwnerId": "005xx"}), "4xx"),
        "constraint_violation (enum)": ("PATCH", path, tether_headers(write=True),
                                        json.dumps({"StageName": "Won Big"}), "4xx"),
        "write_without_intent": ("PATCH", path, {**tether_headers(write=True), "X-Tether-Intent": ""},
                                 json.dumps({"StageName": "Negotiation"}), "4xx"),
        "unregistered_route": ("GET", "/api/secrets/1", tether_headers(), None, "4xx"),
        "bad_param_pattern": ("GET", "/api/contacts/x", tether_headers(), None, "4xx"),
    }
    for name, (method, p, h, body, expect) in probes.items():
        try:
            status, _, resp = http_call(srv.port, method, p, h, body)
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": str(exc)}
            continue
        refused = 400 <= status < 500
        code = None
        try:
            code = json.loads(resp)["error"]["code"]
        except Exception:  # noqa: BLE001
            pass
        out[name] = {"status": status, "refused": refused, "code": code, "as_expected": refused == (expect == "4xx")}
    return out


def fsync_summary(samples: list[float], where: Path) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=10) if len(samples) >= 10 else [None] * 9
    return {"median_ms": round(statistics.median(samples), 4), "p10_ms": q[0] and round(q[0], 4),
            "p90_ms": q[8] and round(q[8], 4), "n": len(samples), "directory": str(where), "filesystem": fs_of(where),
            "what": "os.fsync after appending 4 KiB to a file in the store's directory; median of the samples "
                    "taken before and after the matrix"}


def run_matrix(args: argparse.Namespace, lab: Lab, wrk: str) -> list[Config]:
    cfgs = build_configs(args)
    needed = {c.server for c in cfgs}
    start_servers(lab, needed, not args.no_install)
    live = []
    for c in cfgs:
        srv = lab.servers.get(c.server)
        if srv is None or srv.error:
            c.skipped = srv.error if srv else "server not started"
            continue
        sanity(lab, c)
        if not c.check.get("ok"):
            why = c.check.get("error") or f"status {c.check.get('status')}"
            c.skipped = f"sanity check failed ({why}): {c.check.get('body', '')[:200]}"
            log(f"  ! {c.name}: not timed: {c.skipped}")
            continue
        live.append(c)
    # "one fsync" on the filesystem the stores live on, measured now and again after the rounds
    fsync_dir = lab.workdir
    lab.fsync_samples = measure_fsync(fsync_dir)
    log(f"\none fsync in {fsync_dir} on {fs_of(fsync_dir)}: median {statistics.median(lab.fsync_samples):.3f} ms "
        f"({len(lab.fsync_samples)} samples)")
    scripts: dict[str, Path] = {}
    for c in live:
        sp = lab.workdir / f"wrk-{re.sub(r'[^A-Za-z0-9]+', '_', c.name)}.lua"
        sp.write_text(lua_script(c.method, c.headers, c.body, expect=c.expect, reject=c.reject))
        scripts[c.name] = sp
    log(f"\nwarm-up ({args.warmup:g} s each) ...")
    for c in live:
        srv = lab.servers[c.server]
        try:
            run_wrk(wrk, f"http://127.0.0.1:{port_of(srv, c)}{c.path}", scripts[c.name], connections=c.connections,
                    duration=args.warmup)
        except Exception as exc:  # noqa: BLE001
            log(f"  ! warm-up {c.name}: {exc}")
    total = len(live) * args.rounds
    log(f"\nmeasuring {len(live)} configurations x {args.rounds} round(s) x {args.duration:g} s "
        f"(~{total * (args.duration + 1.5) / 60:.1f} min), interleaved")
    for r in range(args.rounds):
        k = (r * len(live)) // max(1, args.rounds)
        order = live[k:] + live[:k]
        for c in order:
            srv = lab.servers[c.server]
            attempts: list[dict[str, Any]] = []
            db = sqlite_store(srv)
            for attempt in range(1 + args.retries):
                waited = settle(srv)
                before = store_snapshot(db) if db else None
                probe = LoadProbe(lab)
                try:
                    res = run_wrk(wrk, f"http://127.0.0.1:{port_of(srv, c)}{c.path}", scripts[c.name],
                                  connections=c.connections, duration=args.duration)
                except Exception as exc:  # noqa: BLE001
                    log(f"  ! round {r + 1} {c.name}: {exc}")
                    break
                res["other_load_cores"] = probe.other_load()
                res["settled_s"] = waited
                if db:  # after the load probe: reading the store is the harness's work, not the run's
                    res["store"] = store_delta(db, before, store_snapshot(db))
                res["round"] = r + 1
                attempts.append(res)
                if res["other_load_cores"] <= args.max_other_load:
                    break
                log(f"  ~ {c.name}: other processes used {res['other_load_cores']:.2f} cores during the run "
                    f"({res['rps']:,.0f} req/s); " + ("measuring again" if attempt < args.retries else "kept"))
            if not attempts:
                continue
            res = attempts[-1]
            if len(attempts) > 1:
                res["discarded_attempts"] = attempts[:-1]
            c.runs.append(res)
            bad = (f"  non-2xx={res['non_2xx']} socket_errors={res['socket_errors']} bad_body={res['bad_body']}"
                   if res["non_2xx"] or res["socket_errors"] or res["bad_body"] else "")
            log(f"  [{r + 1}/{args.rounds}] {c.name:<26} {res['rps']:>10,.0f} req/s  p50 {res['p50_ms']:.3f} ms"
                f"  p99 {res['p99_ms']:.3f} ms  other load {res['other_load_cores']:.2f}"
                f"{'  settled %.1f s' % res['settled_s'] if res['settled_s'] > 1 else ''}{bad}")
    lab.fsync_samples += measure_fsync(fsync_dir)
    lab.fsync = fsync_summary(lab.fsync_samples, fsync_dir)
    return cfgs


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 3)


def evaluate(cfgs: list[Config], fsync: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ratios of the medians (same run) and the targets of issues 13, 22 (item 9) and 27, each with its
    value, bound and PASS / FAIL (n/a when not measured; INFO for a figure reported without a bound)."""
    by = {c.name: c.summary() for c in cfgs}

    def rps(name: str) -> float | None:
        return by.get(name, {}).get("rps")

    def lat(name: str, k: str) -> float | None:
        return by.get(name, {}).get(k)

    def p99_ratio(a: str, b: str) -> float | None:
        return ratio(lat(a, "p99_ms"), lat(b, "p99_ms"))

    ratios: dict[str, Any] = {
        "tether_get/bare_get": ratio(rps("tether GET"), rps("bare GET")),
        "tether_get/mitm_get": ratio(rps("tether GET"), rps("mitm GET")),
        "tether_get/nginx_get": ratio(rps("tether GET"), rps("nginx GET")),
        "tether_get/direct_get": ratio(rps("tether GET"), rps("direct GET")),
        "tether_patch/bare_patch": ratio(rps("tether PATCH"), rps("bare PATCH")),
        "tether_patch/mitm_patch": ratio(rps("tether PATCH"), rps("mitm PATCH")),
        "tether_patch/nginx_patch": ratio(rps("tether PATCH"), rps("nginx PATCH")),
        "tether_dryrun/bare_patch": ratio(rps("tether dry-run PATCH"), rps("bare PATCH")),
        "bare_get/mitm_get": ratio(rps("bare GET"), rps("mitm GET")),
        "mcp_call/tether_get": ratio(rps("tether MCP tools/call"), rps("tether GET")),
        "p99 tether_get/bare_get": p99_ratio("tether GET", "bare GET"),
        "p99 tether_patch/bare_patch": p99_ratio("tether PATCH", "bare PATCH"),
        "p99 mcp_call/tether_get": p99_ratio("tether MCP tools/call", "tether GET"),
        "registry_sf/registry_10": ratio(rps("tether GET regSF"), rps("tether GET reg10")),
        "workers2/workers1 GET": ratio(rps("tether GET w2"), rps("tether GET")),
        "workers2/workers1 PATCH": ratio(rps("tether PATCH w2"), rps("tether PATCH")),
        "p99 workers2/workers1 GET": p99_ratio("tether GET w2", "tether GET"),
        "p99 workers2/workers1 PATCH": p99_ratio("tether PATCH w2", "tether PATCH"),
        "journal normal/full PATCH": ratio(rps("tether PATCH sync=normal"), rps("tether PATCH")),
        "journal tmpfs/full PATCH": ratio(rps("tether PATCH tmpfs"), rps("tether PATCH")),
        "postgresql/sqlite PATCH": ratio(rps("tether PATCH pg"), rps("tether PATCH")),
        "postgresql/sqlite GET": ratio(rps("tether GET pg"), rps("tether GET")),
    }

    def over(name: str, base: str, k: str) -> float | None:
        t, d = lat(name, k), lat(base, k)
        return round(t - d, 4) if t is not None and d is not None else None

    # latency added at one connection (p50/p99 minus the reference's, same run)
    added: dict[str, float | None] = {}
    for m in ("GET", "PATCH"):
        for k in ("p50_ms", "p99_ms"):
            added[f"{m} {k}"] = over(f"tether {m} c1", f"direct {m} c1", k)
    for k in ("p50_ms", "p99_ms"):
        added[f"GET {k} (store on tmpfs)"] = over("tether GET c1 tmpfs", "direct GET c1", k)
    for k in ("p50_ms", "p99_ms"):
        # the machine's own floor for a Python forwarder: what the bare one adds at one connection
        added[f"GET {k} (bare forwarder)"] = over("bare GET c1", "direct GET c1", k)
    for k in ("p50_ms", "p99_ms"):
        added[f"GET {k} over the bare forwarder"] = over("tether GET c1", "bare GET c1", k)
        added[f"MCP tools/call {k} over REST GET"] = over("tether MCP tools/call c1", "tether GET c1", k)
    for m in ("GET", "PATCH"):
        for k in ("p50_ms", "p99_ms"):
            added[f"{m} {k} (20 ms upstream)"] = over(f"tether {m} c1 20ms", f"direct {m} c1 20ms", k)
    for k in ("p50_ms", "p99_ms"):
        added[f"GET {k} (20 ms upstream, bare forwarder)"] = over("bare GET c1 20ms", "direct GET c1 20ms", k)
    ratios["added_latency_c1_ms"] = added

    targets: list[dict[str, Any]] = []

    def target(name: str, value: float | None, op: str, bound: float | None, note: str = "") -> None:
        if op == "info":
            status, shown = ("INFO" if value is not None else "n/a"), "reported"
        elif value is None or bound is None:
            status, shown = "n/a", f"{op} {'?' if bound is None else f'{bound:g}'}"
        else:
            ok = value >= bound if op == ">=" else value <= bound
            status, shown = ("PASS" if ok else "FAIL"), f"{op} {bound:g}"
        targets.append({"target": name, "value": value, "bound": shown, "status": status, "note": note})

    dry = next((c for c in cfgs if c.name == "tether dry-run PATCH"), None)
    dry_note = ""
    if dry is not None and dry.check and not dry.check.get("capture_active"):
        dry_note = ("capture NOT active: the dry-run write was forwarded to the upstream, so this measures a "
                    "forwarded write, not a capture")
    # 32 connections (issue 13, the p99 bounds of issue 27, the MCP door of issue 22)
    target("full-policy GET / bare forwarder", ratios["tether_get/bare_get"], ">=", 0.75)
    target("full-policy GET / mitmproxy", ratios["tether_get/mitm_get"], ">=", 5)
    target("full-policy PATCH (journal durable) / bare forwarder", ratios["tether_patch/bare_patch"], ">=", 0.6)
    target("dry-run capture / bare forwarder (PATCH)", ratios["tether_dryrun/bare_patch"], ">=", 0.6, dry_note)
    if dry_note and targets[-1]["status"] == "PASS":
        targets[-1]["status"] = "n/a"
    target("full-policy GET p99 / bare forwarder p99", ratios["p99 tether_get/bare_get"], "<=", 2)
    target("full-policy PATCH p99 / bare forwarder p99", ratios["p99 tether_patch/bare_patch"], "<=", 2)
    target("MCP tools/call / REST GET (req/s)", ratios["mcp_call/tether_get"], ">=", 0.7)
    # one connection
    target("c1: MCP tools/call p50 over REST GET (ms)", added["MCP tools/call p50_ms over REST GET"], "<=", 0.3)
    target("c1: GET p50 over the bare forwarder (ms)", added["GET p50_ms over the bare forwarder"], "<=", 0.4)
    target("c1, 20 ms upstream: GET p50 over direct (ms)", added["GET p50_ms (20 ms upstream)"], "<=", 0.3)
    target("c1, 20 ms upstream: GET p99 over direct (ms)", added["GET p99_ms (20 ms upstream)"], "<=", 1.0)
    target("c1, 20 ms upstream: bare forwarder GET p50 over direct (ms)",
           added["GET p50_ms (20 ms upstream, bare forwarder)"], "info", None,
           "the floor any Python forwarder pays on this machine, for reading the GET target")
    one_fsync = (fsync or {}).get("median_ms")
    target("c1, 20 ms upstream: durable PATCH p50 over direct (ms)", added["PATCH p50_ms (20 ms upstream)"], "<=",
           round(one_fsync + 0.3, 3) if one_fsync is not None else None,
           f"one fsync ({one_fsync:.3f} ms, measured in this run) + 0.3 ms" if one_fsync is not None else
           "one fsync was not measured")
    target("c1, 20 ms upstream: durable PATCH p99 over direct (ms)", added["PATCH p99_ms (20 ms upstream)"], "info",
           None)
    target("one fsync on the store's filesystem (ms, median)", one_fsync, "info", None,
           (fsync or {}).get("filesystem", ""))
    target("Salesforce registry / 10-capability registry", ratios["registry_sf/registry_10"], ">=", 0.95)
    # the store's bytes per request (issue 27: halve them): GET and PATCH against half the baseline
    for kind, name, bounded in (("GET", "tether GET", True), ("PATCH", "tether PATCH", True),
                                ("dry-run PATCH", "tether dry-run PATCH", False)):
        st = by.get(name, {}).get("store") or {}
        base = STORE_BASELINE_BYTES.get(kind) or 0
        note = (f"rows {st['stored_bytes_per_request']:,.0f} B ({st['journal_rows_per_request']:g} journal rows, "
                f"{st['other_bytes_per_request']:,.0f} B elsewhere); " if st else "")
        note += f"baseline {base:,.0f} B at {STORE_BASELINE_COMMIT}"
        target(f"store growth per {kind} (bytes)", st.get("store_growth_per_request"),
               "<=" if bounded and base else "info", round(base / 2) if bounded and base else None, note)
    # --workers 2 on this machine (issue 27: report)
    for m in ("GET", "PATCH"):
        target(f"--workers 2 / 1 worker, {m} req/s", ratios[f"workers2/workers1 {m}"], "info", None)
        p1, p2 = lat(f"tether {m}", "p99_ms"), lat(f"tether {m} w2", "p99_ms")
        target(f"--workers 2 {m} p99 (ms)", p2, "info", None, f"1 worker: {p1:.3f} ms" if p1 is not None else "")
    return ratios, targets


def print_report(lab: Lab, cfgs: list[Config], ratios: dict[str, Any], targets: list[dict[str, Any]],
                 probes: dict[str, Any]) -> None:
    log("\n" + "=" * 96)
    log(f"{'configuration':<28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}  {'errors':<7}{'other':<6} notes")
    log("-" * 96)
    group = None
    for c in cfgs:
        if c.group != group:
            group = c.group
            if group != "main":
                log(f"  -- {group}")
        s = c.summary()
        if c.skipped:
            reason = c.skipped.splitlines()[-1] if c.skipped else ""
            log(f"{c.name:<28}{'skipped':>10}{'':>18}  {'':<8} {reason[:90]}")
            continue
        if not c.runs:
            log(f"{c.name:<28}{'no data':>10}")
            continue
        errs = s["non_2xx"] + s["socket_errors"] + s["bad_body"]
        note = c.label
        if c.check and not c.check.get("ok", True):
            note = f"SANITY: status {c.check.get('status')} {c.check.get('body', c.check.get('error', ''))[:60]}"
        if "capture_active" in c.check:
            note += "; capture active" if c.check["capture_active"] else "; NOT captured (forwarded upstream)"
        log(f"{c.name:<28}{s['rps']:>10,.0f}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}  {errs:<7}"
            f"{s['other_load_cores_max']:<6.2f} {note}")
    log("-" * 96)
    log("errors: non-2xx answers + socket errors seen by wrk (+ MCP answers that were not a successful tool result); "
        "other: most CPU (cores) that processes outside the harness used during a kept run")
    if lab.fsync:
        f = lab.fsync
        log(f"one fsync on the store's filesystem {f['filesystem']}: median {f['median_ms']:.3f} ms "
            f"(p10 {f['p10_ms']:.3f}, p90 {f['p90_ms']:.3f}; {f['n']} fsyncs of a 4 KiB append, before and after the rounds)")
    stores = [(c.name, c.summary().get("store")) for c in cfgs if c.runs]
    stores = [(n, st) for n, st in stores if st]
    if stores:
        log("store per request (SQLite; divided by wrk's count of answers):")
        log(f"  {'configuration':<28}{'journal rows':>13}{'journal B':>11}{'record B':>10}{'other B':>9}"
            f"{'growth B':>10}{'files B':>10}")
        for n, st in stores:
            log(f"  {n:<28}{st['journal_rows_per_request']:>13.2f}{st['journal_bytes_per_request']:>11,.0f}"
                f"{st['record_bytes_per_request']:>10,.0f}{st['other_bytes_per_request']:>9,.0f}"
                f"{st['store_growth_per_request']:>10,.0f}{st['file_growth_per_request']:>10,.0f}")
        log("  journal B: all columns of the new journal rows; record B: their record column; other B: new rows of "
            "other tables (review items); growth: the store's pages; files: database + WAL on disk")
    log("ratios (medians of the rounds, same run):")
    for k, v in ratios.items():
        if k == "added_latency_c1_ms":
            for kk, vv in v.items():
                log(f"  added latency c1 {kk:<24} {'-' if vv is None else f'{vv:+.3f} ms'}")
        else:
            log(f"  {k:<36} {'-' if v is None else f'{v:.3f}'}")
    log("targets:")
    for t in targets:
        v = t["value"]
        vs = "-" if v is None else f"{v:.3f}"
        log(f"  [{t['status']:<4}] {t['target']:<58} {vs:>8} (target {t['bound']}){'  ' + t['note'] if t['note'] else ''}")
    for key, lines in gateway_log_excerpts(lab).items():
        log(f"  !! {key} logged {lines[0]} of errors/warnings:")
        for ln in lines[1:]:
            log(f"       {ln[:180]}")
    if probes:
        log("policy probes on the full-policy Tether (each should be refused):")
        for k, v in probes.items():
            flag = "ok " if v.get("as_expected") else "!! "
            log(f"  {flag}{k:<34} status {v.get('status')} {v.get('code') or v.get('error') or ''}")
    log("=" * 96)


def machine_info(nginx: str | None, wrk: str | None) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except OSError:
        pass
    vers: dict[str, Any] = {"python": platform.python_version()}
    for mod in ("aiohttp", "uvloop", "httptools", "aiosqlite", "orjson", "jwt", "yarl", "multidict"):
        try:
            m = __import__(mod)
            vers[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            vers[mod] = None
    if nginx:
        vers["nginx"] = run_text([nginx, "-v"]).replace("nginx version: ", "")
    if wrk:
        vers["wrk"] = run_text([wrk, "-v"]).splitlines()[0] if run_text([wrk, "-v"]) else "?"
    mexe = MITM_VENV / "bin" / "mitmdump"
    if mexe.exists():
        vers["mitmproxy"] = run_text([str(mexe), "--version"]).splitlines()[0].replace("Mitmproxy: ", "")
    commit = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--", "proxy", "adapters"])
    vers["tether_commit"] = commit + ("+dirty(proxy/adapters)" if dirty else "")
    return {"nproc": NPROC, "cpu_model": cpu, "memory": mem, "kernel": platform.release(),
            "pinning": {"taskset": bool(TASKSET), "wrk": LOAD_CPUS, "proxy": PROXY_CPUS, "multi_worker": MULTI_CPUS,
                        "upstream_nginx": "not pinned"},
            "versions": vers}


# --------------------------------------------------------------------------- soak


def run_soak(args: argparse.Namespace, lab: Lab, wrk: str) -> dict[str, Any]:
    srv = lab.start_tether("tether", "Tether, full policy (soak)")
    if srv.error:
        return {"error": srv.error}
    get_path = f"/api/contacts/{RECORD_ID}"
    script = lab.workdir / "soak.lua"
    h = tether_headers(write=True)
    h.pop("Content-Type")
    script.write_text(mixed_lua(get_path, get_path, h, PATCH_BODY))
    dur = args.soak_duration
    log(f"\nsoak: {dur:g} s of alternating GET/PATCH at c={args.connections}, RSS sampled every "
        f"{args.soak_interval:g} s")
    run_wrk(wrk, f"http://127.0.0.1:{srv.port}{get_path}", script, connections=args.connections, duration=5)
    argv = [wrk, "-t1", f"-c{args.connections}", f"-d{int(dur)}s", "--latency", "-s", str(script),
            f"http://127.0.0.1:{srv.port}{get_path}"]
    if LOAD_CPUS is not None:
        argv = [TASKSET, "-c", LOAD_CPUS, *argv]  # type: ignore[list-item]
    if NICE:
        argv = ["nice", "-n", str(NICE), *argv]
    out = lab.workdir / "soak-wrk.out"
    with open(out, "w") as fh:
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    lab.procs.procs["soak-wrk"] = p
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while p.poll() is None:
        samples.append((round(time.monotonic() - t0, 1), rss_kb(srv.pids)))
        time.sleep(args.soak_interval)
    samples.append((round(time.monotonic() - t0, 1), rss_kb(srv.pids)))
    m = re.search(r"^WRKJSON (\{.*\})$", out.read_text(), re.M)
    wres = json.loads(m.group(1)) if m else {}
    n = len(samples)
    base = statistics.median(s[1] for s in samples[max(1, n // 10): max(2, n // 5)])
    final = statistics.median(s[1] for s in samples[-max(1, n // 10):])
    growth = (final - base) / base if base else None
    db = Path(srv.info["store"])
    res = {
        "duration_s": dur, "connections": args.connections, "samples_kb": samples,
        "baseline_kb": base, "final_kb": final, "max_kb": max(s[1] for s in samples),
        "growth": round(growth, 4) if growth is not None else None,
        "requests": wres.get("requests"), "rps": round(wres["requests"] / (wres["duration_us"] / 1e6), 1) if wres else None,
        "non_2xx": wres.get("status"),
        "socket_errors": sum(wres.get(k, 0) for k in ("connect", "read", "write", "timeout")) if wres else None,
        "store_bytes": sum(f.stat().st_size for f in db.parent.glob(db.name + "*")) if db.exists() else None,
        "status": "PASS" if growth is not None and abs(growth) <= 0.10 else "FAIL",
        "rule": "median RSS of the last 10% of samples within ±10% of the median of the 10%-20% window",
    }
    log(f"soak: RSS baseline {base / 1024:.1f} MiB -> final {final / 1024:.1f} MiB "
        f"(max {res['max_kb'] / 1024:.1f} MiB), growth {growth:+.1%}: [{res['status']}] memory flat (±10%)")
    log(f"soak: {res['requests']} requests, {res['rps']} req/s, non-2xx {res['non_2xx']}, "
        f"socket errors {res['socket_errors']}, store {res['store_bytes']} bytes")
    return res


# --------------------------------------------------------------------------- profile


def summarise_speedscope(path: Path, top: int) -> dict[str, Any]:
    """Per thread: active seconds, and the top frames by own and by cumulative time (percent of that
    thread's active samples; frames present in every sample — the interpreter's trunk — are left out)."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]

    def name(i: int) -> str:
        f = frames[i]
        file = f.get("file", "")
        for prefix in (str(ROOT) + "/", "/site-packages/", "/lib/python3."):
            if prefix in file:
                file = file.split(prefix, 1)[1]
        return f"{f['name']} ({file}:{f.get('line', '')})"

    threads = []
    for prof in doc["profiles"]:
        own: dict[int, float] = {}
        cum: dict[int, float] = {}
        total = 0.0
        for stack, w in zip(prof.get("samples", []), prof.get("weights", [])):
            total += w
            if stack:
                own[stack[-1]] = own.get(stack[-1], 0) + w
            for f in set(stack):
                cum[f] = cum.get(f, 0) + w
        if not total:
            continue

        def table(d: dict[int, float], trunk: bool) -> list[tuple[str, float]]:
            rows = sorted(d.items(), key=lambda kv: -kv[1])
            if trunk:
                rows = [kv for kv in rows if kv[1] < 0.985 * total]
            return [(name(i), round(100 * v / total, 1)) for i, v in rows[:top]]

        threads.append({"thread": prof.get("name", "?"), "active_s": round(total, 2),
                        "own": table(own, False), "cumulative": table(cum, True)})
    threads.sort(key=lambda t: -t["active_s"])
    return {"unit": doc["profiles"][0].get("unit") if doc["profiles"] else None, "threads": threads}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) per thread of a process, from /proc (names may repeat: tid appended)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[f"{comm}[{tid}]"] = (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        pass
    return out


def run_profile(args: argparse.Namespace, lab: Lab, wrk: str) -> dict[str, Any]:
    pyspy = ensure_pyspy(not args.no_install)
    srv = lab.start_tether("tether", "Tether, full policy, MCP door on (profiled)", mcp=True)
    if srv.error:
        return {"error": srv.error}
    path = f"/api/contacts/{RECORD_ID}"
    out: dict[str, Any] = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    mh, mb = mcp_call()
    loads = (("get", "GET", tether_headers(), None, path),
             ("patch", "PATCH", tether_headers(write=True), PATCH_BODY, path),
             ("dryrun", "PATCH", tether_headers(DRY_AGENT, write=True), PATCH_BODY, path),
             ("mcp", "POST", mh, mb, "/mcp"))  # the MCP door (main listener): tools/call of the GET capability
    for kind, method, headers, body, target in loads:
        if args.profile_only and kind not in args.profile_only:
            continue
        script = lab.workdir / f"profile-{kind}.lua"
        script.write_text(lua_script(method, headers, body))
        port = int(srv.info["main_port"]) if kind == "mcp" else srv.port
        url = f"http://127.0.0.1:{port}{target}"
        run_wrk(wrk, url, script, connections=args.connections, duration=3)
        dst = RESULTS / f"profile-{kind}.speedscope.json"
        dur = int(args.profile_duration)
        spy = subprocess.Popen([pyspy, "record", "-p", str(srv.pids[0]), "-d", str(dur + 2), "-r", "250",
                                "--function", *(["--gil"] if args.profile_gil else []),
                                "--format", "speedscope", "-o", str(dst)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lab.procs.procs[f"py-spy-{kind}"] = spy
        time.sleep(1)
        cpu0 = thread_cpu(srv.pids[0])
        res = run_wrk(wrk, url, script, connections=args.connections, duration=dur)
        cpu1 = thread_cpu(srv.pids[0])
        spy_out, _ = spy.communicate(timeout=dur + 60)
        lab.procs.procs.pop(f"py-spy-{kind}", None)
        if not dst.exists():
            out[kind] = {"error": f"py-spy produced nothing: {spy_out.strip()[-500:]}"}
            log(f"  ! profile {kind}: {out[kind]['error']}")
            continue
        summ = summarise_speedscope(dst, args.profile_top)
        import gzip

        (RESULTS / f"profile-{kind}.speedscope.json.gz").write_bytes(gzip.compress(dst.read_bytes(), 9))
        summ["wrk_under_profiler"] = res
        summ["thread_cpu_s"] = {k: round(v - cpu0.get(k, 0), 2) for k, v in cpu1.items() if v - cpu0.get(k, 0) > 0.05}
        summ["load_s"] = dur
        summ["file"] = str(dst.relative_to(ROOT))
        out[kind] = summ
        log(f"\nprofile {kind}: {res['rps']:,.0f} req/s under py-spy for {dur} s -> {dst.relative_to(ROOT)}")
        log("  CPU seconds per thread (from /proc): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                              summ["thread_cpu_s"].items()))
        for th in summ["threads"]:
            log(f"  thread {th['thread']}: active {th['active_s']:.1f} s (py-spy, non-idle samples)")
            log("    own time (% of this thread's active samples):")
            for n, pct in th["own"]:
                log(f"      {pct:5.1f}%  {n}")
            log("    cumulative:")
            for n, pct in th["cumulative"]:
                log(f"      {pct:5.1f}%  {n}")
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Tether benchmark harness (issues 13, 22, 27); see bench/README.md")
    ap.add_argument("--quick", action="store_true", help="smoke check: 1 round x 3 s (results: quick.json)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per measurement (default 10; --quick 3)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per configuration (default 2; --quick 1)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a run again (at most this many times) when other processes used more than "
                         "--max-other-load cores during it (default 2)")
    ap.add_argument("--max-other-load", type=float, default=0.15,
                    help="CPU (in cores) that processes outside the harness may use during a run (default 0.15)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run wrk and every server with this niceness (e.g. -10 as root on a shared machine, "
                         "to win the CPU from other people's jobs; default 0: off)")
    ap.add_argument("--only", action="append", metavar="REGEX", help="only configurations whose name matches")
    ap.add_argument("--profile-only", action="append", choices=("get", "patch", "dryrun", "mcp"),
                    help="with --profile: only these loads (repeatable; default all four)")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: sample only the thread holding the GIL (py-spy --gil): Python's "
                         "own work, without the time threads spend waiting for the GIL")
    ap.add_argument("--soak", action="store_true", help="run the memory soak instead of the matrix")
    ap.add_argument("--soak-duration", type=float, default=300, help="soak seconds (default 300)")
    ap.add_argument("--soak-interval", type=float, default=5, help="RSS sampling interval (default 5 s)")
    ap.add_argument("--profile", action="store_true", help="profile Tether with py-spy instead of the matrix")
    ap.add_argument("--profile-duration", type=float, default=20, help="seconds per profiled load (default 20)")
    ap.add_argument("--profile-top", type=int, default=25, help="rows in the profile tables")
    ap.add_argument("--no-install", action="store_true", help="never install missing tools")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder (logs, rules, stores)")
    ap.add_argument("--output", help="results file (default bench/results/latest.json, quick.json, soak-latest.json"
                                     " or profile-latest.json)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    global NICE
    NICE = args.nice
    mode = "soak" if args.soak else "profile" if args.profile else "quick" if args.quick else "full"

    log(f"tether bench ({mode}) — {NPROC} cores; wrk on cpu {LOAD_CPUS}, proxies on cpu {PROXY_CPUS}"
        + ("" if TASKSET else " (taskset missing: nothing pinned)"))
    install = not args.no_install
    wrk = ensure_tool("wrk", ["wrk"], install=install)
    nginx = ensure_tool("nginx", ["nginx-light", "nginx"], install=install)
    try:
        import aiohttp  # noqa: F401
        import uvloop  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"bench: run it with the project's Python (e.g. /work/venv/bin/python): {exc}")

    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    lab = Lab(args, workdir)
    lab.nginx = nginx

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = _dt.datetime.now(_dt.timezone.utc)
    doc: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "mode": mode,
                           "machine": machine_info(nginx, wrk)}
    try:
        lab.start_upstream()
        if args.soak:
            doc["soak"] = run_soak(args, lab, wrk)
            default_out = RESULTS / "soak-latest.json"
        elif args.profile:
            doc["profile"] = run_profile(args, lab, wrk)
            default_out = RESULTS / "profile-latest.json"
        else:
            doc["settings"] = {"nice": args.nice, "retries": args.retries, "max_other_load": args.max_other_load,
                               "rounds": args.rounds, "duration_s": args.duration, "connections": args.connections,
                               "warmup_s": args.warmup, "wrk_threads": 1, "patch_body_bytes": len(PATCH_BODY),
                               "upstream_body_bytes": len(UPSTREAM_BODY)}
            cfgs = run_matrix(args, lab, wrk)
            probes = policy_probe(lab)
            ratios, targets = evaluate(cfgs, lab.fsync)
            print_report(lab, cfgs, ratios, targets, probes)
            doc["configs"] = {c.name: c.summary() for c in cfgs}
            doc["ratios"] = ratios
            doc["targets"] = targets
            doc["fsync"] = lab.fsync
            doc["policy_probes"] = probes
            doc["servers"] = {k: {"label": s.label, "error": s.error,
                                  "info": {kk: vv for kk, vv in s.info.items() if kk != "banner"}}
                              for k, s in lab.servers.items()}
            doc["gateway_log_warnings"] = gateway_log_excerpts(lab)
            default_out = RESULTS / ("quick.json" if args.quick else "latest.json")
        doc["elapsed_s"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
        dst = Path(args.output) if args.output else default_out
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"results written to {dst}")
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        lab.close()
        if args.keep_workdir:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def gateway_log_excerpts(lab: Lab) -> dict[str, list[str]]:
    """Warnings and errors the Tether processes logged during the run: count, then one line per kind
    (message with request ids removed, and the exception's last line)."""
    out: dict[str, list[str]] = {}
    for key in lab.servers:
        if not key.startswith("tether"):
            continue
        kinds: dict[str, int] = {}
        total = 0
        for ln in lab.procs.output(key).splitlines():
            if not ('"level":"error"' in ln or '"level":"warning"' in ln or ln.startswith("Traceback")):
                continue
            total += 1
            try:
                doc = json.loads(ln)
                msg = re.sub(r"\b[0-9a-f]{32}\b", "<id>", str(doc.get("msg", "")))
                exc = str(doc.get("exc", "")).strip().splitlines()
                kind = f"{doc.get('level')}: {msg}" + (f" — {exc[-1][:200]}" if exc else "")
            except ValueError:
                kind = ln[:240]
            kinds[kind] = kinds.get(kind, 0) + 1
        if total:
            out[key] = [f"{total} lines"] + [f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:8]]
    return out


if __name__ == "__main__":
    sys.exit(main())
