"""simple-salesforce, unchanged, pointed at Tether's TLS listener, against a stateful fake Salesforce.

The SDK gets ``instance_url=https://127.0.0.1:<Tether's salesforce listener>`` and the agent's JWT as its
``session_id`` (it sends ``Authorization: Bearer <session_id>``); Tether verifies it, strips it and sends
the upstream's own token. The requests session trusts the dev certificate Tether serves
(``proxy.cli.certs.make_dev_cert``) and carries ``X-Tether-Intent`` (and ``X-Tether-Transaction``). The SDK is
synchronous, so it runs in a thread while Tether and the fake serve on the test's event loop.

The rules are ``rules/salesforce.yaml`` itself, re-pointed at the fake and at loopback ports."""

from __future__ import annotations

import asyncio
import functools
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import yaml
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError, SalesforceExpiredSession, SalesforceRefusedRequest

from adapters.base import PlannedRequest, UndoPlan
from adapters.salesforce import SalesforceAdapter, to_18
from proxy.cli.certs import make_dev_cert
from tests.conftest import SECRET, GatewayHandle
from tests.sf_fake import SalesforceFake

ROOT = Path(__file__).resolve().parent.parent
INTENT = "renew Acme Corp contract"
PROVENANCE = ("Agent_Id__c", "On_Behalf_Of__c", "Agent_Intent__c", "Authz_Event__c")
V = "/services/data/v59.0"


@pytest.fixture
async def fake() -> Any:
    sf = await SalesforceFake().start()
    yield sf
    await sf.stop()


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_dev_cert(tmp_path / "certs", ["127.0.0.1", "localhost"])


def sf_rules(fake: SalesforceFake, cert: tuple[Path, Path], tmp_path: Path) -> dict[str, Any]:
    """rules/salesforce.yaml, re-pointed at the fake, loopback ports, the dev certificate and a test store."""
    doc = yaml.safe_load((ROOT / "rules" / "salesforce.yaml").read_text())
    doc["server"] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": str(tmp_path / "t.db"),
                     "transactions": {"retry_attempts": 2, "retry_backoff": 0.05}}
    doc["identity"] = {"hs_secret": {"value": SECRET}}
    up = doc["upstreams"]["salesforce"]
    up.update(url=fake.url, listen="127.0.0.1:0", tls={"cert": str(cert[0]), "key": str(cert[1])},
              credentials={"type": "bearer", "token": {"value": fake.token}})
    return doc


def grant_live(doc: dict[str, Any], agent: str, capability: str) -> None:
    grants = doc["agents"][agent]["grants"]
    grants[:] = [g for g in grants if (g if isinstance(g, str) else g["capability"]) != capability]
    grants.append({"capability": capability, "mode": "live"})


@pytest.fixture
async def gw(make_gateway: Any, fake: SalesforceFake, cert: tuple[Path, Path], tmp_path: Path) -> GatewayHandle:
    return await make_gateway(sf_rules(fake, cert, tmp_path))


@pytest.fixture
def world(fake: SalesforceFake) -> dict[str, Any]:
    acct = fake.insert("Account", Name="Acme Corp", Industry="Energy")
    opp = fake.insert("Opportunity", Name="Acme renewal 2026", AccountId=acct["Id"], StageName="Proposal/Price Quote",
                      CloseDate="2026-03-31", Amount=100000)
    return {"acct": acct["Id"], "opp": opp["Id"]}


def client(gw: GatewayHandle, cert: tuple[Path, Path], agent: str = "renewal-bot", *,
           on_behalf_of: str | None = "ae:jane@acme", intent: str | None = INTENT, tx: str | None = None,
           session_id: str | None = None) -> Salesforce:
    """simple-salesforce as an agent would build it, with a requests session that trusts the dev cert."""
    s = requests.Session()
    s.trust_env = False  # no proxies or CA bundles from the environment
    s.verify = str(cert[0])
    if intent:
        s.headers["X-Tether-Intent"] = intent
    if tx:
        s.headers["X-Tether-Transaction"] = tx
    url = gw.upstream_url("salesforce")
    assert url.startswith("https://127.0.0.1:")
    return Salesforce(instance_url=url, session_id=session_id or gw.token(agent, on_behalf_of), session=s,
                      version="59.0")


