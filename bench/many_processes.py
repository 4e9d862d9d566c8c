"""Re-measure issue 24's table: what an operator sets as a limit, with one process, ``--workers 2`` on one
SQLite file, and two replicas on one PostgreSQL schema — tried as an operator would, a counting upstream
behind real ``python -m proxy serve`` processes, requests spread (a new connection each for workers,
alternating for replicas).

    python bench/many_processes.py [--only one|workers2|replicas2] [--json FILE]

It needs the test helpers (``pip install -e '.[test]'``) and, for the replicas column, the PostgreSQL
server the tests use (``$TETHER_TEST_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``; a
schema of its own, dropped at the end). Timings are wall-clock on whatever else the machine is doing:
read them as orders of magnitude. The assertions live in ``tests/test_many_processes.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import base_rules, drop_schema, new_pg_url, pg_unavailable  # noqa: E402
from tests.fakes import FakeUpstream  # noqa: E402
from tests.procs import GatewayProcess  # noqa: E402
from tests.test_many_processes import Two, free_port, wait_for_banners, worker_pids  # noqa: E402


async def start(kind: str, make_rules: Any, tmp: Path) -> tuple[Two, list[GatewayProcess], str | None]:
    schema = None
    if kind == "replicas2":
        store, schema = new_pg_url()
    else:
        store = str(tmp / f"t-{time.monotonic_ns()}.db")
    rules = make_rules(store)
    rules["server"]["grace_period"] = 1
    if kind == "workers2":
        rules["server"].update(workers=2, listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}")
    n = 2 if kind == "replicas2" else 1
    procs = []
    for i in range(n):
        d = tmp / f"{kind}-{time.monotonic_ns()}-{i}"
        d.mkdir()
        procs.append(GatewayProcess(rules, d))
    await asyncio.gather(*(asyncio.to_thread(p.start, 60.0) for p in procs))
    if kind == "workers2":
        await asyncio.to_thread(wait_for_banners, procs[0], 2)
    return Two(kind, procs, rules, store), procs, schema


async def stop(procs: list[GatewayProcess], schema: str | None) -> None:
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
    if schema:
        drop_schema(schema)


async def governed_everywhere(g: Two, check: Any, method: str, path: str, limit: float = 10.0) -> tuple[float, int]:
    """Seconds until ``check(headers)`` holds for writes on every process, and how many did not meanwhile."""
    t0 = time.monotonic()
    last_wrong, wrong = t0, 0
    for base in g.bases():
        streak = 0
        while streak < (6 if g.kind == "workers2" else 1) and time.monotonic() - t0 < limit:
            _, headers, _ = await g.request(method, path, base=base, json={"name": "probe"})
            if check(headers):
                streak += 1
            else:
                streak, last_wrong, wrong = 0, time.monotonic(), wrong + 1
    return last_wrong - t0, wrong


async def measure(kind: str, tmp: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        await _measure(kind, tmp, out)
    except Exception as exc:  # noqa: BLE001 - e.g. a Tether without these config keys: keep what was measured
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


async def _measure(kind: str, tmp: Path, out: dict[str, str]) -> None:
    up = await FakeUpstream().start()
    try:
        # 1. requests_per_minute: 30, 120 quick requests
        def rl(store: str) -> dict[str, Any]:
            r = base_rules(up.url, store)
            r["agents"]["bot"]["rate_limit"] = {"requests_per_minute": 30}
            return r

        g, procs, schema = await start(kind, rl, tmp)
        try:
            for i in range(120):
                await g.request("GET", f"/api/contacts/{i}")
            out["rate"] = f"{len(up.seen('GET', '/api/contacts/'))} reach the upstream"
        finally:
            await stop(procs, schema)

        # 2-4. quarantine (min_requests 10), release, promotion
        def gov(store: str) -> dict[str, Any]:
            r = base_rules(up.url, store)
            r["governance"] = {"error_budget": {"window": "1h", "max_bad_ratio": 0.5, "min_requests": 10}}
            r["agents"]["bot"]["grants"] = ["contact.read", {"capability": "contact.update", "mode": "live"},
                                            "contact.create"]
            return r

        up.received.clear()
        up.put_record("contacts", {"id": "1", "name": "A"})
        up.fail("PATCH", "/api/contacts", 500, times=100_000)
        g, procs, schema = await start(kind, gov, tmp)
        try:
            for i in range(60):
                _, h, _ = await g.request("PATCH", "/api/contacts/1", json={"name": f"bad {i}"})
                if h.get("X-Tether-Quarantined"):
                    break
            first = len(up.seen("PATCH"))

            def quarantined(h: dict[str, str]) -> bool:
                return h.get("X-Tether-Quarantined") == "true"

            delay, wrong = await governed_everywhere(g, quarantined, "PATCH", "/api/contacts/1")
            out["quarantine"] = (f"after {first} bad writes" if kind == "one" else
                                 f"after {first}; everywhere {delay * 1000:.0f} ms later ({wrong} got through)")
            up.failures.clear()
            await g.admin("POST", "/api/agents/bot/release", json={"reason": "fixed"})
            t0 = time.monotonic()

            async def any_quarantined() -> bool:
                for proc in range(len(g.procs)):
                    for _ in range(4 if kind == "workers2" else 1):  # workers: the admin port lands on either
                        _, doc = await g.admin("GET", "/api/agents", proc=proc)
                        if [a for a in doc["agents"] if a["agent"] == "bot"][0]["quarantined"]:
                            return True
                return False

            while await any_quarantined() and time.monotonic() - t0 < 5.0:
                pass
            released = time.monotonic() - t0
            again = None
            while time.monotonic() - t0 < released + 3.0 and again is None:
                if await any_quarantined():
                    again = time.monotonic() - t0
                await asyncio.sleep(0.1)
            out["release"] = (f"released everywhere after {released * 1000:.0f} ms; " +
                              ("sticks (3 s watched)" if again is None else f"re-quarantined {again:.1f} s later"))
            await g.admin("POST", "/api/promotions", json={"agent": "bot", "capability": "contact.create",
                                                          "to": "live", "force": True, "reason": "bench"})

            def live(h: dict[str, str]) -> bool:
                return "X-Tether-Dry-Run" not in h

            delay, _ = await governed_everywhere(g, live, "POST", "/api/contacts")
            out["promotion"] = f"live everywhere after {delay * 1000:.0f} ms"
        finally:
            await stop(procs, schema)

        # 5. the upstream says its quota is spent
        fakes = [FakeUpstream(), FakeUpstream(), FakeUpstream()]
        for f in fakes:
            await f.start()
        try:
            def quota(store: str) -> dict[str, Any]:
                r = base_rules(up.url, store)
                cred = {"type": "bearer", "token": {"value": "t"}}
                r["upstreams"].update({
                    "sf": {"url": fakes[0].url, "adapter": "salesforce", "credentials": cred,
                           "quota": {"reserve": "20%"}},
                    "hs": {"url": fakes[1].url, "adapter": "hubspot", "credentials": cred},
                    "other": {"url": fakes[2].url, "credentials": cred}})
                r["capabilities"].update({
                    "sf.read": {"upstream": "sf", "method": "GET",
                                "path": "/services/data/{version}/sobjects/Account/{id}"},
                    "hs.read": {"upstream": "hs", "method": "GET", "path": "/crm/v3/objects/contacts/{contactId}"},
                    "other.read": {"upstream": "other", "method": "GET", "path": "/things/{id}"}})
                r["agents"]["bot"]["grants"] += ["sf.read", "hs.read", "other.read"]
                return r

            g, procs, schema = await start(kind, quota, tmp)
            try:
                got = []
                for name, fake, path, headers in (
                        ("sf", fakes[0], "/services/data/v59.0/sobjects/Account/001000000000001AAA",
                         {"Sforce-Limit-Info": "api-usage=14999/15000"}),
                        ("hs", fakes[1], "/crm/v3/objects/contacts/51001", {"X-HubSpot-RateLimit-Remaining": "0",
                                                                            "X-HubSpot-RateLimit-Max": "100"}),
                        ("other", fakes[2], "/things/1", {"Retry-After": "60"})):
                    if name == "other":
                        fake.fail("GET", "/things", 429, times=1)
                    fake.response_headers = headers
                    await g.request("GET", path, upstream=name)
                    before = len(fake.received)
                    await asyncio.sleep(0.2)
                    for _ in range(10):
                        await g.request("GET", path, upstream=name)
                    got.append(f"{name} {len(fake.received) - before}/10")
                out["quota"] = "forwarded after the signal: " + ", ".join(got)
            finally:
                await stop(procs, schema)
        finally:
            for f in fakes:
                await f.stop()

        # 6. workers: start-up on a fresh SQLite file, a worker killed
        if kind == "workers2":
            failed = 0
            for _ in range(3):
                def plain(store: str) -> dict[str, Any]:
                    return base_rules(up.url, store)

                g, procs, schema = await start(kind, plain, tmp)
                rows = await g.journal()
                failed += sum(1 for x in rows if x.get("event") == "worker_died")
                pids = worker_pids(procs[0].pid)
                if len(pids) == 2:
                    os.kill(pids[0], signal.SIGKILL)
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 20 and (len(worker_pids(procs[0].pid)) < 2
                                                          or pids[0] in worker_pids(procs[0].pid)):
                        await asyncio.sleep(0.05)
                    restarted = time.monotonic() - t0
                await stop(procs, schema)
            out["workers"] = (f"{failed} of 6 worker starts failed; a killed worker is back after "
                              f"{restarted:.1f} s (journaled)")
        else:
            out["workers"] = "–"
    finally:
        await up.stop()


ROWS = [("rate", "`requests_per_minute: 30`, 120 quick requests"),
        ("quarantine", "quarantine (min_requests 10)"),
        ("release", "`tether agents release`, no traffic"),
        ("promotion", "promotion dry_run → live"),
        ("quota", "upstream says its quota is spent (Salesforce 14999/15000 + reserve 20%, HubSpot Remaining 0, "
                  "429 + Retry-After 60)"),
        ("workers", "worker start-up on a fresh SQLite file ×3; kill -9 a worker")]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=["one", "workers2", "replicas2"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    kinds = args.only or ["one", "workers2", "replicas2"]
    if "replicas2" in kinds and pg_unavailable():
        print(f"replicas2 skipped: {pg_unavailable()}", file=sys.stderr)
        kinds.remove("replicas2")
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="tether-many-") as d:
        for kind in kinds:
            results[kind] = await measure(kind, Path(d))
            print(f"measured {kind}", file=sys.stderr)
    heads = {"one": "1 process", "workers2": "`--workers 2` (SQLite)", "replicas2": "2 replicas (PostgreSQL)"}
    print("| promise | " + " | ".join(heads[k] for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for key, label in ROWS:
        print(f"| {label} | " + " | ".join(results[k].get(key, "–") for k in kinds) + " |")
    for k in kinds:
        if "error" in results[k]:
            print(f"\n{k}: stopped early: {results[k]['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
