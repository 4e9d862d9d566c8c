"""Helpers shared by the CLI command modules: finding the store, talking to the admin API, printing."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import orjson

from .config import ConfigError, RulesFile, load_rules


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="rules file (its server.store is used); default $TETHER_CONFIG")
    p.add_argument("--store", metavar="URL", help="SQLite path or postgresql:// URL; default $TETHER_STORE, "
                                                  "then the rules file's server.store, then tether.db")


def rules_from(args: argparse.Namespace) -> RulesFile | None:
    path = getattr(args, "config", None) or os.environ.get("TETHER_CONFIG")
    if not path:
        return None
    return load_rules(path)


def store_url(args: argparse.Namespace) -> str:
    if getattr(args, "store", None):
        return str(args.store)
    if os.environ.get("TETHER_STORE"):
        return os.environ["TETHER_STORE"]
    rules = rules_from(args)
    if rules is not None:
        return rules.server.store
    return "tether.db"


def open_cli_store(args: argparse.Namespace) -> Any:
    from .store import open_store

    url = store_url(args)
    if not url.startswith(("postgres://", "postgresql://")) and not os.path.exists(url.removeprefix("sqlite:///")):
        raise SystemExit(f"tether: no store at {url!r} (pass --store or --config)")
    return open_store(url)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-url", default=None,
                   help="admin API base URL; default $TETHER_ADMIN_URL or http://127.0.0.1:8199")
    p.add_argument("--token", default=None, help="reviewer token; default $TETHER_ADMIN_TOKEN")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


class AdminError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        msg = f"{err.get('code')}: {err.get('message')}" if isinstance(err, dict) else str(body)
        super().__init__(f"admin API answered {status}: {msg}")


def admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None,
               params: dict[str, Any] | None = None) -> Any:
    """One admin API call; raises AdminError on a non-2xx answer."""
    import aiohttp

    base = (args.admin_url or os.environ.get("TETHER_ADMIN_URL") or "http://127.0.0.1:8199").rstrip("/")
    token = args.token or os.environ.get("TETHER_ADMIN_TOKEN")
    if not token:
        raise SystemExit("tether: a reviewer token is needed: --token or $TETHER_ADMIN_TOKEN "
                         "(make one with `tether token mint --reviewer NAME`)")

    async def go() -> Any:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.request(method, base + path, json=body,
                                     params={k: str(v) for k, v in (params or {}).items() if v is not None},
                                     headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=120)) as r:
                    data = await r.read()
                    doc = orjson.loads(data) if data else None
                    if r.status >= 400:
                        raise AdminError(r.status, doc)
                    return doc
            except aiohttp.ClientConnectorError as exc:
                raise SystemExit(f"tether: cannot reach the admin API at {base}: {exc.os_error}") from None

    return asyncio.run(go())


def print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")


def fail(msg: str, code: int = 1) -> int:
    print(f"tether: {msg}", file=sys.stderr)
    return code


__all__ = ["AdminError", "ConfigError", "add_admin_args", "add_store_args", "admin_call", "fail", "open_cli_store",
           "print_json", "rules_from", "run", "store_url"]
