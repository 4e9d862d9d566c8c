"""Helpers shared by the CLI command modules: finding the store, talking to the admin API, printing."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import orjson

from ..config import ConfigError, RulesFile, load_rules


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
    from ..store import open_store

    url = store_url(args)
    if not url.startswith(("postgres://", "postgresql://")) and not os.path.exists(url.removeprefix("sqlite:///")):
        raise SystemExit(f"tether: no store at {url!r} (pass --store or --config)")
    store = open_store(url)
    opener = store.open

    async def open_or_close() -> None:
        # a store that fails to open (not a database, refused connection) must not leave its connection
        # thread behind: the command would print its one-line error and then never exit
        try:
            await opener()
        except BaseException:
            try:
                await store.close()
            except Exception:  # noqa: BLE001
                pass
            raise

    store.open = open_or_close
    return store


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-url", default=None,
                   help="admin API base URL; default $TETHER_ADMIN_URL or http://127.0.0.1:8199")
    p.add_argument("--token", default=None, help="reviewer token; default $TETHER_ADMIN_TOKEN")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


class AdminError(Exception):
    """A non-2xx answer of the admin API; its message is one line (the agent's text in it made inert)."""

    def __init__(self, status: int, body: Any) -> None:
        from ..inert import inert

        self.status = status
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        msg = f"{err.get('code')}: {err.get('message')}" if isinstance(err, dict) else str(body)[:200]
        super().__init__(inert(f"admin API answered {status}: {msg}"))


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
                    if "X-Tether-Request-Id" not in r.headers:
                        raise SystemExit(f"tether: {base} answered {r.status} but is not Tether's admin listener "
                                         "(its answer has no X-Tether-Request-Id)")
                    try:
                        doc = orjson.loads(data) if data else None
                    except orjson.JSONDecodeError:
                        if r.status >= 400:
                            raise AdminError(r.status, data.decode("utf-8", "replace").strip()) from None
                        raise SystemExit(f"tether: {base} answered {r.status} with something that is not JSON; "
                                         "is it Tether's admin listener?") from None
                    if r.status >= 400:
                        raise AdminError(r.status, doc)
                    return doc
            except aiohttp.ClientConnectorError as exc:
                raise SystemExit(f"tether: cannot reach the admin API at {base}: {exc.os_error}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                raise SystemExit(f"tether: the admin API at {base} failed: {type(exc).__name__}"
                                 + (f": {exc}" if str(exc) else "")) from None

    return asyncio.run(go())


def print_json(doc: Any) -> None:
    """Pretty JSON; control and bidi characters inside strings are written as \\u escapes (same JSON)."""
    from ..inert import json_text

    sys.stdout.write(json_text(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()) + "\n")


def table(headers: list[str], rows: list[list[Any]], right: set[str] | frozenset[str] = frozenset()) -> str:
    """Columns as wide as their widest cell (ids are 35 characters); the last column is not padded.
    Every cell is made inert, so agent text cannot break the layout or the terminal."""
    from ..inert import inert

    cells = [[inert(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        out = []
        for i, (h, v) in enumerate(zip(headers, values)):
            if i == len(headers) - 1:
                out.append(v)
            else:
                out.append(v.rjust(widths[i]) if h in right else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


def fail(msg: str, code: int = 1) -> int:
    """Say what went wrong on one line (stderr) and return the exit status."""
    from ..inert import inert

    print(f"tether: {inert(msg)}", file=sys.stderr)
    return code


__all__ = ["AdminError", "ConfigError", "add_admin_args", "add_store_args", "admin_call", "fail", "open_cli_store",
           "print_json", "rules_from", "run", "store_url", "table"]
