"""End to end: the official ``stripe`` SDK pointed at Tether, localstripe behind it.

    stripe.StripeClient(api_key=<agent JWT>, base_addresses={"api": <Tether>/stripe})
        -> Tether (agent JWT swapped for the upstream's sk_test_ key, provenance stamped)
        -> a recording relay (so the tests see exactly what crossed)
        -> localstripe (a subprocess on a free loopback port, state in memory only)

localstripe has no Prices endpoint: plans stand in. Stripe has no composite/batch endpoint, so the
"one ungranted sub-request refuses the whole composite" check does not apply here.

The SDK is synchronous (requests): each call runs in a thread while Tether serves on the test loop.
Custom headers (X-Tether-Intent, X-Tether-Transaction) go in the per-request ``{"headers": {...}}``
option; the SDK puts the agent JWT in ``Authorization: Bearer`` and adds an Idempotency-Key to every
POST, which Tether passes through.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web

stripe = pytest.importorskip("stripe")
requests = pytest.importorskip("requests")

from proxy.policy.bodies import nest_form  # noqa: E402
from tests.conftest import SECRET  # noqa: E402
from tests.fakes import Received, serve_app  # noqa: E402

UPSTREAM_KEY = "sk_test_tether_upstream_0123456789"
DIRECT_KEY = "sk_test_direct_0123456789"
ALLOWED_ACCOUNT = "acct_1AllowedAccount00"

# localstripe, on 127.0.0.1 only, with its on-disk store (/tmp/localstripe.pickle) switched off.
_LAUNCHER = """
import socket, sys
import localstripe.resources as resources
resources.Store.dump_to_disk = lambda self: None
from localstripe.server import app
from aiohttp import web
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None, access_log=None)
"""






@pytest.fixture(scope="session")
def localstripe_url() -> Iterator[str]:
    probe = subprocess.run([sys.executable, "-c", "import localstripe.server"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"localstripe cannot run here (pip install localstripe): {probe.stderr.strip()[-300:]}")
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            pytest.skip(f"localstripe did not start: {err.strip()[-300:]}")
        url = f"http://127.0.0.1:{line}"
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(f"{url}/v1/balance", auth=(DIRECT_KEY, ""), timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("localstripe did not answer")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Relay:
    """Forwards everything to localstripe and records what it received (what crossed Tether)."""

    target: str
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, method: str | None = None, prefix: str = "") -> list[Received]:
        return [r for r in self.received if (method is None or r.method == method) and r.path.startswith(prefix)]

    async def start(self) -> "Relay":
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, dict(request.headers),
                                      list(request.headers.items()), body))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length",
                                                                                 "transfer-encoding")}
        assert self._session is not None
        async with self._session.request(request.method, self.target + request.raw_path, headers=headers,
                                         data=body or None) as resp:
            data = await resp.read()
            return web.Response(status=resp.status, body=data,
                                headers={"Content-Type": resp.headers.get("Content-Type", "application/json")})


def form_of(r: Received) -> dict[str, Any]:
    return nest_form(parse_qsl(r.body.decode(), keep_blank_values=True))


def stripe_rules(url: str, store: str) -> dict[str, Any]:
    cap = lambda method, path, **kw: {"upstream": "stripe", "method": method, "path": path, **kw}  # noqa: E731
    live = lambda c: {"capability": c, "mode": "live"}  # noqa: E731
    return {
        "version": 1,
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store,
                   "transactions": {"retry_attempts": 2, "retry_backoff": 0.05, "sweep_interval": 0.2}},
        "identity": {"hs_secret": {"value": SECRET}},
        "upstreams": {"stripe": {
            "url": url, "adapter": "stripe",
            "credentials": {"type": "bearer", "token": {"value": UPSTREAM_KEY}},
            "provenance": {"record_fields": {"agent": "metadata[tether_agent]",
                                             "on_behalf_of": "metadata[tether_on_behalf_of]",
                                             "intent": "tether_intent"}},
        }},
        "agents": {
            "billing-bot": {"grants": [live("customer.create"), "customer.read", live("customer.update"),
                                       live("product.create"), "product.read", live("plan.create"), "plan.read",
                                       live("refund.create")]},
            "drafter": {"grants": ["customer.create", "customer.read", "customer.list"]},  # writes: dry-run
        },
        "capabilities": {
            "customer.create": cap("POST", "/v1/customers"),
            "customer.list": cap("GET", "/v1/customers"),
            "customer.read": cap("GET", "/v1/customers/{customer}", allow_accounts=[ALLOWED_ACCOUNT]),
            "customer.update": cap("POST", "/v1/customers/{customer}", allow_accounts=[ALLOWED_ACCOUNT]),
            "product.create": cap("POST", "/v1/products"),
            "product.read": cap("GET", "/v1/products/{product}"),
            "plan.create": cap("POST", "/v1/plans"),
            "plan.read": cap("GET", "/v1/plans/{plan}"),
            "refund.create": cap("POST", "/v1/refunds"),
        },
    }


@pytest.fixture
async def relay(localstripe_url: str) -> AsyncIterator[Relay]:
    r = await Relay(localstripe_url).start()
    yield r
    await r.stop()


@pytest.fixture
async def stripe_gw(make_gateway: Any, relay: Relay, tmp_path: Path) -> Any:
    return await make_gateway(stripe_rules(relay.url, str(tmp_path / "stripe.db")))


def _http_client() -> Any:
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy the environment names
    return stripe.RequestsClient(session=session)


def agent_client(gw: Any, agent: str = "billing-bot", on_behalf_of: str | None = "ae:jane") -> Any:
    return stripe.StripeClient(api_key=gw.token(agent, on_behalf_of),
                               base_addresses={"api": gw.upstream_url("stripe")}, max_network_retries=0,
                               http_client=_http_client())


def direct_client(url: str) -> Any:
    return stripe.StripeClient(api_key=DIRECT_KEY, base_addresses={"api": url}, max_network_retries=0,
                               http_client=_http_client())


def opts(intent: str = "set up Acme's billing", tx: str | None = None, **extra: Any) -> dict[str, Any]:
    headers = {"X-Tether-Intent": intent}
    if tx is not None:
        headers["X-Tether-Transaction"] = tx
    return {"headers": headers, **extra}


async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def rollback(gw: Any, tx: str, agent: str = "billing-bot") -> dict[str, Any]:
    async with gw.session.post(f"{gw.url}/_tether/transactions/{tx}/rollback", headers=gw.headers(agent)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def assert_gone(direct: Any, kind: str, oid: str) -> None:
    service = getattr(direct.v1, kind)
    with pytest.raises(stripe.InvalidRequestError) as info:
        await call(service.retrieve, oid)
    assert info.value.http_status == 404


# --------------------------------------------------------------------------- pass-through


async def test_customer_create_retrieve_update_pass_through(stripe_gw: Any, relay: Relay, localstripe_url: str) -> None:
    sdk = agent_client(stripe_gw)
    cus = await call(sdk.v1.customers.create,
                     {"email": "ap@acme.test", "name": "Acme AP", "metadata": {"crm_id": "0015g00000Acme",
                                                                                "tether_agent": "forged"}},
                     opts(idempotency_key="agent-key-create-1"))
    assert isinstance(cus, stripe.Customer) and cus.id.startswith("cus_")
    [sent] = relay.seen("POST", "/v1/customers")
    # credentials swapped, the agent's Idempotency-Key kept, provenance headers added
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.headers["Idempotency-Key"] == "agent-key-create-1"
    assert sent.headers["Stripe-Version"] and sent.headers["X-Tether-Agent"] == "billing-bot"
    assert sent.headers["X-Tether-On-Behalf-Of"] == "ae:jane"
    assert all("X-Tether-Transaction" not in r.headers for r in relay.received)
    # the body is the agent's, plus provenance in metadata (which the agent could not forge)
    assert form_of(sent) == {"email": "ap@acme.test", "name": "Acme AP",
                             "metadata": {"crm_id": "0015g00000Acme", "tether_agent": "billing-bot",
                                          "tether_on_behalf_of": "ae:jane", "tether_intent": "set up Acme's billing"}}
    stored = await call(direct_client(localstripe_url).v1.customers.retrieve, cus.id)
    assert stored.email == "ap@acme.test" and stored.metadata["tether_agent"] == "billing-bot"

    got = await call(sdk.v1.customers.retrieve, cus.id)
    assert got.id == cus.id and got.name == "Acme AP"
    [read] = relay.seen("GET", f"/v1/customers/{cus.id}")
    assert read.body == b"" and read.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    upd = await call(sdk.v1.customers.update, cus.id, {"name": "Acme Accounts Payable"},
                     opts("fix the customer's name"))
    assert upd.name == "Acme Accounts Payable"
    [sent] = relay.seen("POST", f"/v1/customers/{cus.id}")
    assert form_of(sent)["name"] == "Acme Accounts Payable"
    assert form_of(sent)["metadata"]["tether_intent"] == "fix the customer's name"
    assert sent.headers["Idempotency-Key"]  # the SDK's own key crossed too


async def test_ids_must_be_stripe_ids(stripe_gw: Any, relay: Relay) -> None:
    sdk = agent_client(stripe_gw)
    for bad in ("prod_123", "cus_abc.def", "cus_"):
        with pytest.raises(stripe.PermissionError) as info:
            await call(sdk.v1.customers.retrieve, bad)
        assert info.value.http_status == 403 and info.value.json_body["error"]["code"] == "route_not_registered"
    # plans may carry custom ids
    with pytest.raises(stripe.InvalidRequestError) as info2:
        await call(sdk.v1.plans.retrieve, "gold-monthly")
    assert info2.value.http_status == 404  # localstripe answered: it was let through
    assert [r.path for r in relay.received] == ["/v1/plans/gold-monthly"]


async def test_dry_run_create_returns_a_customer_the_sdk_parses(stripe_gw: Any, relay: Relay,
                                                                 localstripe_url: str) -> None:
    direct = direct_client(localstripe_url)
    before = len((await call(direct.v1.customers.list, {"limit": 100})).data)
    sdk = agent_client(stripe_gw, agent="drafter")
    cus = await call(sdk.v1.customers.create, {"email": "draft@acme.test", "balance": 2500,
                                               "metadata": {"source": "drafter"}},
                     opts("draft a customer for review"))
    assert isinstance(cus, stripe.Customer)
    assert cus.id.startswith("cus_") and cus.object == "customer" and cus.livemode is False
    assert cus.email == "draft@acme.test" and cus.balance == 2500 and cus.metadata["source"] == "drafter"
    assert cus.last_response.headers["X-Tether-Dry-Run"].startswith("dr_")
    assert relay.received == []
    assert len((await call(direct.v1.customers.list, {"limit": 100})).data) == before


# --------------------------------------------------------------------------- transactions


async def test_customer_product_and_plan_in_one_transaction_roll_back_to_nothing(
        stripe_gw: Any, relay: Relay, localstripe_url: str) -> None:
    sdk = agent_client(stripe_gw)
    tx = f"billing-setup-{secrets.token_hex(4)}"
    cus = await call(sdk.v1.customers.create, {"email": "new@acme.test"}, opts(tx=tx))
    prod = await call(sdk.v1.products.create, {"name": "Acme Gold"}, opts(tx=tx))
    plan_id = f"acme-gold-{secrets.token_hex(4)}"  # a custom plan id
    plan = await call(sdk.v1.plans.create, {"id": plan_id, "amount": 4900, "currency": "usd", "interval": "month",
                                            "product": prod.id}, opts(tx=tx))
    assert plan.id == plan_id and plan.product == prod.id
    direct = direct_client(localstripe_url)
    for kind, oid in (("customers", cus.id), ("products", prod.id), ("plans", plan_id)):
        assert (await call(getattr(direct.v1, kind).retrieve, oid)).id == oid

    state = await rollback(stripe_gw, tx)
    assert state["state"] == "rolled_back", state
    assert [s["state"] for s in state["steps"]] == ["compensated"] * 3
    for kind, oid in (("customers", cus.id), ("products", prod.id), ("plans", plan_id)):
        await assert_gone(direct, kind, oid)
    # undone newest first, each DELETE with Tether's idempotency key and the upstream's credentials
    deletes = relay.seen("DELETE")
    assert [d.path for d in deletes] == [f"/v1/plans/{plan_id}", f"/v1/products/{prod.id}", f"/v1/customers/{cus.id}"]
    assert all(d.headers["Idempotency-Key"].startswith(f"tether-undo-{tx}-") for d in deletes)
    assert all(d.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" for d in deletes)


async def test_update_in_a_transaction_restores_the_touched_fields(stripe_gw: Any, relay: Relay,
                                                                   localstripe_url: str) -> None:
    direct = direct_client(localstripe_url)
    cus = await call(direct.v1.customers.create, {"email": "old@acme.test", "name": "Old Name",
                                                  "metadata": {"tier": "silver", "crm_id": "42"}})
    sdk = agent_client(stripe_gw)
    tx = f"upgrade-{secrets.token_hex(4)}"
    await call(sdk.v1.customers.update, cus.id, {"name": "New Name", "metadata": {"tier": "gold", "promo": "spring"}},
               opts("upgrade Acme to gold", tx=tx))
    now = await call(direct.v1.customers.retrieve, cus.id)
    assert now.name == "New Name" and now.metadata["tier"] == "gold"
    assert relay.seen("GET", f"/v1/customers/{cus.id}")  # the pre-image read went first

    state = await rollback(stripe_gw, tx)
    assert state["state"] == "rolled_back", state
    [undo] = [r for r in relay.seen("POST", f"/v1/customers/{cus.id}") if r.headers.get("Idempotency-Key", "")
              .startswith("tether-undo-")]
    # only what the write touched, metadata key by key; an absent key is unset with "" (the provenance keys
    # the write stamped included: after the rollback the customer no longer claims the undone write)
    got = form_of(undo)
    prov = {k: v for k, v in got["metadata"].items() if k.startswith("tether_")}
    assert prov and set(prov.values()) == {""}
    assert {**got, "metadata": {k: v for k, v in got["metadata"].items() if k not in prov}} == \
        {"name": "Old Name", "metadata": {"tier": "silver", "promo": ""}}
    after = await call(direct.v1.customers.retrieve, cus.id)
    assert after.name == "Old Name" and after.email == "old@acme.test"
    assert after.metadata["tier"] == "silver" and after.metadata["crm_id"] == "42"
    assert after.metadata.to_dict().get("promo") in (None, "")  # Stripe removes it; localstripe keeps ""


async def test_a_failed_write_rolls_the_transaction_back(stripe_gw: Any, relay: Relay, localstripe_url: str) -> None:
    sdk = agent_client(stripe_gw)
    tx = f"setup-{secrets.token_hex(4)}"
    cus = await call(sdk.v1.customers.create, {"email": "x@acme.test"}, opts(tx=tx))
    with pytest.raises(stripe.InvalidRequestError) as info:
        await call(sdk.v1.plans.create, {"amount": 100, "currency": "usd", "interval": "month",
                                         "product": "prod_DoesNotExist0"}, opts(tx=tx))
    assert info.value.http_status == 404
    assert info.value.headers["X-Tether-Transaction-State"] == "rolled_back"
    await assert_gone(direct_client(localstripe_url), "customers", cus.id)


async def test_a_refund_cannot_run_live_in_a_transaction(stripe_gw: Any, relay: Relay) -> None:
    sdk = agent_client(stripe_gw)
    with pytest.raises(stripe.PermissionError) as info:
        await call(sdk.v1.refunds.create, {"charge": "ch_1Abc", "amount": 500}, opts("refund", tx="refund-tx"))
    assert info.value.json_body["error"]["code"] == "non_compensable_in_transaction"
    assert relay.received == []


# --------------------------------------------------------------------------- tenant switches


async def test_stripe_account_is_refused_unless_the_capability_allows_it(stripe_gw: Any, relay: Relay) -> None:
    sdk = agent_client(stripe_gw)
    attempts = [
        lambda: sdk.v1.customers.retrieve("cus_Abc123", options=opts(stripe_account="acct_1SomeoneElse00")),
        lambda: sdk.v1.customers.retrieve("cus_Abc123", options=opts(stripe_context="acct_1SomeoneElse00")),
        # allow_accounts is per capability: customer.create allows none
        lambda: sdk.v1.customers.create({"email": "a@b.test"}, options=opts(stripe_account=ALLOWED_ACCOUNT)),
    ]
    for attempt in attempts:
        with pytest.raises(stripe.PermissionError) as info:
            await call(attempt)
        assert info.value.json_body["error"]["code"] == "tenant_switch_refused"
    assert relay.received == []
    # the allowed account passes, header and all (localstripe then has no such customer)
    with pytest.raises(stripe.InvalidRequestError):
        await call(sdk.v1.customers.retrieve, "cus_Abc123", options=opts(stripe_account=ALLOWED_ACCOUNT))
    assert relay.received[-1].headers["Stripe-Account"] == ALLOWED_ACCOUNT


async def test_an_allowed_account_travels_with_the_pre_image_and_the_undo(stripe_gw: Any, relay: Relay,
                                                                          localstripe_url: str) -> None:
    cus = await call(direct_client(localstripe_url).v1.customers.create, {"name": "Connected"})
    sdk = agent_client(stripe_gw)
    tx = f"connected-{secrets.token_hex(4)}"
    await call(sdk.v1.customers.update, cus.id, {"name": "Changed"},
               options=opts(tx=tx, stripe_account=ALLOWED_ACCOUNT))
    assert relay.seen("POST", f"/v1/customers/{cus.id}")[0].headers["Stripe-Account"] == ALLOWED_ACCOUNT
    state = await rollback(stripe_gw, tx)
    assert state["state"] == "rolled_back", state
    tether_own = [r for r in relay.received if r.method == "GET" or r.headers.get("Idempotency-Key", "")
                  .startswith("tether-undo-")]
    assert tether_own and all(r.headers.get("Stripe-Account") == ALLOWED_ACCOUNT for r in tether_own)


async def test_stripe_capabilities_as_mcp_tools_against_localstripe(make_gateway: Any, relay: Relay,
                                                                    tmp_path: Path) -> None:
    """The same Stripe capabilities through the MCP door: arguments become a form body (as Stripe takes
    it), provenance is stamped into the customer's metadata, the dry-run grant captures."""
    mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed")
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    rules = stripe_rules(relay.url, str(tmp_path / "stripe.db"))
    rules["server"]["mcp"] = {}
    gw = await make_gateway(rules)
    assert mcp is not None

    async def session_for(agent: str) -> Any:
        hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {gw.token(agent, 'ae:jane')}"},
                                timeout=httpx2.Timeout(30, read=60))
        return hc

    hc = await session_for("billing-bot")
    async with hc, streamable_http_client(f"{gw.url}/mcp", http_client=hc) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            res = await s.call_tool("customer_create", {"body": {"email": "ada@example.com", "name": "Ada",
                                                                 "metadata": {"tier": "gold"}},
                                                        "intent": "onboard Ada"})
            assert res.is_error is False, res
            cus = res.structured_content
            assert cus["id"].startswith("cus_") and cus["email"] == "ada@example.com"
            assert cus["metadata"]["tier"] == "gold" and cus["metadata"]["tether_agent"] == "billing-bot"
            got = await s.call_tool("customer_read", {"customer": cus["id"]})
            assert got.structured_content["id"] == cus["id"]
            bad = await s.call_tool("customer_read", {"customer": "not-a-customer-id"})
            assert bad.is_error and bad.structured_content["error"]["code"] == "bad_request"
            assert "customer" in bad.structured_content["error"]["message"]
    sent = relay.seen("POST", "/v1/customers")
    assert len(sent) == 1 and sent[0].headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form_of(sent[0])["metadata"]["tier"] == "gold" and form_of(sent[0])["email"] == "ada@example.com"

    hc = await session_for("drafter")
    async with hc, streamable_http_client(f"{gw.url}/mcp", http_client=hc) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            res = await s.call_tool("customer_create", {"body": {"email": "bob@example.com"}, "intent": "draft Bob"})
            assert res.structured_content["dry_run"] is True
            assert res.structured_content["synthetic"]["id"].startswith("cus_")  # the adapter's synthetic record
    assert len(relay.seen("POST", "/v1/customers")) == 1  # the capture reached nothing
