"""One gateway, many processes (issue 24): what an operator sets holds across workers and replicas.

Every test runs twice, on the two multi-process shapes, as real ``python -m proxy serve`` processes:

* ``workers2`` — one gateway with ``server.workers: 2`` on one SQLite file; each request on a new
  connection, so the kernel (SO_REUSEPORT) spreads them over both workers;
* ``replicas2`` — two gateways on one PostgreSQL schema; requests alternate between them.

What each shows was measured on the code before (the issue's table): rate limits doubled, quarantines
late and local, releases undone, promotions seen seconds later, quota signals ignored, dead workers not
restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.config import parse_rules
from proxy.policy.identity import mint_token
from proxy.store import open_store
from tests.conftest import base_rules, drop_schema, new_pg_url, pg_unavailable
from tests.fakes import FakeUpstream
from tests.procs import ROOT, GatewayProcess, run_cli

pytestmark = [pytest.mark.slow]

TOPOLOGIES = [pytest.param("workers2", id="workers2-sqlite"),
              pytest.param("replicas2", id="replicas2-postgresql", marks=pytest.mark.postgres)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Two:
    """Two processes of one gateway, and a client that spreads requests over them."""

    def __init__(self, kind: str, procs: list[GatewayProcess], rules: dict[str, Any], store: str) -> None:
        self.kind = kind
        self.procs = procs
        self.rules = rules
        self.store = store
        ident = parse_rules(rules).identity
        self._ident = ident
        self._next = itertools.count()

    def token(self, agent: str = "bot", reviewer: str | None = None) -> str:
        if reviewer:
            return mint_token(self._ident, reviewer, roles=[self._ident.reviewer_role])
        return mint_token(self._ident, agent)

    def bases(self, upstream: str = "crm") -> list[str]:
        """Where to send: one URL per process (replicas), or the workers' one shared URL."""
        return [p.listener(upstream) for p in self.procs]

    def base(self, upstream: str = "crm") -> str:
        urls = self.bases(upstream)
        return urls[next(self._next) % len(urls)]

    async def request(self, method: str, path: str, *, upstream: str = "crm", base: str | None = None,
                      agent: str = "bot", **kw: Any) -> tuple[int, dict[str, str], Any]:
        """A new connection per request (workers: the kernel picks one for each)."""
        h = {"Authorization": f"Bearer {self.token(agent)}", "X-Tether-Intent": "many processes"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.request(method, f"{base or self.base(upstream)}{path}", headers=h, **kw) as r:
                body = await r.read()
                try:
                    doc = json.loads(body) if body else None
                except ValueError:
                    doc = None
                return r.status, dict(r.headers), doc

    async def admin(self, method: str, path: str, *, proc: int = 0, **kw: Any) -> tuple[int, Any]:
        h = {"Authorization": f"Bearer {self.token(reviewer='rita')}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=30)) as s:
            async with s.request(method, f"{self.procs[proc].admin_url}{path}", headers=h, **kw) as r:
                return r.status, await r.json()

    async def journal(self) -> list[dict[str, Any]]:
        s = open_store(self.store)
        await s.open()
        try:
            return [r.record() | {"seq": r.seq} for r in await s.journal_query(limit=1_000_000)]
        finally:
            await s.close()


def wait_for_banners(proc: GatewayProcess, n: int, timeout: float = 30.0) -> None:
    """The first worker's banner was read by start(); wait for the other workers' (they print one each)."""
    assert proc.proc is not None and proc.proc.stdout is not None
    seen = 1
    deadline = time.monotonic() + timeout
    while seen < n and time.monotonic() < deadline:
        line = proc.read_line(deadline)  # never blocks past the deadline
        if line is None:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {proc.log()}")
            break
        if '"event": "ready"' in line or '"event":"ready"' in line:
            seen += 1
    if seen < n:
        raise RuntimeError(f"only {seen} of {n} workers ready ({proc.pipe_state()}): {proc.log()}")


def worker_pids(parent: int) -> list[int]:
    """The parent's workers (named tether-worker; its short-lived store helpers are tether-helper)."""
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "tether-worker":
                    out.append(pid)
        except OSError:
            pass
    return out


StartTwo = Callable[..., Awaitable[Two]]


@pytest.fixture
async def two(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StartTwo]:
    kind = request.param
    started: list[GatewayProcess] = []
    schemas: list[str] = []

    async def start(make_rules: Callable[[str], dict[str, Any]], *, store_kind: str | None = None,
                    workers: int = 2) -> Two:
        backend = store_kind or ("sqlite" if kind == "workers2" else "postgresql")
        if backend == "postgresql":
            reason = pg_unavailable()
            if reason:
                pytest.skip(reason)
            store, schema = new_pg_url()
            schemas.append(schema)
        else:
            store = str(tmp_path / "tether.db")
        rules = make_rules(store)
        rules["server"]["grace_period"] = 1
        if kind == "workers2":
            rules["server"].update(workers=workers, listen=f"127.0.0.1:{free_port()}",
                                   admin_listen=f"127.0.0.1:{free_port()}")
            d = tmp_path / "workers"
            d.mkdir(exist_ok=True)
            p = GatewayProcess(rules, d)
            await asyncio.to_thread(p.start, 40.0)
            started.append(p)
            await asyncio.to_thread(wait_for_banners, p, workers)
            procs = [p]
        else:
            procs = []
            for i in range(2):
                d = tmp_path / f"replica-{i}"
                d.mkdir(exist_ok=True)
                procs.append(GatewayProcess(rules, d))
            await asyncio.gather(*(asyncio.to_thread(p.start, 40.0) for p in procs))
            started.extend(procs)
        return Two(kind, procs, rules, store)

    yield start
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))
    for schema in schemas:
        drop_schema(schema)


