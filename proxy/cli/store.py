"""``tether store``: apply schema migrations and describe the store (SQLite file or PostgreSQL).

``tether store migrate`` applies pending schema migrations and exits; the gateway applies them at startup
too, so running it is only needed when the gateway's database role may not change the schema (PostgreSQL
URL with ``migrate=false``) or to migrate ahead of a rolling upgrade. Several replicas (or a replica
and this command) migrating at once is safe: PostgreSQL migrations run under a transaction-level
advisory lock, SQLite ones inside ``BEGIN IMMEDIATE``.

``tether store info`` prints the backend, the schema version (and whether migrations are pending), the
journal's head and anchor, and counts of review items, transactions, promotions and quarantines.

The store comes from ``--store URL``, else ``$TETHER_STORE``, else ``server.store`` of ``--config FILE`` (or
``$TETHER_CONFIG``), else ``tether.db``. PostgreSQL URLs: ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB
[?schema=NAME&pool_max=N&...]`` (see :mod:`proxy.store.postgres`).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from typing import Any

import orjson

from .common import add_store_args, run, store_url


def _is_pg(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _sqlite_path(url: str) -> str:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url


def _sqlite_version(path: str) -> int:
    """The schema version of a SQLite store file without migrating it (0 when new or empty)."""
    if not os.path.exists(path):
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def latest_version(url: str) -> int:
    if _is_pg(url):
        from ..store.postgres import LATEST_VERSION

        return LATEST_VERSION
    from ..store import sqlite as _sq

    return len(_sq._MIGRATIONS)


def _shown(url: str) -> str:
    if _is_pg(url):
        from ..store.postgres import redact

        return redact(url)
    return _sqlite_path(url)


def cmd_migrate(args: argparse.Namespace) -> int:
    url = store_url(args)

    async def go() -> tuple[int, int]:
        from ..store import StoreUnavailable, open_store

        try:
            store = open_store(url)
        except StoreUnavailable as exc:
            raise SystemExit(f"tether: store unavailable: {exc}") from None
        if _is_pg(url):
            store.auto_migrate = True  # this command migrates even when the URL says migrate=false
            before = None
        else:
            path = _sqlite_path(url)
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise SystemExit(f"tether: {path}: folder {parent} does not exist")
            before = _sqlite_version(path)
        try:
            await store.open()
        except StoreUnavailable as exc:
            raise SystemExit(f"tether: store unavailable: {exc}") from None
        try:
            if before is None:
                before = store.migrated_from if store.migrated_from is not None else 0
            return before, await store.schema_version()
        finally:
            await store.close()

    before, after = run(go())
    where = _shown(url)
    if after == before:
        print(f"{where}: schema version {after}, nothing to migrate")
    else:
        print(f"{where}: migrated schema version {before} -> {after}")
    return 0


async def gather_info(url: str) -> dict[str, Any]:
    """What ``tether store info`` prints, as a document."""
    from ..store import StoreUnavailable, open_store

    latest = latest_version(url)
    doc: dict[str, Any] = {"store": _shown(url), "backend": "postgresql" if _is_pg(url) else "sqlite",
                           "latest_schema_version": latest}
    try:
        store = open_store(url)
    except StoreUnavailable as exc:
        raise SystemExit(f"tether: store unavailable: {exc}") from None
    if _is_pg(url):
        try:
            await store.open_pool()  # look without migrating: ``info`` must not change the schema
        except StoreUnavailable as exc:
            raise SystemExit(f"tether: store unavailable: {exc}") from None
    else:
        if not os.path.exists(_sqlite_path(url)):
            raise SystemExit(f"tether: no store at {url!r} (pass --store or --config)")
        try:
            await store.open()
        except StoreUnavailable as exc:
            raise SystemExit(f"tether: store unavailable: {exc}") from None
    try:
        version = await store.schema_version()
        doc["schema_version"] = version
        doc["migrations_pending"] = max(0, latest - version)
        if version < latest:
            return doc
        head_seq, head_hash = await store.journal_head()
        anchor_seq, anchor_hash = await store.journal_anchor()
        doc["journal"] = {"records": head_seq - anchor_seq, "head_seq": head_seq, "head_hash": head_hash,
                          "anchor_seq": anchor_seq, "anchor_hash": anchor_hash}
        doc["review_items"] = {s: await store.review_count(s)
                               for s in ("pending", "approved", "replayed", "replay_failed", "rejected", "expired")}
        doc["transactions"] = {s: len(await store.tx_list(state=s, limit=1_000_000))
                               for s in ("open", "rolling_back", "needs_attention")}
        doc["promotions"] = len(await store.promotions())
        doc["quarantined_agents"] = sorted(await store.quarantines())
        if hasattr(store, "info"):
            doc["server"] = await store.info()
        else:
            path = _sqlite_path(url)
            doc["file"] = {"path": os.path.abspath(path),
                           "bytes": sum(os.path.getsize(p) for p in (path, path + "-wal", path + "-shm")
                                        if os.path.exists(p))}
        return doc
    finally:
        await store.close()


def cmd_info(args: argparse.Namespace) -> int:
    url = store_url(args)
    doc = run(gather_info(url))
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"store:           {doc['store']} ({doc['backend']})")
    pending = doc["migrations_pending"]
    print(f"schema version:  {doc['schema_version']} of {doc['latest_schema_version']}"
          + (f" — {pending} migration(s) pending: run `tether store migrate`" if pending else ""))
    if "journal" not in doc:
        return 1 if pending else 0
    j = doc["journal"]
    print(f"journal:         {j['records']} records, head #{j['head_seq']} {j['head_hash'][:16]}…"
          + (f", records up to #{j['anchor_seq']} archived" if j["anchor_seq"] else ""))
    r = doc["review_items"]
    print("review items:    " + ", ".join(f"{n} {s}" for s, n in r.items()))
    t = doc["transactions"]
    print("transactions:    " + ", ".join(f"{n} {s}" for s, n in t.items()))
    print(f"promotions:      {doc['promotions']} grant(s) with a stored mode")
    q = doc["quarantined_agents"]
    print(f"quarantined:     {', '.join(q) if q else 'none'}")
    if "server" in doc:
        s = doc["server"]
        print(f"server:          PostgreSQL {s['server_version']}, schema {s['schema']}, "
              f"synchronous_commit={s['synchronous_commit']}, {s['bytes']} bytes, "
              f"NOTIFY channel {s['notify_channel']}")
        if s["synchronous_commit"] not in ("on", "remote_write", "remote_apply"):
            print("warning:         synchronous_commit is not on: a journal commit may be lost on a server crash",
                  file=sys.stderr)
    else:
        print(f"file:            {doc['file']['path']} ({doc['file']['bytes']} bytes with WAL)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("store", help="schema migrations and store information (SQLite or PostgreSQL)",
                       description="The store that keeps the journal, review items, transactions, promotions and "
                                   "quarantines: an SQLite file, or PostgreSQL shared by several replicas.")
    ss = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND")

    m = ss.add_parser("migrate", help="apply pending schema migrations (the gateway also does at startup)",
                      description="Apply pending schema migrations and exit. Safe while replicas start or run: "
                                  "PostgreSQL migrations take a transaction-level advisory lock.")
    add_store_args(m)
    m.set_defaults(func=cmd_migrate)

    i = ss.add_parser("info", help="backend, schema version, journal head, counts",
                      description="Describe the store without changing it.")
    add_store_args(i)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)


def main(argv: list[str] | None = None) -> int:
    """``python -m proxy.cli.store ...`` (until ``tether store`` is wired into ``proxy.cli.main``)."""
    parser = argparse.ArgumentParser(prog="tether")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["cmd_info", "cmd_migrate", "gather_info", "latest_version", "main", "register"]
