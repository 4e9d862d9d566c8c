"""End to end: the official ``hubspot-api-client`` SDK pointed at Tether, Tether in front of a stateful
fake HubSpot (tests/hubspot_fake.py), all on loopback.

How the SDK is pointed at Tether: ``HubSpot(access_token=<agent JWT>, host=<Tether base URL for the
hubspot upstream>)``. Tether's own headers (``X-Tether-Intent``, ``X-Tether-Transaction``) are set with
the SDK's ``api_factory`` hook: it wraps ``DiscoveryBase._default_api_factory`` and calls
``api_client.set_default_header`` on every API object the SDK builds (``client.crm.contacts.basic_api``
builds a new one on each access). ``client_side_validation=True`` makes the SDK check every response it
deserialises against its models (required fields, ``status`` enums), so "the SDK parses it" means
something. The SDK is synchronous; it runs in a thread while Tether and the fake serve on the test loop.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Callable

import orjson
import pytest
from hubspot import HubSpot
from hubspot.crm.contacts import (
    BatchInputSimplePublicObjectBatchInput,
    BatchInputSimplePublicObjectBatchInputForCreate,
    BatchInputSimplePublicObjectBatchInputUpsert,
    BatchInputSimplePublicObjectId,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInput,
    SimplePublicObjectBatchInputForCreate,
    SimplePublicObjectBatchInputUpsert,
    SimplePublicObjectId,
    SimplePublicObjectInput,
    SimplePublicObjectInputForCreate,
)
from hubspot.crm.contacts.exceptions import ApiException as ContactsApiException
from hubspot.crm.deals.exceptions import ApiException as DealsApiException
from hubspot.crm.objects.exceptions import ApiException as ObjectsApiException
from hubspot.discovery.discovery_base import DiscoveryBase

from tests.conftest import SECRET, GatewayHandle
from tests.hubspot_fake import HubSpotFake

PAT = "pat-na1-11111111-2222-3333-4444-555555555555"
RECORD_FIELDS = {"agent": "tether_agent", "on_behalf_of": "tether_on_behalf_of", "intent": "tether_intent"}
STAGES = ["appointmentscheduled", "qualifiedtobuy", "presentationscheduled", "contractsent"]


def hubspot_rules(hub_url: str, store: str) -> dict[str, Any]:
    def live(c: str) -> dict[str, str]:
        return {"capability": c, "mode": "live"}

    def cap(method: str, path: str, **kw: Any) -> dict[str, Any]:
        return {"upstream": "hubspot", "method": method, "path": path, **kw}

    return {
        "version": 1,
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store,
                   "transactions": {"retry_attempts": 2, "retry_backoff": 0.01, "sweep_interval": 60}},
        "identity": {"hs_secret": {"value": SECRET}},
        "upstreams": {"hubspot": {
            "url": hub_url, "adapter": "hubspot",
            "adapter_options": {"provenance_properties": list(RECORD_FIELDS.values())},
            "credentials": {"type": "bearer", "token": {"value": PAT}},
            "provenance": {"record_fields": RECORD_FIELDS}}},
        "agents": {
            "sdr-bot": {"grants": ["contact.read", "contact.search", "company.read", "deal.read",
                                   live("contact.create"), live("contact.update"), live("contact.upsert"),
                                   live("deal.update_stage")]},
            "sdr-trainee": {"grants": ["contact.read", "contact.create"]},  # writes unset: dry-run
        },
        "capabilities": {
            "contact.read": cap("GET", "/crm/v3/objects/contacts/{contactId}"),
            "contact.search": cap("POST", "/crm/v3/objects/contacts/search", effect="read"),
            "contact.create": cap("POST", "/crm/v3/objects/contacts", body={
                "allow_fields": ["properties.email", "properties.firstname", "properties.lastname",
                                 "properties.jobtitle", "associations"],
                "require_fields": ["properties.email"]}),
            "contact.update": cap("PATCH", "/crm/v3/objects/contacts/{contactId}",
                                  params={"contactId": r"\d+|email=.+"},
                                  body={"allow_fields": ["properties.firstname", "properties.lastname",
                                                         "properties.jobtitle"]}),
            "contact.update_by_lookup": cap("PATCH", "/crm/v3/objects/contacts/{lookup}",
                                            params={"lookup": "[A-Za-z0-9_]+=.+"}),
            "contact.upsert": cap("PUT", "/crm/v3/objects/contacts/{contactId}", params={"contactId": "email=.+"},
                                  body={"allow_fields": ["properties.firstname", "properties.lastname"]}),
            "contact.archive": cap("DELETE", "/crm/v3/objects/contacts/{contactId}",
                                   compensation="non_compensable"),
            "company.read": cap("GET", "/crm/v3/objects/companies/{companyId}"),
            "deal.read": cap("GET", "/crm/v3/objects/deals/{dealId}"),
            "deal.create": cap("POST", "/crm/v3/objects/deals"),
            "deal.update_stage": cap("PATCH", "/crm/v3/objects/deals/{dealId}", params={"dealId": r"\d+"}, body={
                "allow_fields": ["properties.dealstage"],
                "constraints": {"properties.dealstage": {"enum": STAGES}}}),
        },
    }


@pytest.fixture
async def hub():
    fake = await HubSpotFake(token=PAT).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def gw(make_gateway, hub, tmp_path) -> GatewayHandle:
    return await make_gateway(hubspot_rules(hub.url, str(tmp_path / "t.db")))


def client(base: str, token: str, **headers: str) -> HubSpot:
    def factory(package: Any, api_name: str, config: dict[str, Any]) -> Any:
        api = DiscoveryBase._default_api_factory(package, api_name, config)
        for k, v in headers.items():
            api.api_client.set_default_header(k, v)
        return api

    return HubSpot(access_token=token, host=base, api_factory=factory, client_side_validation=True)


def agent(gw: GatewayHandle, name: str = "sdr-bot", on_behalf_of: str = "ae:jane@acme", **headers: str) -> HubSpot:
    return client(gw.upstream_url("hubspot"), gw.token(name, on_behalf_of), **headers)


async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def refused(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises((ContactsApiException, DealsApiException, ObjectsApiException)) as e:  # one class per API
        await call(fn, *args, **kw)
    return e.value.status, orjson.loads(e.value.body) if e.value.body else {}


async def journal_of(gw: GatewayHandle, kind: str = "request") -> list[dict[str, Any]]:
    return [r for r in await gw.journal() if r["kind"] == kind]


_NOT_COMPARED = {"host", "content-length", "authorization", "x-tether-agent", "x-tether-on-behalf-of",
                 "x-tether-intent", "x-tether-authz-event", "x-tether-request-id", "via"}  # Via: RFC 9110 §7.6.3


# --------------------------------------------------------------------------- reads


async def test_reads_pass_through_unchanged_apart_from_credentials_and_provenance(gw, hub):
    jane = hub.put("contacts", {"email": "jane@acme.com", "firstname": "Jane", "lastname": "Doe"})
    hub.put("contacts", {"email": "sam@acme.com", "firstname": "Sam"})
    search = PublicObjectSearchRequest(
        filter_groups=[FilterGroup(filters=[Filter(property_name="email", operator="EQ", value="jane@acme.com")])],
        properties=["email", "firstname"], limit=10)
    direct = client(hub.url, PAT)
    via = agent(gw)
    results = []
    for c in (direct, via):
        got = await call(c.crm.contacts.basic_api.get_by_id, jane["id"], properties=["email", "firstname"])
        found = await call(c.crm.contacts.search_api.do_search, search)
        results.append((got.to_dict(), found.to_dict()))
    assert results[0] == results[1]
    assert results[1][0]["properties"]["firstname"] == "Jane" and results[1][1]["total"] == 1
    assert len(hub.received) == 4
    for d, t in ((hub.received[0], hub.received[2]), (hub.received[1], hub.received[3])):
        assert (t.method, t.raw_path, t.body) == (d.method, d.raw_path, d.body)
        assert t.headers["Authorization"] == d.headers["Authorization"] == f"Bearer {PAT}"
        assert t.headers["X-Tether-Agent"] == "sdr-bot" and t.headers["X-Tether-On-Behalf-Of"] == "ae:jane@acme"
        assert t.headers["Via"] == "1.1 tether" and "Via" not in d.headers
        assert {k.lower(): v for k, v in t.header_items if k.lower() not in _NOT_COMPARED} == \
               {k.lower(): v for k, v in d.header_items if k.lower() not in _NOT_COMPARED}
    assert hub.received[3].raw_path == "/crm/v3/objects/contacts/search"
    reqs = await journal_of(gw)
    assert [(r["capability"], r["decision"]) for r in reqs] == [("contact.read", "live"), ("contact.search", "live")]


# --------------------------------------------------------------------------- writes


async def test_create_and_update_are_forwarded_with_stamped_provenance(gw, hub):
    deal = hub.put("deals", {"dealname": "Acme renewal", "dealstage": "appointmentscheduled"})
    c = agent(gw, **{"X-Tether-Intent": "book a demo with Jane"})
    made = await call(c.crm.contacts.basic_api.create, SimplePublicObjectInputForCreate(
        properties={"email": "jane@acme.com", "firstname": "Jane"}, associations=[]))
    assert made.id in hub.records["contacts"] and made.properties["email"] == "jane@acme.com"
    sent = hub.seen("POST", "/crm/v3/objects/contacts")[0].json()
    assert sent["properties"] == {"email": "jane@acme.com", "firstname": "Jane", "tether_agent": "sdr-bot",
                                  "tether_on_behalf_of": "ae:jane@acme", "tether_intent": "book a demo with Jane"}
    upd = await call(c.crm.deals.basic_api.update, deal["id"], SimplePublicObjectInput(
        properties={"dealstage": "qualifiedtobuy"}))
    assert upd.properties["dealstage"] == "qualifiedtobuy"
    assert hub.props("deals", deal["id"])["tether_agent"] == "sdr-bot"
    assert hub.props("deals", deal["id"])["tether_intent"] == "book a demo with Jane"
    outcomes = await journal_of(gw, "outcome")
    assert outcomes[0]["upstream_ids"] == [made.id] and outcomes[0]["status"] == 201


async def test_an_update_by_id_property_is_the_same_update_capability(gw, hub):
    jane = hub.put("contacts", {"email": "jane@acme.com", "firstname": "Jane"})
    c = agent(gw, **{"X-Tether-Intent": "fix the job title"})
    got = await call(c.crm.contacts.basic_api.update, "jane@acme.com",
                     SimplePublicObjectInput(properties={"jobtitle": "CTO"}), id_property="email")
    assert got.id == jane["id"] and hub.props("contacts", jane["id"])["jobtitle"] == "CTO"
    assert hub.received[-1].raw_path == "/crm/v3/objects/contacts/jane%40acme.com?idProperty=email"
    status, err = await refused(c.crm.contacts.basic_api.update, "ext-7",
                                SimplePublicObjectInput(properties={"jobtitle": "x"}), id_property="external_id")
    assert status == 403 and err["error"]["code"] == "capability_not_granted"
    status, err = await refused(c.crm.contacts.basic_api.update, "jane@acme.com",
                                SimplePublicObjectInput(properties={"jobtitle": "x"}))
    assert status == 403 and err["error"]["code"] == "route_not_registered"  # not numeric, no idProperty
    reqs = await journal_of(gw)
    assert [r["capability"] for r in reqs] == ["contact.update", "contact.update_by_lookup", None]


async def test_type_ids_and_names_hit_the_same_grant(gw, hub):
    deal = hub.put("deals", {"dealname": "Acme", "dealstage": "appointmentscheduled"})
    acme = hub.put("companies", {"name": "Acme", "domain": "acme.com"})
    c = agent(gw, **{"X-Tether-Intent": "move the deal on"})
    got = await call(c.crm.objects.basic_api.update, "0-3", deal["id"],
                     SimplePublicObjectInput(properties={"dealstage": "contractsent"}))
    assert got.properties["dealstage"] == "contractsent"
    assert hub.received[-1].raw_path == f"/crm/v3/objects/0-3/{deal['id']}"  # forwarded as the agent wrote it
    assert hub.props("deals", deal["id"])["tether_agent"] == "sdr-bot"  # stamped under the type id too
    company = await call(c.crm.objects.basic_api.get_by_id, "0-2", acme["id"])
    assert company.properties["name"] == "Acme"
    # the deal's field rules hold for both spellings
    for spelling in ("deals", "0-3"):
        status, err = await refused(c.crm.objects.basic_api.update, spelling, deal["id"],
                                    SimplePublicObjectInput(properties={"dealstage": "closedwon"}))
        assert status == 422 and err["error"]["code"] == "constraint_violated", spelling
        status, err = await refused(c.crm.objects.basic_api.create, spelling,
                                    SimplePublicObjectInputForCreate(properties={"dealname": "x"}))
        assert status == 403 and err["error"]["code"] == "capability_not_granted", spelling
    reqs = await journal_of(gw)
    assert [r["capability"] for r in reqs] == ["deal.update_stage", "company.read"] + \
        ["deal.update_stage", "deal.create"] * 2
    assert len(hub.received) == 2


# --------------------------------------------------------------------------- dry-run


async def test_dry_run_create_and_batch_create_are_answered_in_shapes_the_sdk_parses(gw, hub):
    c = agent(gw, "sdr-trainee", **{"X-Tether-Intent": "add two leads"})
    obj, status, headers = await call(c.crm.contacts.basic_api.create_with_http_info, SimplePublicObjectInputForCreate(
        properties={"email": "lead@acme.com", "firstname": "Lee"}, associations=[]))
    assert status == 201 and headers.get("X-Tether-Dry-Run", "").startswith("dr_")
    assert type(obj).__name__ == "SimplePublicObject" and obj.id.isdigit()
    assert obj.properties["email"] == "lead@acme.com" and obj.archived is False and obj.created_at is not None
    batch, status, headers = await call(
        c.crm.contacts.batch_api.create_with_http_info, BatchInputSimplePublicObjectBatchInputForCreate(inputs=[
            SimplePublicObjectBatchInputForCreate(properties={"email": "a@acme.com"}, associations=[]),
            SimplePublicObjectBatchInputForCreate(properties={"email": "b@acme.com"}, associations=[])]))
    assert status == 201 and "X-Tether-Dry-Run" in headers
    assert type(batch).__name__ == "BatchResponseSimplePublicObject" and batch.status == "COMPLETE"
    assert sorted(r.properties["email"] for r in batch.results) == ["a@acme.com", "b@acme.com"]
    assert all(r.id.isdigit() for r in batch.results) and batch.completed_at is not None
    assert hub.received == []
    items = (await (await gw.admin("GET", "/api/review/items")).json())["items"]
    assert sorted(i["capability"] for i in items) == ["contact.create", "contact.create"]


async def test_a_dry_run_capture_under_a_type_id_is_approved_and_replayed(gw, hub):
    c = agent(gw, "sdr-trainee", **{"X-Tether-Intent": "add a lead"})
    obj, _, headers = await call(c.crm.objects.basic_api.create_with_http_info, "0-1",
                                 SimplePublicObjectInputForCreate(properties={"email": "lee@globex.com"}, associations=[]))
    assert obj.id.isdigit() and hub.received == []
    r = await gw.admin("POST", f"/api/review/items/{headers['X-Tether-Dry-Run']}/approve", json={})
    assert r.status == 200, await r.text()
    assert (await r.json())["state"] == "replayed"
    (sent,) = hub.seen("POST")
    assert sent.raw_path == "/crm/v3/objects/0-1" and sent.headers["Authorization"] == f"Bearer {PAT}"
    assert [rec["properties"]["email"] for rec in hub.records["contacts"].values()] == ["lee@globex.com"]


# --------------------------------------------------------------------------- transactions


async def test_a_rolled_back_transaction_restores_hubspots_prior_state(gw, hub):
    deal = hub.put("deals", {"dealname": "Acme", "dealstage": "appointmentscheduled"})
    hub.put("contacts", {"email": "old@acme.com", "firstname": "Old"})
    before = copy.deepcopy(hub.visible())
    c = agent(gw, **{"X-Tether-Intent": "qualify Acme", "X-Tether-Transaction": "tx-sdr-1"})
    made = await call(c.crm.contacts.basic_api.create, SimplePublicObjectInputForCreate(
        properties={"email": "new@acme.com", "firstname": "New"}, associations=[]))
    await call(c.crm.objects.basic_api.update, "0-3", deal["id"],
               SimplePublicObjectInput(properties={"dealstage": "qualifiedtobuy"}))
    assert hub.visible() != before
    async with gw.session.post(f"{gw.url}/_tether/transactions/tx-sdr-1/rollback",
                               headers=gw.headers("sdr-bot", "ae:jane@acme")) as r:
        tx = await r.json()
    assert tx["state"] == "rolled_back", tx
    assert hub.visible() == before  # the agent's properties and its provenance stamp are both gone
    assert hub.records["contacts"][made.id]["archived"] is True
    undo = [(x.method, x.path) for x in hub.received
            if x.headers.get("X-Tether-Intent", "").startswith("rollback") and x.method != "GET"]
    assert undo == [("PATCH", f"/crm/v3/objects/0-3/{deal['id']}"), ("DELETE", f"/crm/v3/objects/contacts/{made.id}")]
    restore = [x for x in hub.received if x.method == "PATCH"][-1].json()
    assert restore == {"properties": {"dealstage": "appointmentscheduled", "tether_agent": "",
                                      "tether_on_behalf_of": "", "tether_intent": ""}}


async def test_a_batch_create_in_a_transaction_is_undone_input_by_input(gw, hub):
    hub.reverse_batch_results = True  # HubSpot does not promise results in input order
    before = copy.deepcopy(hub.visible())
    c = agent(gw, **{"X-Tether-Intent": "import leads", "X-Tether-Transaction": "tx-batch"})
    emails = [f"lead{i}@acme.com" for i in range(3)]
    out = await call(c.crm.contacts.batch_api.create, BatchInputSimplePublicObjectBatchInputForCreate(inputs=[
        SimplePublicObjectBatchInputForCreate(properties={"email": e}, associations=[]) for e in emails]))
    assert out.status == "COMPLETE" and len(out.results) == 3
    async with gw.session.get(f"{gw.url}/_tether/transactions/tx-batch", headers=gw.headers("sdr-bot")) as r:
        steps = (await r.json())["steps"]
    by_index = {s["op_index"]: s for s in steps}
    for i, e in enumerate(emails):  # each step undoes the record its own input created
        (rid,) = by_index[i]["created_ids"]
        assert hub.props("contacts", rid)["email"] == e and by_index[i]["state"] == "armed"
    async with gw.session.post(f"{gw.url}/_tether/transactions/tx-batch/rollback", headers=gw.headers("sdr-bot")) as r:
        assert (await r.json())["state"] == "rolled_back"
    assert hub.visible() == before
    assert len(hub.seen("DELETE")) == 3


async def test_a_batch_upsert_in_a_transaction_restores_or_archives_per_input(gw, hub):
    jane = hub.put("contacts", {"email": "jane@acme.com", "firstname": "Jane"})
    before = copy.deepcopy(hub.visible())
    c = agent(gw, **{"X-Tether-Intent": "sync the webinar list", "X-Tether-Transaction": "tx-upsert"})
    out = await call(c.crm.contacts.batch_api.upsert, BatchInputSimplePublicObjectBatchInputUpsert(inputs=[
        SimplePublicObjectBatchInputUpsert(id="jane@acme.com", id_property="email", properties={"firstname": "Janet"}),
        SimplePublicObjectBatchInputUpsert(id="lee@globex.com", id_property="email", properties={"firstname": "Lee"})]))
    assert sorted(r.new for r in out.results) == [False, True]
    assert hub.props("contacts", jane["id"])["firstname"] == "Janet"
    reads = [x.json() for x in hub.seen("POST", "/crm/v3/objects/contacts/batch/read")]
    assert [r["inputs"] for r in reads] == [[{"id": "jane@acme.com"}], [{"id": "lee@globex.com"}]]
    async with gw.session.post(f"{gw.url}/_tether/transactions/tx-upsert/rollback", headers=gw.headers("sdr-bot")) as r:
        tx = await r.json()
    assert tx["state"] == "rolled_back", tx
    assert [s["plan"]["kind"] for s in sorted(tx["steps"], key=lambda s: s["op_index"])] == ["restore", "delete"]
    assert hub.visible() == before


# --------------------------------------------------------------------------- batches


async def test_a_batch_with_one_ungranted_input_is_refused_whole(gw, hub):
    jane = hub.put("contacts", {"email": "jane@acme.com", "firstname": "Jane"})
    sam = hub.put("contacts", {"email": "sam@acme.com", "firstname": "Sam"})
    hub.received.clear()
    c = agent(gw, **{"X-Tether-Intent": "tidy contacts"})
    status, err = await refused(c.crm.contacts.batch_api.archive, BatchInputSimplePublicObjectId(
        inputs=[SimplePublicObjectId(id=jane["id"]), SimplePublicObjectId(id=sam["id"])]))
    assert status == 403 and err["error"]["code"] == "capability_not_granted"
    assert "whole composite request is refused" in err["error"]["message"]
    status, err = await refused(c.crm.contacts.batch_api.update, BatchInputSimplePublicObjectBatchInput(inputs=[
        SimplePublicObjectBatchInput(id=jane["id"], properties={"jobtitle": "CEO"}),
        SimplePublicObjectBatchInput(id="ext-7", id_property="external_id", properties={"jobtitle": "CFO"})]))
    assert status == 403 and err["error"]["code"] == "capability_not_granted"
    assert "sub-request 1" in err["error"]["message"]
    assert hub.received == []
    assert "jobtitle" not in hub.props("contacts", jane["id"])
    reqs = await journal_of(gw)
    assert [r["decision"] for r in reqs] == ["denied", "denied"]
    assert [o["capability"] for o in reqs[1]["operations"]] == ["contact.update", "contact.update_by_lookup"]
    # the same batch with only granted inputs goes through
    ok = await call(c.crm.contacts.batch_api.update, BatchInputSimplePublicObjectBatchInput(inputs=[
        SimplePublicObjectBatchInput(id=jane["id"], properties={"jobtitle": "CEO"}),
        SimplePublicObjectBatchInput(id="sam@acme.com", id_property="email", properties={"jobtitle": "CFO"})]))
    assert ok.status == "COMPLETE"
    assert hub.props("contacts", jane["id"])["jobtitle"] == "CEO" and hub.props("contacts", sam["id"])["jobtitle"] == "CFO"


async def test_a_multi_status_answer_is_a_failure(gw, hub):
    jane = hub.put("contacts", {"email": "jane@acme.com"})
    c = agent(gw, **{"X-Tether-Intent": "tidy contacts"})
    res = await call(c.crm.contacts.batch_api.update, BatchInputSimplePublicObjectBatchInput(inputs=[
        SimplePublicObjectBatchInput(id=jane["id"], properties={"jobtitle": "CEO"}),
        SimplePublicObjectBatchInput(id="999999", properties={"jobtitle": "CFO"})]))
    assert type(res).__name__ == "BatchResponseSimplePublicObjectWithErrors" and res.num_errors == 1
    (out,) = await journal_of(gw, "outcome")
    assert out["status"] == 207 and out.get("upstream_failure") is True


async def test_batch_inputs_are_stamped(make_gateway, hub, tmp_path):
    gw = await make_gateway(hubspot_rules(hub.url, str(tmp_path / "t.db")))
    c = agent(gw, **{"X-Tether-Intent": "import leads"})
    out = await call(c.crm.objects.batch_api.create, "0-1", BatchInputSimplePublicObjectBatchInputForCreate(inputs=[
        SimplePublicObjectBatchInputForCreate(properties={"email": "a@acme.com"}, associations=[]),
        SimplePublicObjectBatchInputForCreate(properties={"email": "b@acme.com"}, associations=[])]))
    for r in out.results:
        assert hub.props("contacts", r.id)["tether_agent"] == "sdr-bot"
        assert hub.props("contacts", r.id)["tether_intent"] == "import leads"
    (out_rec,) = await journal_of(gw, "outcome")
    assert sorted(out_rec["upstream_ids"]) == sorted(r.id for r in out.results)

