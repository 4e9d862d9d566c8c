"""Plain-language headlines of review items (issue 26 item 1): adapters name the record and the action;
the headline is the same in the admin API, ``tether review list/show`` and the ``review_pending`` alert."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters import get_adapter
from adapters.base import Operation
from proxy.cli.main import main
from proxy.config import parse_rules
from proxy.normalise import decode_segments, split_target
from proxy.policy.registry import Registry
from proxy.safety.headline import person
from tests.conftest import base_rules

# --------------------------------------------------------------------------- adapters, with plain data


def matched(adapter: str, caps: dict[str, dict[str, Any]], method: str, target: str, body: Any = None) -> tuple[Any, Operation]:
    rules = parse_rules({"identity": {"hs_secret": {"value": "x" * 40}},
                         "upstreams": {"u": {"url": "http://127.0.0.1:9", "adapter": adapter}},
                         "capabilities": {k: {"upstream": "u", **v} for k, v in caps.items()}})
    ad = get_adapter(adapter)
    reg = Registry(rules, {"u": ad})
    path, query = split_target(target, 8192)
    o = Operation(method=method, path=path, query=query, segments=decode_segments(path), body=body)
    found = reg.match("u", method, o.segments, query)
    assert found is not None
    o.capability, o.params = found
    return ad, o


def test_salesforce_names_the_sobject_and_the_record_from_the_pre_image():
    ad, o = matched("salesforce", {"opp.update": {"method": "PATCH",
                                                  "path": "/services/data/{version}/sobjects/Opportunity/{id}"}},
                    "PATCH", "/services/data/v59.0/sobjects/opportunity/006000000000001AAA", {"StageName": "Proposal"})
    d = ad.describe(o, {"Name": "Acme renewal 2027", "StageName": "Negotiation"})
    assert (d.action, d.kind, d.name, d.record_id) == ("change", "Opportunity", "Acme renewal 2027", "006000000000001AAA")
    assert ad.field_label("StageName") == "stage" and ad.field_label("Renewal_Risk__c") == "renewal risk"
    ad, o = matched("salesforce", {"contact.create": {"method": "POST", "path": "/services/data/{version}/sobjects/Contact"}},
                    "POST", "/services/data/v59.0/sobjects/Contact", {"FirstName": "Jane", "LastName": "Doe"})
    assert ad.describe(o).name == "Jane Doe" and ad.describe(o).action == "create"


def test_hubspot_stripe_and_slack_name_their_records():
    ad, o = matched("hubspot", {"deal.update": {"method": "PATCH", "path": "/crm/v3/objects/{objectType}/{dealId}",
                                                "params": {"objectType": "deals|0-3"}}},
                    "PATCH", "/crm/v3/objects/0-3/77", {"properties": {"dealstage": "closedwon"}})
    d = ad.describe(o, {"id": "77", "properties": {"dealname": "Acme 2027", "dealstage": "contractsent"}})
    assert (d.kind, d.name) == ("deal", "Acme 2027")
    assert ad.field_label("properties.dealstage") == "deal stage"
    ad, o = matched("hubspot", {"contact.create": {"method": "POST", "path": "/crm/v3/objects/contacts"}},
                    "POST", "/crm/v3/objects/contacts", {"properties": {"firstname": "Jane", "lastname": "Doe"}})
    assert (ad.describe(o).kind, ad.describe(o).name) == ("contact", "Jane Doe")

    ad, o = matched("stripe", {"customer.update": {"method": "POST", "path": "/v1/customers/{customer}"}},
                    "POST", "/v1/customers/cus_123", {"metadata": {"plan": "gold"}})
    d = ad.describe(o, {"id": "cus_123", "email": "billing@acme.example"})
    assert (d.action, d.kind, d.name, d.record_id) == ("change", "customer", "billing@acme.example", "cus_123")
    ad, o = matched("stripe", {"invoice.void": {"method": "POST", "path": "/v1/invoices/{invoice}/void"}},
                    "POST", "/v1/invoices/in_9/void")
    assert ad.describe(o).action == "void" and ad.describe(o).kind == "invoice"

    ad, o = matched("slack", {"post": {"method": "POST", "path": "/api/chat.postMessage"}},
                    "POST", "/api/chat.postMessage", {"channel": "sales", "text": "Acme renewed"})
    d = ad.describe(o)
    assert (d.action, d.kind, d.name) == ("post a message in", "channel", "#sales")


def test_generic_adapter_uses_the_capabilitys_display_fields():
    caps = {"ticket.update": {"method": "PATCH", "path": "/tickets/{id}",
                              "display": {"object": "Ticket", "name": [["ref", "title"], "id"]}}}
    ad, o = matched("generic", caps, "PATCH", "/tickets/9", {"status": "closed"})
    d = ad.describe(o, {"id": "9", "ref": "T-9", "title": "Printer on fire"})
    assert (d.action, d.kind, d.name) == ("change", "Ticket", "T-9 Printer on fire")
    # without display: the collection's name, singular, and the usual name fields
    ad, o = matched("generic", {"t": {"method": "DELETE", "path": "/api/companies/{id}"}}, "DELETE", "/api/companies/3")
    assert (ad.describe(o, {"name": "Acme"}).kind, ad.describe(o, {"name": "Acme"}).name) == ("company", "Acme")


def test_people_are_shown_with_their_role():
    assert person("ae:jane@acme.example") == "jane@acme.example (AE)"
    assert person("jane@acme.example") == "jane@acme.example"
    assert person(None) is None


def test_display_config_is_validated():
    from proxy.config import ConfigError

    rules = base_rules("http://127.0.0.1:9", "t.db")
    rules["capabilities"]["contact.update"]["display"] = {"object": "Contact", "nmae": ["name"]}
    with pytest.raises(ConfigError) as err:
        parse_rules(rules, "r.yaml")
    assert "capabilities.contact.update.display.nmae" in str(err.value)


# --------------------------------------------------------------------------- through the gateway


def renewal_rules(upstream: Any, tmp_path: Any, **extra: Any) -> dict[str, Any]:
    rules = base_rules(upstream.url, str(tmp_path / "t.db"), **extra)
    rules["capabilities"]["opportunity.update"] = {
        "upstream": "crm", "method": "PATCH", "path": "/api/opportunities/{id}",
        "display": {"object": "Opportunity", "name": ["name"]},
        "body": {"allow_fields": ["stage", "amount"]}}
    rules["agents"]["renewal-bot"] = {"grants": [{"capability": "opportunity.update", "mode": "dry_run"},
                                                 {"capability": "contact.create", "mode": "dry_run"}]}
    rules["capabilities"]["contact.create"]["sensitive_fields"] = ["email"]
    rules["server"]["review"] = {"read_current": True}
    return rules


HEADLINE = ("renewal-bot, for jane@acme.example (AE), wants to change Opportunity 'Acme renewal 2027': "
            "stage negotiation → proposal — because: renew Acme Corp")


async def complete(gw: Any, item_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The item once the notifier has read its record and stored the complete headline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        items = (await (await gw.admin("GET", "/api/review/items", params={"state": "all"})).json())["items"]
        it = next(i for i in items if i["id"] == item_id)
        if it["headline"].get("complete") or asyncio.get_running_loop().time() > deadline:
            return it
        await asyncio.sleep(0.1)


async def cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """Run a `tether` verb in a thread (it runs its own event loop) while the gateway keeps serving."""
    capsys.readouterr()
    try:
        rc = await asyncio.to_thread(main, list(args))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
        print(exc.code, file=__import__("sys").stderr)
    got = capsys.readouterr()
    return rc, got.out, got.err


async def test_headline_in_the_api_the_cli_and_the_alert(make_gateway, upstream, tmp_path, webhook, capsys):
    rules = renewal_rules(upstream, tmp_path, governance={"alerts": [
        {"url": webhook.url, "events": ["review_pending"]},
        {"url": webhook.url + "?default"}]})  # a target with no events list does not get review_pending
    gw = await make_gateway(rules)
    upstream.put_record("opportunities", {"id": "opp-1", "name": "Acme renewal 2027", "stage": "negotiation"})
    r = await gw.request("PATCH", "/api/opportunities/opp-1", agent="renewal-bot", on_behalf_of="ae:jane@acme.example",
                         intent="renew Acme Corp", json={"stage": "proposal"})
    item_id = r.headers["X-Tether-Dry-Run"]
    it = await complete(gw, item_id)
    assert it["headline"]["text"] == HEADLINE
    assert it["headline"]["fields"] == [{"field": "stage", "label": "stage", "from": "negotiation", "to": "proposal",
                                         "known": True}]
    shown = await (await gw.admin("GET", f"/api/review/items/{item_id}")).json()
    assert shown["headline"]["text"] == HEADLINE

    # the alert carries the same headline; only the target that asked for review_pending got it
    alert = await webhook.wait_for(lambda d: d.get("event") == "review_pending")
    assert alert["headline"] == HEADLINE and alert["item"] == item_id
    await asyncio.sleep(0.3)
    assert len([d for d in webhook.received if d.get("event") == "review_pending"]) == 1

    # a create names the record from its body; a sensitive field's value never reaches a headline (it
    # goes to Slack and to webhooks)
    r = await gw.request("POST", "/api/contacts", agent="renewal-bot", intent="add the buyer",
                         json={"name": "Sam Buyer", "role": "procurement", "email": "sam@acme.example"})
    created = r.headers["X-Tether-Dry-Run"]
    it2 = await complete(gw, created)
    assert it2["headline"]["text"] == ("renewal-bot wants to create contact 'Sam Buyer' with role procurement, "
                                       "email [redacted] — because: add the buyer")
    assert "sam@acme.example" not in str(it2["headline"])

    args = ("--admin-url", gw.admin_url, "--token", gw.reviewer_token())
    rc, out, _ = await cli(capsys, "review", "list", *args)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "AGE", "CAPABILITY", "WHAT"]
    # columns line up for real (35-character) ids: every row's second column starts where STATE does
    col = lines[0].index("STATE")
    assert all(line[col - 2:col] == "  " and line[col:].startswith("pending") for line in lines[1:])
    assert any(line.endswith(HEADLINE) for line in lines)
    rc, out, _ = await cli(capsys, "review", "show", item_id, *args)
    assert rc == 0 and out.splitlines()[0] == HEADLINE
    assert "stage  negotiation → proposal" in out


async def test_without_read_current_nothing_is_read_until_a_reviewer_opens_the_item(make_gateway, upstream, tmp_path):
    rules = renewal_rules(upstream, tmp_path)
    rules["server"]["review"] = {"read_current": False}
    gw = await make_gateway(rules)
    upstream.put_record("opportunities", {"id": "opp-1", "name": "Acme renewal 2027", "stage": "negotiation"})
    r = await gw.request("PATCH", "/api/opportunities/opp-1", agent="renewal-bot", on_behalf_of="ae:jane@acme.example",
                         intent="renew Acme Corp", json={"stage": "proposal"})
    item_id = r.headers["X-Tether-Dry-Run"]
    await asyncio.sleep(1.5)  # the notifier had its chance; it must not read
    assert upstream.received == []
    items = (await (await gw.admin("GET", "/api/review/items")).json())["items"]
    assert items[0]["headline"]["text"] == ("renewal-bot, for jane@acme.example (AE), wants to change Opportunity "
                                            "opp-1: stage → proposal — because: renew Acme Corp")
    shown = await (await gw.admin("GET", f"/api/review/items/{item_id}")).json()  # a reviewer opens it
    assert shown["headline"]["text"] == HEADLINE and len(upstream.seen("GET")) == 1
    items = (await (await gw.admin("GET", "/api/review/items")).json())["items"]
    assert items[0]["headline"]["text"] == HEADLINE  # stored: the list names it now too
