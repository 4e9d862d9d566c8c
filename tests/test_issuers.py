"""Identity from identity providers (issue 25): issuers by discovery with rotating keys, Kubernetes
service-account tokens, a verified human (X-Tether-User-Token and /_tether/token), require_verified_user,
readiness; and malformed tokens that must be 401, never 500 (issue 20 item 10).

Tokens are signed by tests/idp_fake.py, a real HTTP server on loopback serving discovery and JWKS;
every call goes agent -> Tether -> fake upstream over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import jwt
import pytest

from tests.conftest import SECRET, base_rules
from tests.idp_fake import FakeIdP
from tests.procs import run_cli

DELEGATION_SECRET = "delegation-secret-0123456789abcdef0123456789"


@pytest.fixture
async def idp():
    p = await FakeIdP().start()
    yield p
    await p.stop()


@pytest.fixture
async def people():
    """A second IdP standing for the company's workforce IdP (people's tokens)."""
    p = await FakeIdP(issuer_path="/people").start()
    yield p
    await p.stop()


def issuer_rules(upstream, tmp_path, idp: FakeIdP, people: FakeIdP | None = None, *, dev_key: bool = True,
                 keys: dict | None = None, **agent_entry: Any) -> dict[str, Any]:
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    entry = {"issuer": idp.issuer, "audience": "tether", "agent_claim": "azp",
             "keys": keys or {"min_ttl": 60, "unknown_kid_interval": 30}}
    entry.update(agent_entry)
    ident: dict[str, Any] = {"issuers": [entry]}
    if dev_key:
        ident["hs_secret"] = {"value": SECRET}
    if people is not None:
        ident["issuers"].append({"issuer": people.issuer, "use": "user", "audience": "renewal-app",
                                 "user_claim": "email", "keys": {"min_ttl": 60}})
        ident["token_exchange"] = {"signing_secret": {"value": DELEGATION_SECRET}, "ttl": "10m"}
    rules["identity"] = ident
    rules["agents"]["bot"]["grants"].append({"capability": "contact.delete", "mode": "live",
                                            "require_verified_user": True})
    return rules


def agent_token(idp: FakeIdP, agent: str = "bot", **kw: Any) -> str:
    return idp.token({"sub": f"client-{agent}", "azp": agent, "aud": "tether"}, **kw)


def person_token(people: FakeIdP, email: str = "jane@acme.example", **kw: Any) -> str:
    return people.token({"sub": f"00u{uuid.uuid4().hex[:6]}", "email": email, "aud": "renewal-app"}, **kw)


async def call(gw, token: str | None, method: str = "GET", path: str = "/echo", *,
               headers: dict[str, str] | None = None, **kw: Any):
    h = {"X-Tether-Intent": "test"}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    async with gw.session.request(method, f"{gw.upstream_url('crm')}{path}", headers=h, **kw) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


# --------------------------------------------------------------------------- issuers by discovery


async def test_agent_token_from_a_discovered_issuer(make_gateway, upstream, tmp_path, idp):
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp))
    assert idp.discovery_fetches == 1 and idp.jwks_fetches == 1  # fetched at start-up, before ready
    status, body, _ = await call(gw, agent_token(idp))
    assert status == 200, body
    assert upstream.received[-1].headers["X-Tether-Agent"] == "bot"
    # a token for another audience, or from an issuer nobody configured, is refused
    status, body, _ = await call(gw, idp.token({"azp": "bot", "sub": "x", "aud": "someone-else"}))
    assert (status, body["error"]["code"]) == (401, "token_audience_mismatch")
    other = await FakeIdP().start()
    try:
        status, body, _ = await call(gw, other.token({"azp": "bot", "sub": "x", "aud": "tether"}))
        assert (status, body["error"]["code"]) == (401, "token_issuer_mismatch")
    finally:
        await other.stop()
    # signed by a key the issuer never published, under a kid it did publish
    forged = idp.token({"azp": "bot", "sub": "x", "aud": "tether"}, kid=idp.keys[0][0], key=idp.new_key())
    status, body, _ = await call(gw, forged)
    assert (status, body["error"]["code"]) == (401, "token_invalid_signature")
    # the algorithm is pinned per issuer
    status, body, _ = await call(gw, jwt.encode({"iss": idp.issuer, "azp": "bot", "aud": "tether",
                                                 "exp": int(time.time()) + 60}, "k" * 64, algorithm="HS256"))
    assert (status, body["error"]["code"]) == (401, "token_algorithm_not_allowed")
    assert len(upstream.received) == 1


async def test_random_kids_cannot_make_tether_hammer_the_idp(make_gateway, upstream, tmp_path, idp):
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp, keys={"min_ttl": 60, "unknown_kid_interval": 60}))
    before = idp.jwks_fetches
    results = await asyncio.gather(*[
        call(gw, idp.token({"azp": "bot", "sub": "x", "aud": "tether"}, kid=f"random-{i}", key=idp.keys[0][1]))
        for i in range(200)])
    assert {(s, b["error"]["code"]) for s, b, _ in results} == {(401, "token_unknown_key")}
    assert idp.jwks_fetches - before <= 1  # one refresh for the whole burst, then none until the interval
    status, _, _ = await call(gw, agent_token(idp))
    assert status == 200  # the real key still works


async def test_rotation_mid_traffic_loses_no_request(make_gateway, upstream, tmp_path, idp):
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp))
    old_kid = idp.keys[0][0]
    old = agent_token(idp)
    stop = asyncio.Event()
    statuses: list[int] = []

    async def traffic(token_fn):
        while not stop.is_set():
            s, body, _ = await call(gw, token_fn())
            statuses.append(s)

    tasks = [asyncio.ensure_future(traffic(lambda: old)) for _ in range(3)]
    await asyncio.sleep(0.2)
    idp.rotate()  # the IdP signs with a new key from now on and publishes both
    tasks += [asyncio.ensure_future(traffic(lambda: agent_token(idp))) for _ in range(3)]
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert idp.keys[0][0] != old_kid
    # the old key withdrawn: once Tether refreshes, tokens signed with it (even cached ones) are refused
    idp.published = [idp.keys[0][0]]
    await gw.gw.state.verifier.keysets_in_use[0].refresh()
    status, body, _ = await call(gw, old)
    assert (status, body["error"]["code"]) == (401, "token_unknown_key")
    assert (await call(gw, agent_token(idp)))[0] == 200


async def test_unreachable_idp_keeps_cached_keys_and_fails_closed_without_any(make_gateway, upstream, tmp_path, idp):
    idp.max_age = 1
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp, keys={"min_ttl": 1, "unknown_kid_interval": 0.1,
                                                                         "retry_interval": 0.2}))
    idp.down = True
    await asyncio.sleep(1.5)  # the cache expired and background refreshes failed
    status, _, _ = await call(gw, agent_token(idp))
    assert status == 200  # known keys keep working
    async with gw.session.get(f"{gw.url}/_tether/readyz") as r:
        doc = await r.json()
        assert r.status == 200, doc
        assert "last refresh failed" in doc["checks"]["identity"][f"agent {idp.issuer}"]

    # a gateway that never had the keys: not ready, 503 (not 401: the token may be fine)
    rules = issuer_rules(upstream, tmp_path, idp, keys={"min_ttl": 1, "unknown_kid_interval": 0.1,
                                                        "retry_interval": 0.2})
    rules["server"]["store"] = str(tmp_path / "second.db")
    gw2 = await make_gateway(rules)
    async with gw2.session.get(f"{gw2.url}/_tether/readyz") as r:
        doc = await r.json()
        assert r.status == 503 and doc["checks"]["identity"][f"agent {idp.issuer}"].startswith("unavailable")
    status, body, _ = await call(gw2, agent_token(idp))
    assert (status, body["error"]["code"]) == (503, "identity_unavailable")
    idp.down = False
    for _ in range(50):  # the background retry picks the keys up
        async with gw2.session.get(f"{gw2.url}/_tether/readyz") as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.1)
    assert r.status == 200
    assert (await call(gw2, agent_token(idp)))[0] == 200


# --------------------------------------------------------------------------- Kubernetes


def kubelet_token(idp: FakeIdP, namespace: str, sa: str, *, aud: list[str] | None = None) -> str:
    """Shaped exactly like a projected service-account token from the kubelet (Kubernetes 1.29+)."""
    now = int(time.time())
    return idp.token({
        "aud": aud or ["tether"], "exp": now + 3607, "iat": now, "nbf": now,
        "jti": str(uuid.uuid4()), "sub": f"system:serviceaccount:{namespace}:{sa}",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-a", "uid": str(uuid.uuid4())},
            "pod": {"name": f"{sa}-7d4b9c-x2x9k", "uid": str(uuid.uuid4())},
            "serviceaccount": {"name": sa, "uid": str(uuid.uuid4())},
        },
    })


async def test_kubernetes_service_account_tokens_map_to_agents(make_gateway, upstream, tmp_path, idp):
    rules = issuer_rules(upstream, tmp_path, idp, kind="kubernetes", agent_claim="sub",
                         jwks_url=f"http://127.0.0.1:{idp.port}/jwks",
                         agents={"system:serviceaccount:sales:renewal-bot": "bot"})
    gw = await make_gateway(rules)
    assert idp.discovery_fetches == 0  # the JWKS URL was given: no discovery
    status, body, _ = await call(gw, kubelet_token(idp, "sales", "renewal-bot"))
    assert status == 200, body
    assert upstream.received[-1].headers["X-Tether-Agent"] == "bot"
    status, body, _ = await call(gw, kubelet_token(idp, "sales", "other-sa"))
    assert (status, body["error"]["code"]) == (403, "agent_unknown")
    assert "system:serviceaccount:sales:other-sa" in body["error"]["message"]
    status, body, _ = await call(gw, kubelet_token(idp, "sales", "renewal-bot", aud=["https://kubernetes.default.svc"]))
    assert (status, body["error"]["code"]) == (401, "token_audience_mismatch")
    assert len(upstream.received) == 1


def test_kubernetes_entries_need_a_service_account_table():
    from proxy.config import ConfigError, parse_rules

    rules = base_rules("http://127.0.0.1:1", "t.db")
    rules["identity"] = {"issuers": [{"issuer": "https://k8s.example", "audience": "tether", "kind": "kubernetes"}]}
    with pytest.raises(ConfigError, match="needs `agents`"):
        parse_rules(rules)
    rules["identity"]["issuers"][0]["agents"] = {"sales/renewal-bot": "bot"}
    with pytest.raises(ConfigError, match="system:serviceaccount"):
        parse_rules(rules)


# --------------------------------------------------------------------------- a verified human


async def test_user_token_makes_the_human_verified(make_gateway, upstream, tmp_path, idp, people):
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp, people))
    status, body, hdrs = await call(gw, agent_token(idp), headers={"X-Tether-User-Token": person_token(people)})
    assert status == 200, body
    got = upstream.received[-1]
    assert got.headers["X-Tether-On-Behalf-Of"] == "jane@acme.example"
    assert "X-Tether-User-Token" not in got.headers  # never forwarded
    recs = [r for r in await gw.journal() if r.get("request_id") == hdrs["X-Tether-Request-Id"]]
    assert {r["on_behalf_of_proof"] for r in recs} == {"verified"}
    # whoami says so too
    async with gw.session.get(f"{gw.url}/_tether/whoami", headers={
            "Authorization": f"Bearer {agent_token(idp)}", "X-Tether-User-Token": person_token(people)}) as r:
        assert (await r.json())["on_behalf_of_proof"] == "verified"


async def test_require_verified_user_refuses_asserted_and_forged_humans(make_gateway, upstream, tmp_path, idp, people):
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp, people))
    path = "/api/contacts/7"
    # a development token that merely names a human: asserted
    status, body, hdrs = await call(gw, gw.token("bot", on_behalf_of="jane@acme.example"), "DELETE", path)
    assert (status, body["error"]["code"]) == (403, "verified_user_required")
    rec = [r for r in await gw.journal() if r.get("request_id") == hdrs["X-Tether-Request-Id"]][0]
    assert rec["on_behalf_of_proof"] == "asserted" and rec["decision"] == "denied"
    # an agent token with no human at all
    assert (await call(gw, agent_token(idp), "DELETE", path))[1]["error"]["code"] == "verified_user_required"
    # a "user token" the agent signed itself (a key the people IdP never published)
    forged = people.token({"sub": "00uX", "email": "ceo@acme.example", "aud": "renewal-app"},
                          kid=people.keys[0][0], key=people.new_key())
    status, body, _ = await call(gw, agent_token(idp), "DELETE", path, headers={"X-Tether-User-Token": forged})
    assert (status, body["error"]["code"]) == (401, "token_invalid_signature")
    # a development token passed off as a user token: not from a use: user issuer
    status, body, _ = await call(gw, agent_token(idp), "DELETE", path,
                                 headers={"X-Tether-User-Token": gw.token("ceo@acme.example")})
    assert (status, body["error"]["code"]) == (401, "token_issuer_mismatch")
    # the agent's own IdP token passed off as a person's
    status, body, _ = await call(gw, agent_token(idp), "DELETE", path,
                                 headers={"X-Tether-User-Token": agent_token(idp)})
    assert (status, body["error"]["code"]) == (401, "token_issuer_mismatch")
    # a person's token passed off as an agent's
    status, body, _ = await call(gw, person_token(people), "GET", "/echo")
    assert (status, body["error"]["code"]) == (401, "token_issuer_mismatch")
    # a person's token whose human differs from what the agent's token asserts
    status, body, _ = await call(gw, gw.token("bot", on_behalf_of="bob@acme.example"), "DELETE", path,
                                 headers={"X-Tether-User-Token": person_token(people)})
    assert (status, body["error"]["code"]) == (401, "token_user_mismatch")
    assert not [r for r in upstream.received if r.method == "DELETE"]
    # the real thing passes
    status, body, _ = await call(gw, agent_token(idp), "DELETE", path,
                                 headers={"X-Tether-User-Token": person_token(people)})
    assert status in (200, 204, 404), body
    assert [r.method for r in upstream.received if r.method == "DELETE"] == ["DELETE"]


async def exchange(gw, data: dict[str, str], headers: dict[str, str] | None = None):
    async with gw.session.post(f"{gw.url}/_tether/token", data=data, headers=headers or {}) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_token_exchange_issues_a_delegation_token(make_gateway, upstream, tmp_path, idp, people):
    gw = await make_gateway(issuer_rules(upstream, tmp_path, idp, people))
    person = person_token(people, ttl=300)
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": person,
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token", "actor_token": agent_token(idp),
            "actor_token_type": "urn:ietf:params:oauth:token-type:jwt"}
    status, doc, hdrs = await exchange(gw, form)
    assert status == 200, doc
    assert doc["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt" and doc["token_type"] == "Bearer"
    assert hdrs["Cache-Control"] == "no-store"
    claims = jwt.decode(doc["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "jane@acme.example" and claims["act"] == {"sub": "bot"}
    assert claims["exp"] <= jwt.decode(person, options={"verify_signature": False})["exp"]  # never outlives it
    assert doc["expires_in"] <= 300
    # the delegation token alone now satisfies require_verified_user
    status, body, rh = await call(gw, doc["access_token"], "DELETE", "/api/contacts/9")
    assert status in (200, 204, 404), body
    assert upstream.received[-1].headers["X-Tether-On-Behalf-Of"] == "jane@acme.example"
    recs = await gw.journal()
    assert [r for r in recs if r.get("request_id") == rh["X-Tether-Request-Id"]][0]["on_behalf_of_proof"] == "verified"
    granted = [r for r in recs if r.get("path") == "/_tether/token"]
    assert granted[-1]["decision"] == "allowed" and granted[-1]["agent"] == "bot"
    assert granted[-1]["on_behalf_of"] == "jane@acme.example" and granted[-1]["on_behalf_of_proof"] == "verified"
    # the actor may also come as the Authorization header
    f2 = {k: v for k, v in form.items() if not k.startswith("actor")}
    status, doc2, _ = await exchange(gw, f2, {"Authorization": f"Bearer {agent_token(idp)}"})
    assert status == 200, doc2

    # refusals: RFC 6749 error bodies with Tether's code, journaled
    status, err, _ = await exchange(gw, {**form, "subject_token": gw.token("ceo@acme.example")})
    assert status == 400 and err["error"] == "invalid_request" and err["error_code"] == "token_issuer_mismatch"
    status, err, _ = await exchange(gw, {**form, "actor_token": doc["access_token"]})  # no re-delegation
    assert status == 400 and "already acts" in err["error_description"]
    status, err, _ = await exchange(gw, {**form, "grant_type": "client_credentials"})
    assert status == 400 and err["error"] == "unsupported_grant_type"
    status, err, _ = await exchange(gw, f2, {"Authorization": "Bearer junk"})
    assert status == 401 and err["error_code"] == "token_malformed"
    denied = [r for r in await gw.journal() if r.get("path") == "/_tether/token" and r["decision"] == "denied"]
    assert len(denied) == 4


# --------------------------------------------------------------------------- malformed tokens (issue 20 item 10)


def _b64(d: Any) -> str:
    raw = d if isinstance(d, bytes) else json.dumps(d).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs_token(header: dict[str, Any], payload: Any, secret: str = SECRET) -> str:
    signing = f"{_b64(header)}.{_b64(payload)}"
    sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(sig)}"


def _claims(**kw: Any) -> dict[str, Any]:
    c = {"sub": "bot", "iss": "tether", "aud": "tether", "exp": int(time.time()) + 600}
    c.update(kw)
    return c


MALFORMED = {
    "crit": ({"alg": "HS256", "crit": ["exp"]}, _claims()),
    "crit-b64": ({"alg": "HS256", "crit": ["b64"], "b64": False}, _claims()),
    "kid-object": ({"alg": "HS256", "kid": {"x": 1}}, _claims()),
    "kid-list": ({"alg": "HS256", "kid": ["a"]}, _claims()),
    "kid-number": ({"alg": "HS256", "kid": 7}, _claims()),
    "alg-list": ({"alg": ["HS256"]}, _claims()),
    "typ-number": ({"alg": "HS256", "typ": 5}, _claims()),
    "jwk-string": ({"alg": "HS256", "jwk": "x"}, _claims()),
    "exp-bool": ({"alg": "HS256"}, _claims(exp=True)),
    "exp-huge": ({"alg": "HS256"}, json.dumps(_claims()).replace('"exp": ', '"exp": 1' + "0" * 400 + ', "x": ').encode()),
    "exp-infinite": ({"alg": "HS256"}, json.dumps(_claims()).replace('"exp": ', '"exp": 1e400, "x": ').encode()),
    "iat-string": ({"alg": "HS256"}, _claims(iat="yesterday")),
    "sub-crlf": ({"alg": "HS256"}, _claims(sub="bot\r\nX-Injected: 1")),
    "sub-nul": ({"alg": "HS256"}, _claims(sub="bot\x00")),
    "sub-del": ({"alg": "HS256"}, _claims(sub="bot\x7f")),
    "sub-c1": ({"alg": "HS256"}, _claims(sub="bot\x85")),
    "sub-line-separator": ({"alg": "HS256"}, _claims(sub="bot\u2028")),
    "sub-bidi": ({"alg": "HS256"}, _claims(sub="bot\u202e")),
    "act-sub-crlf": ({"alg": "HS256"}, _claims(sub="jane", act={"sub": "bot\r\nX-Injected: 1"})),
    "human-lf": ({"alg": "HS256"}, _claims(sub="jane\nX-Injected: 1", act={"sub": "bot"})),
    "human-too-long": ({"alg": "HS256"}, _claims(sub="j" * 300, act={"sub": "bot"})),
}
_CODES = {"sub-crlf": "token_malformed", "act-sub-crlf": "token_malformed"}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_tokens_are_401_everywhere(gateway, upstream, name):
    header, payload = MALFORMED[name]
    token = hs_token(header, payload)
    before = len(upstream.received)
    status, body, hdrs = await call(gateway, token, "PATCH", "/api/contacts/1", json={"name": "x"})
    assert (status, body["error"]["code"]) == (401, "token_malformed"), body
    assert "WWW-Authenticate" in hdrs
    async with gateway.session.get(f"{gateway.url}/_tether/whoami", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "token_malformed"
    async with gateway.session.get(f"{gateway.admin_url}/api/review/items",
                                   headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "token_malformed"
    async with gateway.session.post(f"{gateway.url}/_tether/transactions", json={"name": "t"},
                                    headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401
    assert len(upstream.received) == before  # nothing forwarded, no 502 to count against the upstream


async def test_a_refused_claim_never_counts_as_an_upstream_error(gateway, upstream):
    for _ in range(5):
        status, _, _ = await call(gateway, hs_token({"alg": "HS256"}, _claims(sub="bot\r\nX: y")))
        assert status == 401
    recs = await gateway.journal()
    assert not any(r.get("error") == "upstream_unavailable" or r.get("status") == 502 for r in recs)
    assert not any(r.get("agent", "") and "\r" in r["agent"] for r in recs)


# --------------------------------------------------------------------------- loud at start-up


async def test_missing_dev_secret_makes_readyz_not_ready(make_gateway, upstream, tmp_path, monkeypatch):
    monkeypatch.delenv("TETHER_TEST_ABSENT_SECRET", raising=False)
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["identity"] = {"hs_secret": {"env": "TETHER_TEST_ABSENT_SECRET"}}
    gw = await make_gateway(rules)
    async with gw.session.get(f"{gw.url}/_tether/readyz") as r:
        doc = await r.json()
        assert r.status == 503
        assert "TETHER_TEST_ABSENT_SECRET" in doc["checks"]["identity"]["local"]
    status, body, _ = await call(gw, hs_token({"alg": "HS256"}, _claims()))
    assert (status, body["error"]["code"]) == (503, "identity_unavailable")
    monkeypatch.setenv("TETHER_TEST_ABSENT_SECRET", SECRET)
    async with gw.session.get(f"{gw.url}/_tether/readyz") as r:
        assert r.status == 200
    assert (await call(gw, hs_token({"alg": "HS256"}, _claims())))[0] == 200


def test_token_mint_without_its_secret_prints_one_line(tmp_path):
    rules = base_rules("http://127.0.0.1:1", "t.db")
    rules["identity"] = {"hs_secret": {"env": "TETHER_TEST_ABSENT_SECRET"}}
    import yaml

    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    env = {k: v for k, v in __import__("os").environ.items() if k != "TETHER_TEST_ABSENT_SECRET"}
    r = run_cli("token", "mint", "--config", str(path), "--agent", "bot", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "TETHER_TEST_ABSENT_SECRET is not set" in r.stderr
