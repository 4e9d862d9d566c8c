"""Not timed: how many bytes the journal stores per request (issue 27's compact outcome record).

Starts the full-policy Tether of ``run.py`` (SQLite store, ``synchronous: full``) in front of a tiny
upstream, sends N sequential requests of each kind — a full-policy GET, a live PATCH (500-byte body,
audit fields) and a dry-run PATCH (captured for review) — stops the gateway, and reads the store:

* ``record B/req``: the stored record payloads (intent + outcome) per request — what the chain hashes;
* ``journal B/req``: the pages of the ``journal`` table and its indexes (``dbstat``) per request: the
  record plus its columns, hashes and index entries;
* ``file B/req``: the growth of the database file (WAL checkpointed) over an empty store, per request
  (a dry-run PATCH also stores its review item).

With ``--postgres URL`` (a server where it may create and drop a schema of its own), the same on
PostgreSQL: ``journal B/req`` is then ``pg_total_relation_size`` of the journal table (heap, TOAST and
indexes, after ``VACUUM``) and there is no file column.

    python bench/journal_bytes.py [--requests 1000] [--json FILE] [--postgres postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    DRY_AGENT,
    PATCH_BODY,
    RECORD_ID,
    ROOT,
    UPSTREAM_BODY,
    free_port,
    http_call,
    tether_headers,
    tether_rules,
    wait_port,
)

UPSTREAM = """
import sys
from aiohttp import web
body = sys.argv[2].encode()
async def any_(request):
    await request.read()
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", any_)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

KINDS = {
    "GET": ("GET", None, tether_headers()),
    "PATCH": ("PATCH", PATCH_BODY, tether_headers(write=True)),
    "dry-run PATCH": ("PATCH", PATCH_BODY, tether_headers(DRY_AGENT, write=True)),
}


async def _pg(url: str, sql: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def measure_pg(workdir: Path, up_port: int, kind: str, n: int, server: str) -> dict[str, Any]:
    schema = f"tether_bytes_{secrets.token_hex(4)}"
    store = f"{server}{'&' if '?' in server else '?'}schema={schema}"
    try:
        serve(workdir, up_port, kind, n, store)
        asyncio.run(_pg(server, f'VACUUM "{schema}".journal'))
        rows = asyncio.run(_pg(server, f"SELECT COUNT(DISTINCT request_id), COALESCE(SUM(length(record)), 0), "
                                       f"pg_total_relation_size('\"{schema}\".journal') FROM \"{schema}\".journal "
                                       f"WHERE kind IN ('request', 'outcome')"))
    finally:
        asyncio.run(_pg(server, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    requests, record, pages = rows[0]
    return {"requests": requests, "record": record, "pages": pages, "file": None, "sample": []}


def serve(workdir: Path, up_port: int, kind: str | None, n: int, store: str) -> None:
    """Start the full-policy Tether on ``store``, send ``n`` requests of ``kind``, stop it."""
    main_port, port, admin_port = free_port(), free_port(), free_port()
    rules = tether_rules(f"http://127.0.0.1:{up_port}", store, main_port=main_port, up_port=port,
                         admin_port=admin_port)
    rules_path = workdir / "rules.json"
    rules_path.write_text(json.dumps(rules))
    log = open(workdir / "tether.out", "w")
    p = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(rules_path)], stdout=log,
                         stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         start_new_session=True)
    try:
        wait_port(port, 60, p)
        if kind is not None:
            method, body, headers = KINDS[kind]
            for _ in range(n):
                status, _, _ = http_call(port, method, f"/api/contacts/{RECORD_ID}", headers, body)
                if status != 200:
                    raise RuntimeError(f"{kind}: status {status}")
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
        log.close()


def measure(workdir: Path, up_port: int, kind: str | None, n: int) -> dict[str, Any]:
    db = workdir / f"{(kind or 'empty').replace(' ', '-')}.db"
    serve(workdir, up_port, kind, n, str(db))
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        requests = c.execute("SELECT COUNT(DISTINCT request_id) FROM journal WHERE kind IN ('request','outcome')"
                             ).fetchone()[0]
        record = c.execute("SELECT COALESCE(SUM(length(record)), 0) FROM journal WHERE kind IN ('request','outcome')"
                           ).fetchone()[0]
        pages = c.execute("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = 'journal' OR name LIKE 'journal_%'"
                          " AND name != 'journal_meta'").fetchone()[0]
        review = c.execute("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name LIKE 'review%'").fetchone()[0]
        sample = [bytes(r[0]).decode() for r in c.execute(
            "SELECT record FROM journal WHERE kind IN ('request','outcome') ORDER BY seq DESC LIMIT 2")][::-1]
    return {"requests": requests, "record": record, "pages": pages, "review_pages": review,
            "file": os.path.getsize(db), "sample": sample}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--json", help="write the figures (and a sample intent/outcome pair per kind) here")
    ap.add_argument("--show", action="store_true", help="print a sample intent and outcome record per kind")
    ap.add_argument("--postgres", metavar="URL", help="measure on this PostgreSQL server instead (a schema of its own)")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tether-journal-bytes-") as tmp:
        workdir = Path(tmp)
        up_port = free_port()
        up = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port), UPSTREAM_BODY],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(up_port, 30, up)
            empty = None if args.postgres else measure(workdir, up_port, None, 0)
            print(f"{'kind':<15} {'record B/req':>12} {'journal B/req':>13} {'file B/req':>10}  requests")
            for kind in KINDS:
                if args.postgres:
                    m = measure_pg(workdir, up_port, kind, args.requests, args.postgres)
                else:
                    m = measure(workdir, up_port, kind, args.requests)
                n = m["requests"]
                row = {"requests": n, "record_bytes_per_request": round(m["record"] / n, 1),
                       "journal_bytes_per_request": round(m["pages"] / n, 1),
                       "file_bytes_per_request": None if empty is None else round((m["file"] - empty["file"]) / n, 1),
                       "sample": m["sample"]}
                out[kind] = row
                print(f"{kind:<15} {row['record_bytes_per_request']:>12} {row['journal_bytes_per_request']:>13} "
                      f"{str(row['file_bytes_per_request'] or '-'):>10}  {n}")
                if args.show:
                    for s in m["sample"]:
                        print(f"    {len(s):>4} {s}")
        finally:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               "figures": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