def budget_rules(upstream: FakeUpstream) -> Callable[[str], dict[str, Any]]:
    def make(store: str) -> dict[str, Any]:
        rules = base_rules(upstream.url, store)
        rules["governance"] = {"error_budget": {"window": "1h", "max_bad_ratio": 0.5, "min_requests": 10}}
        rules["agents"]["bot"]["grants"] = ["contact.read", {"capability": "contact.update", "mode": "live"},
                                            "contact.create"]
        return rules
    return make


# --------------------------------------------------------------------------- 1. rate limits


@pytest.mark.parametrize("two", TOPOLOGIES, indirect=True)
async def test_a_rate_limit_is_one_budget_across_processes(two, upstream):
    def make(store: str) -> dict[str, Any]:
        rules = base_rules(upstream.url, store)
        rules["agents"]["bot"]["rate_limit"] = {"requests_per_minute": 30}
        return rules

    g = await two(make)
    t0 = time.monotonic()
    statuses = [(await g.request("GET", f"/api/contacts/{i}"))[0] for i in range(120)]
    elapsed = time.monotonic() - t0
    reached = [r for r in upstream.received if r.path.startswith("/api/contacts/")]
    # one bucket of 30 (plus what refilled at 0.5/s while the test ran), not one per process (60 before)
    assert 27 <= len(reached) <= 30 + elapsed * 0.5 + 1, (len(reached), elapsed)
    assert statuses.count(429) == 120 - len(reached)
    assert len({r.peer for r in reached}) >= 2  # both processes forwarded some (one upstream connection each)


# --------------------------------------------------------------------------- 2. governance


@pytest.mark.parametrize("two", TOPOLOGIES, indirect=True)
async def test_the_error_budget_counts_every_process_and_a_quarantine_holds_everywhere(two, upstream):
    g = await two(budget_rules(upstream))
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    upstream.fail("PATCH", "/api/contacts", 500, times=10_000)
    # bad writes, spread: the budget counts every process's outcomes
    first = None
    for i in range(40):
        status, headers, _ = await g.request("PATCH", "/api/contacts/1", json={"name": f"bad {i}"})
        if headers.get("X-Tether-Quarantined") == "true":
            first = i
            break
        assert status == 500
    live_bad = len(upstream.seen("PATCH"))
    assert first is not None, "never quarantined"
    assert live_bad <= 12, f"{live_bad} bad writes went live (min_requests 10; 15 and 19 before)"
    # and every process governs the agent within 100 ms (the other kept forwarding for 1.0-1.4 s before)
    await asyncio.sleep(0.2)
    for i in range(10):
        status, headers, _ = await g.request("PATCH", "/api/contacts/1", json={"name": f"later {i}"})
        assert headers.get("X-Tether-Quarantined") == "true" and "X-Tether-Dry-Run" in headers, (i, status)
    assert len(upstream.seen("PATCH")) == live_bad
    events = [x for x in await g.journal() if x["kind"] == "governance" and x.get("event") == "quarantine"]
    assert len(events) == 1, events  # one quarantine, one journal event


