"""Shared fixtures: a fake upstream and an in-process gateway on real loopback sockets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import secrets
import sqlite3
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.app.gateway import Gateway  # noqa: E402
from proxy.config import parse_rules  # noqa: E402
from proxy.policy.identity import mint_token  # noqa: E402
from tests.fakes import FakeUpstream  # noqa: E402

SECRET = "test-secret-0123456789abcdef-0123456789abcdef"
UPSTREAM_TOKEN = "UPSTREAM-SECRET-TOKEN"


def base_rules(upstream_url: str, store: str, **extra: Any) -> dict[str, Any]:
    """A small rules document: one upstream 'crm', agent 'bot' with a read and a live write."""
    rules: dict[str, Any] = {
        "version": 1,
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store},
        "identity": {"hs_secret": {"value": SECRET}},
        "upstreams": {
            "crm": {"url": upstream_url, "credentials": {"type": "bearer", "token": {"value": UPSTREAM_TOKEN}}},
        },
        "agents": {
            "bot": {"grants": ["contact.read", "contact.list", {"capability": "contact.update", "mode": "live"},
                               {"capability": "contact.create", "mode": "live"}, "echo.any", "big.read",
                               "slow.read"]},
            "other-bot": {"grants": ["contact.read"]},
        },
        "capabilities": {
            "contact.read": {"upstream": "crm", "method": "GET", "path": "/api/contacts/{id}"},
            "contact.list": {"upstream": "crm", "method": "GET", "path": "/api/contacts"},
            "contact.create": {"upstream": "crm", "method": "POST", "path": "/api/contacts"},
            "contact.update": {"upstream": "crm", "method": "PATCH", "path": "/api/contacts/{id}"},
            "contact.delete": {"upstream": "crm", "method": "DELETE", "path": "/api/contacts/{id}"},
            "echo.any": {"upstream": "crm", "method": "GET", "path": "/echo"},
            "big.read": {"upstream": "crm", "method": "GET", "path": "/big"},
            "slow.read": {"upstream": "crm", "method": "GET", "path": "/slow"},
        },
    }
    for k, v in extra.items():
        rules[k] = v
    return rules


class GatewayHandle:
    def __init__(self, gw: Gateway, rules_path: Path, session: aiohttp.ClientSession) -> None:
        self.gw = gw
        self.rules_path = rules_path
        self.session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw.listeners[0].bound_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gw.admin_port}"

    def upstream_url(self, name: str) -> str:
        for lst in self.gw.listeners:
            if lst.upstream_name == name:
                scheme = "https" if lst.tls else "http"
                return f"{scheme}://127.0.0.1:{lst.bound_port}"
        return f"{self.url}/{name}"

    def token(self, agent: str = "bot", on_behalf_of: str | None = None, **kw: Any) -> str:
        ident = self.gw.state.rules.identity
        if on_behalf_of:
            return mint_token(ident, on_behalf_of, actor=agent, **kw)
        return mint_token(ident, agent, **kw)

    def reviewer_token(self, name: str = "rita") -> str:
        ident = self.gw.state.rules.identity
        return mint_token(ident, name, roles=[ident.reviewer_role])

    def headers(self, agent: str = "bot", on_behalf_of: str | None = None, intent: str | None = "test intent",
                **extra: str) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token(agent, on_behalf_of)}"}
        if intent is not None:
            h["X-Tether-Intent"] = intent
        h.update(extra)
        return h

    async def request(self, method: str, path: str, *, agent: str = "bot", on_behalf_of: str | None = None,
                      intent: str | None = "test intent", headers: dict[str, str] | None = None,
                      upstream: str = "crm", **kw: Any) -> aiohttp.ClientResponse:
        h = self.headers(agent, on_behalf_of, intent)
        h.update(headers or {})
        resp = await self.session.request(method, f"{self.upstream_url(upstream)}{path}", headers=h, **kw)
        await resp.read()
        return resp

    async def admin(self, method: str, path: str, *, token: str | None = None, **kw: Any) -> aiohttp.ClientResponse:
        h = {"Authorization": f"Bearer {token or self.reviewer_token()}"}
        resp = await self.session.request(method, f"{self.admin_url}{path}", headers=h, **kw)
        await resp.read()
        return resp

    async def journal(self) -> list[dict[str, Any]]:
        await self.gw.journal.flush(5)
        rows = await self.gw.store.journal_query(limit=100000)
        return [r.record() | {"seq": r.seq} for r in rows]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    up = await FakeUpstream().start()
    yield up
    await up.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


MakeGateway = Callable[..., Awaitable[GatewayHandle]]


@pytest.fixture
async def make_gateway(tmp_path: Path, http: aiohttp.ClientSession, store_url: str) -> AsyncIterator[MakeGateway]:
    # (store_url is set up first so that it is torn down last: the gateways stop before their schema goes)
    started: list[Gateway] = []

    async def make(rules: dict[str, Any], *, start: bool = True) -> GatewayHandle:
        rules = copy.deepcopy(rules)
        path = tmp_path / f"rules-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        gw = Gateway(parse_rules(rules, str(path)), rules_path=str(path))
        if start:
            await gw.start()
            started.append(gw)
        return GatewayHandle(gw, path, http)

    yield make
    for gw in reversed(started):
        await gw.stop(grace=1)


@pytest.fixture
async def gateway(make_gateway: MakeGateway, upstream: FakeUpstream, store_url: str) -> GatewayHandle:
    return await make_gateway(base_rules(upstream.url, store_url))


# --------------------------------------------------------------------------- stores: SQLite and PostgreSQL
#
# A test module marked ``pytestmark = pytest.mark.stores`` runs each of its tests once per backend in
# $TETHER_TEST_STORES (default "sqlite,postgresql"): every test that uses ``store_url`` (directly or
# through ``gateway``) gets an SQLite file, then a fresh PostgreSQL schema (dropped afterwards; skipped
# with the reason when the server is absent). Unmarked modules keep running on SQLite only.

STORE_BACKENDS = tuple(b.strip() for b in os.environ.get("TETHER_TEST_STORES", "sqlite,postgresql").split(",")
                       if b.strip())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("stores") is not None:
        metafunc.parametrize("store_backend", [
            pytest.param(b, id=b, marks=[pytest.mark.postgres] if b == "postgresql" else [])
            for b in STORE_BACKENDS], indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_url(store_backend: str, tmp_path: Path) -> Iterator[str]:
    """The store of this test's gateway: an SQLite file, or a PostgreSQL schema of its own."""
    if store_backend == "sqlite":
        yield str(tmp_path / "tether.db")
        return
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)
    url, schema = new_pg_url()
    try:
        yield url
    finally:
        drop_schema(schema)


