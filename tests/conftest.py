"""Shared fixtures: a fake upstream and an in-process gateway on real loopback sockets."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.config import parse_rules  # noqa: E402
from proxy.gateway import Gateway  # noqa: E402
from proxy.identity import mint_token  # noqa: E402
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
async def make_gateway(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[MakeGateway]:
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
async def gateway(make_gateway: MakeGateway, upstream: FakeUpstream, tmp_path: Path) -> GatewayHandle:
    return await make_gateway(base_rules(upstream.url, str(tmp_path / "tether.db")))


def pg_dsn() -> str:
    return os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def webhook() -> AsyncIterator["WebhookReceiver"]:
    from tests.fakes import WebhookReceiver

    w = await WebhookReceiver().start()
    yield w
    await w.stop()