@pytest.mark.parametrize("two", TOPOLOGIES, indirect=True)
async def test_a_release_sticks_on_every_process(two, upstream):
    def make(store: str) -> dict[str, Any]:
        rules = budget_rules(upstream)(store)
        rules["governance"]["error_budget"]["min_requests"] = 4
        return rules

    g = await two(make)
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    for _ in range(16):  # denials (DELETE is not granted), spread: every process sees several
        assert (await g.request("DELETE", "/api/contacts/1"))[0] == 403
    await asyncio.sleep(0.3)
    assert (await g.request("PATCH", "/api/contacts/1", json={"name": "x"}))[1].get("X-Tether-Quarantined")
    env = {"TETHER_ADMIN_URL": g.procs[0].admin_url, "TETHER_ADMIN_TOKEN": g.token(reviewer="rita")}
    r = await asyncio.to_thread(run_cli, "agents", "release", "bot", "--reason", "prompt fixed", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # the window restarts for every process (before: another process re-quarantined it 1.3 s later)
    await asyncio.sleep(3.0)  # past the 2 s refresh loop, with no traffic
    for proc in range(len(g.procs)):
        for _ in range(4 if g.kind == "workers2" else 1):  # workers: the admin port lands on either
            _, doc = await g.admin("GET", "/api/agents", proc=proc)
            bot = [a for a in doc["agents"] if a["agent"] == "bot"][0]
            assert bot["quarantined"] is None and bot["sli"]["bad"] == 0, bot
    for i in range(6):
        status, headers, _ = await g.request("PATCH", "/api/contacts/1", json={"name": f"fine {i}"})
        assert status == 200 and "X-Tether-Quarantined" not in headers
    events = [x.get("event") for x in await g.journal() if x["kind"] == "governance"]
    assert events.count("quarantine") == 1 and events.count("release") == 1, events


@pytest.mark.parametrize("two", TOPOLOGIES, indirect=True)
async def test_promotions_and_demotions_are_in_force_on_every_process_at_once(two, upstream):
    g = await two(budget_rules(upstream))
    delays = []
    for to in ("live", "dry_run", "live"):  # before: the other process followed 1.9-2.0 s later
        status, _ = await g.admin("POST", "/api/promotions", json={
            "agent": "bot", "capability": "contact.create", "to": to, "force": True, "reason": "pilot"})
        assert status == 201
        t0 = time.monotonic()
        for base in g.bases():
            in_a_row, last_wrong = 0, t0
            while in_a_row < (6 if g.kind == "workers2" else 1):
                status, headers, _ = await g.request("POST", "/api/contacts", base=base, json={"name": to})
                assert status == 201
                if ("X-Tether-Dry-Run" in headers) == (to == "dry_run"):
                    in_a_row += 1
                else:
                    in_a_row, last_wrong = 0, time.monotonic()
                assert time.monotonic() - t0 < 10, f"mode {to} not in force after 10 s"
            delays.append(last_wrong - t0)
    assert max(delays) < 0.5, delays


# --------------------------------------------------------------------------- 3. upstream quota


@pytest.mark.parametrize("two", TOPOLOGIES, indirect=True)
async def test_the_company_quota_is_kept_by_every_process(two, upstream):
    sf, hs, other = FakeUpstream(), FakeUpstream(), FakeUpstream()
    for fake in (sf, hs, other):
        await fake.start()
    try:
        def make(store: str) -> dict[str, Any]:
            rules = base_rules(upstream.url, store)
            rules["upstreams"]["crm"]["quota"] = {"reserve": "20%"}
            cred = {"type": "bearer", "token": {"value": "t"}}
            rules["upstreams"].update({
                "sf": {"url": sf.url, "adapter": "salesforce", "credentials": cred, "quota": {"reserve": "20%"}},
                "hs": {"url": hs.url, "adapter": "hubspot", "credentials": cred},
                "other": {"url": other.url, "credentials": cred}})
            rules["capabilities"].update({
                "sf.read": {"upstream": "sf", "method": "GET",
                            "path": "/services/data/{version}/sobjects/Account/{id}"},
                "hs.read": {"upstream": "hs", "method": "GET", "path": "/crm/v3/objects/contacts/{contactId}"},
                "other.read": {"upstream": "other", "method": "GET", "path": "/things/{id}"}})
            rules["agents"]["bot"]["grants"] += ["sf.read", "hs.read", "other.read"]
            return rules

        g = await two(make)
        cases = [
            ("crm", upstream, "/api/contacts/1", {"RateLimit-Policy": '"day";q=1000;w=86400',
                                                  "RateLimit": '"day";r=150;t=3600'}, 3000),
            ("sf", sf, "/services/data/v59.0/sobjects/Account/001000000000001AAA",
             {"Sforce-Limit-Info": "api-usage=14999/15000"}, 60),
            ("hs", hs, "/crm/v3/objects/contacts/51001",
             {"X-HubSpot-RateLimit-Max": "100", "X-HubSpot-RateLimit-Remaining": "0",
              "X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}, 5),
            ("other", other, "/things/1", {"Retry-After": "60"}, 50),
        ]
        for name, fake, path, headers, min_wait in cases:
            if name == "other":
                fake.fail("GET", "/things", 429, times=1)
            else:
                assert (await g.request("GET", path, upstream=name))[0] < 500  # before: quota fine
            fake.response_headers = headers
            status, _, _ = await g.request("GET", path, upstream=name)  # this answer says: spent / wait
            assert status in (200, 404, 429)
            seen = len(fake.received)
            await asyncio.sleep(0.3)
            for _ in range(6):  # every process answers itself now, without forwarding
                status, rh, doc = await g.request("GET", path, upstream=name)
                assert status == 429 and doc["error"]["code"] == "upstream_quota", (name, status, doc)
                assert int(rh["Retry-After"]) >= min_wait, (name, rh.get("Retry-After"))
            assert len(fake.received) == seen, f"{name}: forwarded while its quota was spent"
        # one alert per block (whichever process saw it first), and the state is visible
        alerts = [x for x in await g.journal() if x.get("event") == "alert" and x.get("alert") == "quota_low"]
        assert sorted(a["upstream"] for a in alerts) == ["crm", "hs", "other", "sf"], alerts
        env = {"TETHER_ADMIN_URL": g.procs[0].admin_url, "TETHER_ADMIN_TOKEN": g.token(reviewer="rita")}
        r = await asyncio.to_thread(run_cli, "agents", "status", env=env)
        assert "upstream sf quota: BLOCKED" in r.stdout and "api-usage 1/15000 left" in r.stdout, r.stdout
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{g.procs[0].admin_url}/metrics",
                             headers={"Authorization": f"Bearer {g.token(reviewer='rita')}"}) as resp:
                text = await resp.text()
        assert 'tether_upstream_quota_remaining{upstream="sf",window="api-usage"} 1.0' in text
    finally:
        for fake in (sf, hs, other):
            await fake.stop()


# --------------------------------------------------------------------------- 4. supervision


@pytest.mark.parametrize("two", [pytest.param("workers2", id="workers2")], indirect=True)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_a_dead_worker_is_restarted_and_journaled(two, upstream, backend):
    g = await two(lambda store: base_rules(upstream.url, store), store_kind=backend)
    parent = g.procs[0].pid
    before = worker_pids(parent)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = worker_pids(parent)
        if len(now) == 2 and before[0] not in now:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"worker not restarted: {worker_pids(parent)}; {g.procs[0].log()}")
    await asyncio.sleep(1.5)  # the new worker is listening
    statuses = [(await g.request("GET", "/api/contacts"))[0] for _ in range(8)]
    assert statuses == [200] * 8
    rows = await g.journal()
    died = [x for x in rows if x.get("event") == "worker_died"]
    assert len(died) == 1 and died[0]["pid"] == before[0] and died[0]["status"] == "killed by signal 9"
    assert [x for x in rows if x.get("event") == "worker_restarted"]
    started = [x for x in rows if x.get("event") == "started"]
    assert len(started) == 3  # two workers, then the replacement


@pytest.mark.parametrize("two", [pytest.param("workers2", id="workers2")], indirect=True)
async def test_a_worker_that_keeps_dying_stops_the_gateway_with_the_reason(two, upstream):
    g = await two(lambda store: base_rules(upstream.url, store))
    p = g.procs[0]
    assert p.proc is not None
    survivor = worker_pids(p.pid)[1]
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while p.proc.poll() is None and time.monotonic() < deadline:
        for pid in worker_pids(p.pid):
            if pid != survivor and pid not in killed:  # the first worker, then each replacement
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        await asyncio.sleep(0.05)
    assert p.proc.poll() == 1, p.log()
    log = p.log()
    assert "keeps dying" in log and "killed by signal 9" in log, log[-2000:]
    assert len(killed) == 5
    rows = await g.journal()
    assert [x for x in rows if x.get("event") == "workers_stopped"]
    assert len([x for x in rows if x.get("event") == "worker_died"]) == 4
    assert len([x for x in rows if x.get("event") == "stopped"]) >= 1  # the survivor drained and stopped


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone: it serves nothing and holds no port)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("two", [pytest.param("workers2", id="workers2")], indirect=True)
async def test_workers_stop_when_their_supervisor_is_killed(two, upstream):
    """A supervisor killed with SIGKILL cannot pass SIGTERM on: its workers get it from the kernel
    (parent-death signal), drain and stop, instead of serving on as orphans nobody restarts."""
    g = await two(lambda store: base_rules(upstream.url, store))
    p = g.procs[0]
    assert p.proc is not None
    workers = worker_pids(p.pid)
    assert len(workers) == 2 and all(_alive(w) for w in workers)
    os.kill(p.pid, signal.SIGKILL)
    p.proc.wait(5)
    deadline = time.monotonic() + 15
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [w for w in workers if _alive(w)], p.log()[-2000:]
    stopped = [x for x in await g.journal() if x.get("event") == "stopped"]
    assert len(stopped) == 2, p.log()[-2000:]  # each drained and journaled its stop