def pg_dsn() -> str:
    return os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


_PG_STATE: dict[str, str | None] = {}


def _in_thread(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine on a private event loop (usable from sync code whatever loop a test runs)."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(coro_fn())).result(timeout=60)


def pg_unavailable() -> str | None:
    """None when the test PostgreSQL server answers, else why not (the skip reason)."""
    if "reason" not in _PG_STATE:
        try:
            import asyncpg
        except ImportError:
            _PG_STATE["reason"] = "asyncpg is not installed (pip install 'tether-gateway[postgres]')"
            return _PG_STATE["reason"]

        async def probe() -> None:
            conn = await asyncpg.connect(pg_dsn(), timeout=3)
            await conn.close()

        try:
            _in_thread(probe)
            _PG_STATE["reason"] = None
        except Exception as exc:  # noqa: BLE001
            _PG_STATE["reason"] = f"PostgreSQL not reachable at {pg_dsn()}: {type(exc).__name__}: {exc}"
    return _PG_STATE["reason"]


def pg_admin(sql: str, *args: Any, schema: str | None = None) -> Any:
    """Run one statement as the test superuser (optionally with search_path = schema), outside the store."""
    import asyncpg

    async def go() -> Any:
        conn = await asyncpg.connect(pg_dsn(), timeout=5)
        try:
            if schema:
                await conn.execute(f'SET search_path = "{schema}"')
            if not args and ";" in sql:  # a script
                await conn.execute(sql)
                return []
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return _in_thread(go)


def with_params(dsn: str, **params: Any) -> str:
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{dsn}{'&' if '?' in dsn else '?'}{extra}"


def new_pg_url(**params: Any) -> tuple[str, str]:
    """A store URL on a fresh schema of its own: (url, schema)."""
    schema = f"tether_t_{secrets.token_hex(5)}"
    return with_params(pg_dsn(), schema=schema, **params), schema


def drop_schema(schema: str) -> None:
    pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def store_sql(url: str, sql: str) -> list[Any]:
    """Run raw SQL on a store's own tables, as an attacker with database access would (tamper tests)."""
    if url.startswith(("postgresql://", "postgres://")):
        from proxy.store.postgres import parse_url

        return list(pg_admin(sql, schema=parse_url(url)[1]["schema"]))
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        rows = con.execute(sql).fetchall()
        con.commit()
        return rows
    finally:
        con.close()


@asynccontextmanager
async def store_unwritable(store: Any) -> AsyncIterator[None]:
    """Make the store refuse every journal write for a while, then take writes again."""
    if store.kind == "sqlite":
        await store._db.execute("PRAGMA query_only = ON")
        try:
            yield
        finally:
            await store._db.execute("PRAGMA query_only = OFF")
        return
    s = f'"{store.schema}"'
    refuse = (f"CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS "
              f"$$BEGIN RAISE EXCEPTION 'store is read-only (test)'; END$$; "
              f"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {s}.journal_meta "
              f"FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse()")
    await asyncio.to_thread(pg_admin, refuse)
    try:
        yield
    finally:
        await asyncio.to_thread(pg_admin, f"DROP TRIGGER refuse ON {s}.journal_meta; DROP FUNCTION {s}.refuse()")


@pytest.fixture
async def webhook() -> AsyncIterator[Any]:
    from tests.fakes import WebhookReceiver

    w = await WebhookReceiver().start()
    yield w
    await w.stop()