async def run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(functools.partial(fn, *args, **kw))


def is_sf_id(value: Any, prefix: str) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9]{18}", value) is not None \
        and to_18(value[:15]) == value and value.startswith(prefix)


def plain(state: dict[str, Any]) -> dict[str, Any]:
    """Records without null fields (a restored field that was never set comes back as null)."""
    return {t: {i: {k: v for k, v in r.items() if v is not None} for i, r in recs.items()}
            for t, recs in state.items()}


async def tx_action(gw: GatewayHandle, tx: str, action: str, agent: str = "renewal-bot") -> dict[str, Any]:
    async with gw.session.post(f"{gw.url}/_tether/transactions/{tx}/{action}", headers=gw.headers(agent)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_reads_pass_through_with_the_upstream_credentials(gw, fake, cert, world) -> None:
    sf = client(gw, cert)
    opp = await run(sf.Opportunity.get, world["opp"])
    assert opp["StageName"] == "Proposal/Price Quote" and opp["attributes"]["type"] == "Opportunity"
    res = await run(sf.query, f"SELECT Id, StageName FROM Opportunity WHERE Id = '{world['opp'][:15]}'")
    assert res["totalSize"] == 1 and res["records"][0]["Id"] == world["opp"]
    acct = await run(sf.Account.get, world["acct"][:15], params={"fields": "Name"})
    assert acct["Name"] == "Acme Corp" and "Industry" not in acct
    assert [(r.method, r.path) for r in fake.received] == [
        ("GET", f"{V}/sobjects/Opportunity/{world['opp']}"), ("GET", f"{V}/query"),  # the path matched (no '/')
        ("GET", f"{V}/sobjects/Account/{world['acct'][:15]}")]
    token = gw.token("renewal-bot", "ae:jane@acme")
    for r in fake.received:
        assert r.headers["Authorization"] == f"Bearer {fake.token}"
        assert r.headers["X-Tether-Agent"] == "renewal-bot" and r.headers["X-Tether-On-Behalf-Of"] == "ae:jane@acme"
        assert token.split(".")[1] not in str(r.headers)
    assert "fields=Name" in fake.received[2].query and "q=SELECT" in fake.received[1].query
    # an SDK holding a real Salesforce session id (not an agent token) gets nowhere
    with pytest.raises(SalesforceExpiredSession):
        await run(client(gw, cert, session_id="00Dxx0000001gEF!AQcAQH0dMHZfz972Szmpkb58urFRkgeBGsxL").Opportunity.get,
                  world["opp"])
    assert len(fake.received) == 3


async def test_writes_carry_upstream_credentials_provenance_headers_and_stamped_fields(gw, fake, cert, world) -> None:
    sf = client(gw, cert)
    made = await run(sf.Contact.create, {"FirstName": "Jane", "LastName": "Doe", "AccountId": world["acct"]})
    assert made["success"] is True and is_sf_id(made["id"], "003")
    status = await run(sf.Opportunity.update, world["opp"], {"StageName": "Negotiation/Review", "Amount": 110000})
    assert status == 204
    post, patch = fake.writes()
    # simple-salesforce adds a trailing slash; the path forwarded is the path matched (the template has none)
    assert post.path == f"{V}/sobjects/Contact"
    assert patch.path == f"{V}/sobjects/Opportunity/{world['opp']}"
    journal = {r["capability"]: r for r in await gw.journal() if r["kind"] == "request"}
    for sent, cap in ((post, "contact.create"), (patch, "opportunity.update_stage")):
        h = sent.headers
        assert h["Authorization"] == f"Bearer {fake.token}" and h["X-Tether-Intent"] == INTENT
        assert h["X-Tether-Agent"] == "renewal-bot" and h["X-Tether-On-Behalf-Of"] == "ae:jane@acme"
        assert h["X-Tether-Authz-Event"] == str(journal[cap]["seq"]) and journal[cap]["decision"] == "live"
        assert sent.json()["Agent_Id__c"] == "renewal-bot"
    contact = fake.record("Contact", made["id"])
    assert contact["LastName"] == "Doe" and contact["AccountId"] == world["acct"]
    opp = fake.record("Opportunity", world["opp"])
    assert (opp["StageName"], opp["Amount"]) == ("Negotiation/Review", 110000)
    for rec, cap in ((contact, "contact.create"), (opp, "opportunity.update_stage")):
        assert [rec[f] for f in PROVENANCE] == ["renewal-bot", "ae:jane@acme", INTENT, str(journal[cap]["seq"])]
    # a value the rules refuse never leaves Tether
    with pytest.raises(SalesforceError) as ei:
        await run(sf.Opportunity.update, world["opp"], {"StageName": "Closed Lost"})
    assert ei.value.status == 422 and ei.value.content["error"]["code"] == "constraint_violated"
    assert len(fake.writes()) == 2


async def test_dry_run_writes_get_answers_the_sdk_accepts_and_nothing_reaches_salesforce(gw, fake, cert, world) -> None:
    sf = client(gw, cert, "renewal-bot-v3")
    before = fake.state(system=True)
    assert await run(sf.Opportunity.update, world["opp"], {"StageName": "Closed Won"}) == 204
    made = await run(sf.Opportunity.create, {"Name": "Acme renewal 2027", "AccountId": world["acct"],
                                             "StageName": "Prospecting", "CloseDate": "2027-03-31"})
    assert made["success"] is True and made["errors"] == [] and is_sf_id(made["id"], "006")
    assert fake.received == [] and fake.state(system=True) == before
    items = (await (await gw.admin("GET", "/api/review/items")).json())["items"]
    assert sorted(i["capability"] for i in items) == ["opportunity.create", "opportunity.update_stage"]
    assert all(i["state"] == "pending" and i["agent"] == "renewal-bot-v3" for i in items)
    # a reviewer approves the stage change: it is replayed to Salesforce with the upstream's token
    stage = next(i for i in items if i["capability"] == "opportunity.update_stage")
    r = await gw.admin("POST", f"/api/review/items/{stage['id']}/approve", json={"note": "ok"})
    assert r.status == 200 and (await r.json())["state"] == "replayed"
    (sent,) = fake.writes()
    assert sent.method == "PATCH" and sent.headers["Authorization"] == f"Bearer {fake.token}"
    assert fake.record("Opportunity", world["opp"])["StageName"] == "Closed Won"


async def test_a_transaction_of_create_and_update_rolls_back_to_the_prior_state(gw, fake, cert, world) -> None:
    before = plain(fake.state())
    sf = client(gw, cert, tx="renew-acme-1")
    made = await run(sf.Contact.create, {"LastName": "Signer", "AccountId": world["acct"]})
    assert await run(sf.Opportunity.update, world["opp"], {"StageName": "Closed Won", "Amount": 120000}) == 204
    assert fake.record("Opportunity", world["opp"])["Agent_Id__c"] == "renewal-bot"
    assert plain(fake.state()) != before
    tx = await tx_action(gw, "renew-acme-1", "rollback")
    assert tx["state"] == "rolled_back" and [s["state"] for s in tx["steps"]] == ["compensated", "compensated"]
    assert plain(fake.state()) == before
    assert fake.record("Contact", made["id"]) is None
    undo = [r for r in fake.received if r.headers.get("X-Tether-Intent", "").startswith("rollback of transaction")]
    assert [(r.method, r.path) for r in undo if r.method != "GET"] == [
        ("PATCH", f"{V}/sobjects/Opportunity/{world['opp']}"), ("DELETE", f"{V}/sobjects/Contact/{made['id']}")]
    assert all(r.headers["Authorization"] == f"Bearer {fake.token}" for r in undo)


async def test_a_concurrent_change_is_flagged_not_overwritten(gw, fake, cert, world) -> None:
    sf = client(gw, cert, tx="renew-acme-2")
    await run(sf.Opportunity.update, world["opp"], {"StageName": "Negotiation/Review"})
    fake.tables["opportunity"][world["opp"]]["StageName"] = "Closed Won"  # a human moved it meanwhile
    tx = await tx_action(gw, "renew-acme-2", "rollback")
    assert tx["state"] == "needs_attention" and tx["steps"][0]["state"] == "conflict"
    assert fake.record("Opportunity", world["opp"])["StageName"] == "Closed Won"


async def test_composite_with_one_ungranted_sub_request_is_refused_whole(gw, fake, cert, world) -> None:
    sf = client(gw, cert)
    body = {"allOrNone": True, "compositeRequest": [
        {"method": "PATCH", "url": f"{V}/sobjects/Opportunity/{world['opp']}", "referenceId": "stage",
         "body": {"StageName": "Closed Won"}},
        {"method": "PATCH", "url": f"{V}/sobjects/Account/{world['acct']}", "referenceId": "acct",
         "body": {"Industry": "Utilities"}}]}
    with pytest.raises(SalesforceRefusedRequest) as ei:
        await run(sf.restful, "composite", method="POST", json=body)
    assert ei.value.status == 403 and ei.value.content["error"]["code"] == "capability_not_granted"
    assert "sub-request 1" in ei.value.content["error"]["message"]
    body["compositeRequest"][1] = {"method": "PATCH", "url": f"{V}/sobjects/Opportunity/@{{nobody.id}}",
                                   "referenceId": "acct", "body": {"StageName": "Closed Won"}}
    with pytest.raises(SalesforceError) as ei:
        await run(sf.restful, "composite", method="POST", json=body)
    assert ei.value.status == 400 and ei.value.content["error"]["code"] == "unresolved_reference"
    assert fake.received == []


async def test_a_granted_composite_runs_live_with_its_references(gw, fake, cert, world) -> None:
    sf = client(gw, cert)
    body = {"allOrNone": True, "compositeRequest": [
        {"method": "GET", "url": f"{V}/sobjects/Opportunity/{world['opp']}?fields=AccountId", "referenceId": "opp"},
        {"method": "PATCH", "url": f"{V}/sobjects/opportunity/@{{opp.Id}}", "referenceId": "stage",
         "body": {"StageName": "Closed Won"}},
        {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "signer",
         "body": {"LastName": "Signer", "AccountId": "@{opp.AccountId}"}}]}
    out = await run(sf.restful, "composite", method="POST", json=body)
    assert [(i["referenceId"], i["httpStatusCode"]) for i in out["compositeResponse"]] == [
        ("opp", 200), ("stage", 204), ("signer", 201)]
    signer = out["compositeResponse"][2]["body"]["id"]
    assert is_sf_id(signer, "003") and fake.record("Contact", signer)["AccountId"] == world["acct"]
    assert fake.record("Opportunity", world["opp"])["StageName"] == "Closed Won"
    (sent,) = fake.writes()
    assert sent.path == f"{V}/composite" and sent.json()["allOrNone"] is True  # the envelope passes through
    assert [(i["method"], i["url"]) for i in sent.json()["compositeRequest"]] == [
        (i["method"], i["url"]) for i in body["compositeRequest"]]
    (rec,) = [r for r in await gw.journal() if r["kind"] == "request"]
    assert [(o["method"], o["capability"]) for o in rec["operations"]] == [
        ("GET", "opportunity.read"), ("PATCH", "opportunity.update_stage"), ("POST", "contact.create")]


async def test_an_atomic_composite_in_a_transaction_is_undone_sub_request_by_sub_request(gw, fake, cert, world) -> None:
    before = plain(fake.state())
    sf = client(gw, cert, tx="renew-acme-3")
    body: dict[str, Any] = {"allOrNone": True, "compositeRequest": [
        {"method": "PATCH", "url": f"{V}/sobjects/Opportunity/{world['opp']}", "referenceId": "stage",
         "body": {"StageName": "Closed Won", "Amount": 130000}},
        {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "signer",
         "body": {"LastName": "Signer", "AccountId": world["acct"]}}]}
    refusals = []
    for variant in ({**body, "allOrNone": False},
                    {**body, "compositeRequest": [{"method": "GET", "url": f"{V}/sobjects/Opportunity/{world['opp']}",
                                                   "referenceId": "opp"},
                                                  {**body["compositeRequest"][0],
                                                   "url": f"{V}/sobjects/Opportunity/@{{opp.Id}}"}]}):
        with pytest.raises(SalesforceRefusedRequest) as ei:
            await run(sf.restful, "composite", method="POST", json=variant)
        refusals.append(ei.value.content["error"])
    assert [e["code"] for e in refusals] == ["non_compensable_in_transaction"] * 2
    assert "allOrNone: true" in refusals[0]["message"] and "known only when Salesforce runs" in refusals[1]["message"]
    assert fake.writes() == []
    out = await run(sf.restful, "composite", method="POST", json=body)
    assert [i["httpStatusCode"] for i in out["compositeResponse"]] == [204, 201]
    signer = out["compositeResponse"][1]["body"]["id"]
    assert fake.record("Contact", signer) is not None
    tx = await tx_action(gw, "renew-acme-3", "rollback")
    assert tx["state"] == "rolled_back" and [s["state"] for s in tx["steps"]] == ["compensated", "compensated"]
    assert plain(fake.state()) == before


async def test_a_tree_in_a_transaction_is_undone_record_by_record(gw, fake, cert, world) -> None:
    before = plain(fake.state())
    sf = client(gw, cert, "data-steward", tx="onboard-globex")
    tree = {"records": [{"attributes": {"type": "Account", "referenceId": "globex"}, "Name": "Globex",
                         "Contacts": {"records": [
                             {"attributes": {"type": "Contact", "referenceId": "hank"}, "LastName": "Scorpio"},
                             {"attributes": {"type": "Contact", "referenceId": "homer"}, "LastName": "Simpson"}]}}]}
    out = await run(sf.restful, "composite/tree/Account", method="POST", json=tree)
    assert out["hasErrors"] is False and [r["referenceId"] for r in out["results"]] == ["globex", "hank", "homer"]
    ids = {r["referenceId"]: r["id"] for r in out["results"]}
    assert fake.record("Contact", ids["hank"])["AccountId"] == ids["globex"]
    tx = await tx_action(gw, "onboard-globex", "rollback", agent="data-steward")
    assert tx["state"] == "rolled_back" and len(tx["steps"]) == 3
    deletes = [r.path for r in fake.writes() if r.method == "DELETE"]
    assert deletes == [f"{V}/sobjects/Contact/{ids['homer']}", f"{V}/sobjects/Contact/{ids['hank']}",
                       f"{V}/sobjects/Account/{ids['globex']}"]  # children first
    assert plain(fake.state()) == before


async def test_a_dry_run_composite_gets_a_composite_envelope(gw, fake, cert, world) -> None:
    sf = client(gw, cert, "renewal-bot-v3")
    out = await run(sf.restful, "composite", method="POST", json={"allOrNone": True, "compositeRequest": [
        {"method": "PATCH", "url": f"{V}/sobjects/Opportunity/{world['opp']}", "referenceId": "stage",
         "body": {"StageName": "Closed Won"}},
        {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "signer",
         "body": {"LastName": "Signer", "AccountId": world["acct"]}}]})
    items = out["compositeResponse"]
    assert [(i["referenceId"], i["httpStatusCode"]) for i in items] == [("stage", 204), ("signer", 201)]
    assert is_sf_id(items[1]["body"]["id"], "003") and items[1]["body"]["success"] is True
    assert fake.received == []


async def test_http_method_override_is_matched_as_the_real_method(gw, fake, cert, world) -> None:
    sf = client(gw, cert)
    got = await run(sf.restful, f"sobjects/Opportunity/{world['opp']}", method="POST",
                    params={"_HttpMethod": "PATCH"}, json={"StageName": "Closed Won"})
    assert got is None  # 204
    (sent,) = fake.writes()
    assert (sent.method, sent.query) == ("POST", "_HttpMethod=PATCH")
    assert sent.json() == {"StageName": "Closed Won", **{f: sent.json()[f] for f in PROVENANCE}}
    assert fake.record("Opportunity", world["opp"])["StageName"] == "Closed Won"
    (rec,) = [r for r in await gw.journal() if r["kind"] == "request"]
    assert (rec["method"], rec["capability"]) == ("PATCH", "opportunity.update_stage")
    with pytest.raises(SalesforceRefusedRequest) as ei:  # a delete in disguise is still a delete
        await run(sf.restful, f"sobjects/Opportunity/{world['opp']}", method="POST", params={"_HttpMethod": "DELETE"})
    assert ei.value.content["error"]["code"] == "route_not_registered"
    with pytest.raises(SalesforceError) as ei:  # Salesforce honours it on POST only: anything else is ambiguous
        await run(sf.restful, f"sobjects/Opportunity/{world['opp']}", method="GET", params={"_HttpMethod": "DELETE"})
    assert ei.value.status == 400 and ei.value.content["error"]["code"] == "ambiguous_request"
    assert len(fake.writes()) == 1 and fake.record("Opportunity", world["opp"]) is not None


async def test_object_name_spellings_hit_the_same_grant(gw, fake, cert, world) -> None:
    sf = client(gw, cert)
    assert await run(sf.opportunity.update, world["opp"], {"StageName": "Closed Won"}) == 204
    assert (await run(sf.OPPORTUNITY.get, world["opp"]))["StageName"] == "Closed Won"
    with pytest.raises(SalesforceRefusedRequest) as ei:
        await run(sf.account.update, world["acct"], {"Industry": "Utilities"})
    assert ei.value.content["error"]["code"] == "capability_not_granted"
    caps = [(r["path"].split("/")[5], r["capability"]) for r in await gw.journal() if r["kind"] == "request"]
    assert caps == [("opportunity", "opportunity.update_stage"), ("OPPORTUNITY", "opportunity.read"),
                    ("account", "account.update")]
    assert [r.method for r in fake.received] == ["PATCH", "GET"]


async def test_upserts_in_a_transaction_are_undone_whether_they_created_or_updated(make_gateway, fake, cert, tmp_path,
                                                                                    world) -> None:
    doc = sf_rules(fake, cert, tmp_path)
    grant_live(doc, "renewal-bot", "renewal.upsert")
    gw = await make_gateway(doc)
    fake.insert("Opportunity", Name="Acme renewal 2026", AccountId=world["acct"], StageName="Qualification",
                CloseDate="2026-06-30", Renewal_Key__c="ACME-2026-1", Amount=50000)
    before = plain(fake.state())
    sf = client(gw, cert, tx="upserts")
    created = await run(sf.Opportunity.upsert, "Renewal_Key__c/ACME-2027-1", {
        "Name": "Acme renewal 2027", "AccountId": world["acct"], "StageName": "Prospecting", "CloseDate": "2027-06-30"},
        raw_response=True)
    assert created.status_code == 201 and created.json()["created"] is True
    updated = await run(sf.Opportunity.upsert, "Renewal_Key__c/ACME-2026-1", {"Amount": 55000}, raw_response=True)
    assert updated.status_code == 200 and updated.json()["created"] is False
    lookups = [r.query for r in fake.seen("GET", "/query")]
    assert len(lookups) == 2 and all("Renewal_Key__c" in q for q in lookups)  # pre-images read by external id
    tx = await tx_action(gw, "upserts", "rollback")
    assert tx["state"] == "rolled_back" and [s["state"] for s in tx["steps"]] == ["compensated", "compensated"]
    assert plain(fake.state()) == before


async def test_deletes_stay_out_of_transactions_unless_recreating_is_allowed(make_gateway, fake, cert, tmp_path,
                                                                             world) -> None:
    doc = sf_rules(fake, cert, tmp_path)
    grant_live(doc, "data-steward", "contact.delete")
    gw = await make_gateway(doc)
    dup = fake.insert("Contact", LastName="Doe", FirstName="Jane", AccountId=world["acct"], Email="jane@acme.example")
    sf = client(gw, cert, "data-steward", tx="dedupe")
    with pytest.raises(SalesforceRefusedRequest) as ei:
        await run(sf.Contact.delete, dup["Id"])
    err = ei.value.content["error"]
    assert err["code"] == "non_compensable_in_transaction" and "SOAP or Apex" in err["message"]
    assert fake.writes() == [] and fake.record("Contact", dup["Id"]) is not None
    assert await run(client(gw, cert, "data-steward").Contact.delete, dup["Id"]) == 204  # outside: it runs
    assert fake.record("Contact", dup["Id"]) is None

    doc["upstreams"]["salesforce"]["adapter_options"]["recreate_on_delete"] = True
    doc["server"]["store"] = str(tmp_path / "t2.db")
    gw2 = await make_gateway(doc)
    again = fake.insert("Contact", LastName="Roe", AccountId=world["acct"])
    sf = client(gw2, cert, "data-steward", tx="dedupe-2")
    assert await run(sf.Contact.delete, again["Id"]) == 204
    tx = await tx_action(gw2, "dedupe-2", "rollback", agent="data-steward")
    assert tx["state"] == "rolled_back" and "NEW id" in tx["steps"][0]["plan"]["note"]
    (back,) = [r for r in fake.state()["Contact"].values() if r.get("LastName") == "Roe"]
    assert back["Id"] != again["Id"] and back["AccountId"] == world["acct"]  # re-created, with a new id


@pytest.mark.parametrize("obj", ["Account", "Opportunity"])
async def test_precondition_headers_proposed_for_undo_steps_hold_against_salesforce(http, fake, world, obj) -> None:
    """What SalesforceAdapter.precondition_headers would add to an undo PATCH once the gateway asks for it:
    If-Match with the ETag (Account records only) or If-Unmodified-Since; a change after the check read fails
    the undo with 412 instead of being overwritten."""
    ad = SalesforceAdapter({})
    rid = world["acct" if obj == "Account" else "opp"]
    url = f"{fake.url}{V}/sobjects/{obj}/{rid}"
    auth = {"Authorization": f"Bearer {fake.token}"}
    plan = UndoPlan("restore", PlannedRequest("PATCH", f"{V}/sobjects/{obj}/{rid}", body={"Description": "old"}))

    async def check_then_undo(before_undo: Callable[[], Any]) -> int:
        async with http.get(url, headers=auth) as r:
            pre = ad.precondition_headers(plan, dict(r.headers), await r.json())
        assert list(pre) == (["If-Match"] if obj == "Account" else ["If-Unmodified-Since"])
        await before_undo()
        async with http.patch(url, json=plan.request.body, headers={**auth, **pre}) as r:
            return r.status

    async def nothing() -> None:
        return None

    async def someone_edits() -> None:
        fake._clock += timedelta(seconds=5)  # a later edit, past the rounding
        async with http.patch(url, json={"Description": "a human's edit"}, headers=auth) as r:
            assert r.status == 204

    assert await check_then_undo(nothing) == 204
    assert await check_then_undo(someone_edits) == 412
    assert fake.record(obj, rid)["Description"] == "a human's edit"