def test_each_worker_announces_itself_on_a_line_of_its_own():
    """The workers share the supervisor's stdout. Under PYTHONUNBUFFERED (set on many CI machines and
    containers) ``print`` wrote a banner and its newline as two writes, and two workers starting together
    produced ``{...}{...}`` on one line: the reader never saw a parseable ready banner (a start that
    stalled for 40 s in CI). Two processes announcing 3,000 lines each at once must leave 6,000 JSON
    documents, one per line (with ``print`` here, hundreds come out joined)."""
    code = """if True:
        import os
        from proxy.app.gateway import announce
        pid = os.fork()
        for i in range(3000):
            announce('{"event": "ready", "worker": %d, "n": %d, "pad": "%s"}' % (pid == 0, i, "x" * 150))
        if pid:
            os.waitpid(pid, 0)
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    lines = out.stdout.decode().split("\n")
    assert lines.pop() == ""
    docs = [json.loads(line) for line in lines]  # a joined line fails here
    assert sorted((d["worker"], d["n"]) for d in docs) == [(w, n) for w in (0, 1) for n in range(3000)]


@pytest.mark.parametrize("two", [pytest.param("workers2", id="workers2")], indirect=True)
async def test_a_worker_that_cannot_drain_is_killed_after_the_grace_period(two, upstream):
    """A worker that does not stop (here: SIGSTOPped, as wedged as a process can be) must not keep the
    gateway from exiting: the supervisor kills it once the grace period and a margin are over."""
    g = await two(lambda store: base_rules(upstream.url, store))
    p = g.procs[0]
    assert p.proc is not None
    wedged, other = worker_pids(p.pid)
    os.kill(wedged, signal.SIGSTOP)
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(p.proc.wait, 30)
    took = time.monotonic() - t0
    assert rc == 1, p.log()[-2000:]
    assert 5.0 <= took < 15, took  # grace period 1 s + 5 s margin, not forever
    assert f"(pid {wedged}) did not stop within the grace period" in p.log(), p.log()[-2000:]
    assert not _alive(wedged) and not _alive(other)
    # (whether the other one could journal its stop depends on the instant the wedged one was frozen:
    # stopped inside a store transaction, it holds the SQLite write lock — fail closed, as it should)
