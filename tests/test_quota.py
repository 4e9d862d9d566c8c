"""The SaaS quota the company shares (proxy/safety/quota.py, adapters/quota.py): each vendor's headers read as
the vendor means them, a reserve kept for people, Tether answering agents itself while it lasts.

The multi-process side (the block shared by workers and replicas) is in tests/test_many_processes.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.generic import GenericRestAdapter as GenericAdapter
from adapters.hubspot import HubSpotAdapter
from adapters.quota import retry_after
from adapters.salesforce import SalesforceAdapter
from adapters.slack import SlackAdapter
from adapters.stripe import StripeAdapter
from tests.conftest import SECRET
from tests.hubspot_fake import HubSpotFake
from tests.sf_fake import SalesforceFake

NOW = 1_800_000_000.0

# (adapter, status, headers as received, [(window, remaining, limit, reset)], retry_after)
READINGS = [
    (SalesforceAdapter(), 200, {"Sforce-Limit-Info": "api-usage=14999/15000"}, [("api-usage", 1, 15000, None)], None),
    (SalesforceAdapter(), 200, {"Sforce-Limit-Info": "api-usage=18/5000; per-app-api-usage=17/250(appName=bot)"},
     [("api-usage", 4982, 5000, None), ("per-app-api-usage", 233, 250, None)], None),
    (HubSpotAdapter(), 200, {"X-HubSpot-RateLimit-Daily": "250000", "X-HubSpot-RateLimit-Daily-Remaining": "249000",
                             "X-HubSpot-RateLimit-Max": "100", "X-HubSpot-RateLimit-Remaining": "0",
                             "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
                             "X-HubSpot-RateLimit-Secondly": "10", "X-HubSpot-RateLimit-Secondly-Remaining": "9"},
     [("daily", 249000, 250000, None), ("interval", 0, 100, 10.0), ("secondly", 9, 10, 1.0)], None),
    (GenericAdapter(), 200, {"RateLimit-Policy": '"day";q=1000;w=86400, "burst";q=10;w=1',
                             "RateLimit": '"day";r=150;t=3600'}, [("day", 150, 1000, 3600)], None),
    (GenericAdapter(), 200, {"RateLimit": "limit=100, remaining=42, reset=30"}, [("ratelimit", 42, 100, 30)], None),
    (GenericAdapter(), 200, {"RateLimit-Limit": "100", "RateLimit-Remaining": "7", "RateLimit-Reset": "12"},
     [("ratelimit", 7, 100, 12)], None),
    (StripeAdapter(), 200, {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "3",
                            "X-RateLimit-Reset": str(int(NOW) + 40)}, [("x-ratelimit", 3, 60, 40)], None),
    (SlackAdapter(), 429, {"Retry-After": "30"}, [], 30),
    (GenericAdapter(), 503, {"Retry-After": "Wed, 15 Jan 2027 08:00:10 GMT"}, [], None),  # checked below
    (GenericAdapter(), 200, {"Retry-After": "30"}, None, None),  # only a 429/503 asks callers to wait
    (GenericAdapter(), 200, {"Content-Type": "application/json"}, None, None),
    (SalesforceAdapter(), 200, {"Sforce-Limit-Info": "nonsense"}, None, None),
]


@pytest.mark.parametrize("adapter,status,headers,windows,wait", READINGS)
def test_each_vendor_says_it_its_own_way(adapter, status, headers, windows, wait):
    found = {k.lower(): v for k, v in headers.items() if k.lower() in adapter.quota_headers}
    import adapters.quota as q

    real_time = q.time.time
    q.time.time = lambda: NOW  # type: ignore[assignment]
    try:
        reading = adapter.read_quota(status, found)
    finally:
        q.time.time = real_time  # type: ignore[assignment]
    if windows is None:
        assert reading is None
        return
    assert [(w.name, w.remaining, w.limit, w.reset) for w in reading.windows] == windows
    if "Retry-After" in headers and "GMT" in headers["Retry-After"]:
        assert reading.retry_after == retry_after(headers["Retry-After"], NOW) > 0
    else:
        assert reading.retry_after == wait


def _rules(store: str, upstreams: dict[str, Any], caps: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store},
            "identity": {"hs_secret": {"value": SECRET}}, "upstreams": upstreams,
            "agents": {"bot": {"grants": list(caps)}},  # writes dry-run (no mode given)
            "capabilities": caps}


async def test_salesforce_reserve_holds_agents_back_and_tells_the_operator(make_gateway, tmp_path):
    fake = await SalesforceFake().start()
    try:
        acct = fake.insert("Account", Name="Acme")
        caps = {"sf.read": {"upstream": "sf", "method": "GET", "path": "/services/data/{version}/sobjects/Account/{id}"},
                "sf.update": {"upstream": "sf", "method": "PATCH",
                              "path": "/services/data/{version}/sobjects/Account/{id}"}}
        gw = await make_gateway(_rules(str(tmp_path / "t.db"), {"sf": {
            "url": fake.url, "adapter": "salesforce", "credentials": {"type": "bearer", "token": {"value": fake.token}},
            "quota": {"reserve": "20%", "recheck": "2m"}}}, caps))
        path = f"/services/data/v59.0/sobjects/Account/{acct['Id']}"
        fake.response_headers = {"Sforce-Limit-Info": "api-usage=11000/15000"}
        assert (await gw.request("GET", path, upstream="sf")).status == 200
        fake.response_headers = {"Sforce-Limit-Info": "api-usage=12001/15000"}  # 2,999 left: under 20%
        assert (await gw.request("GET", path, upstream="sf")).status == 200
        seen = len(fake.received)
        r = await gw.request("GET", path, upstream="sf")
        doc = await r.json()
        assert r.status == 429 and doc["error"]["code"] == "upstream_quota"
        assert "2999 left of 15000" in doc["error"]["message"] and 100 <= int(r.headers["Retry-After"]) <= 120
        assert len(fake.received) == seen  # not forwarded
        # a dry-run write reaches no upstream: it is still captured
        r = await gw.request("PATCH", path, upstream="sf", json={"Name": "Acme 2"})
        assert r.status in (200, 204) and "X-Tether-Dry-Run" in r.headers
        # the operator sees it: agents status, the admin API, metrics, one alert
        r = await gw.admin("GET", "/api/upstreams/quota")
        sf = (await r.json())["upstreams"][0]
        assert sf["blocked"] and sf["reserve"] == "20%" and sf["windows"]["api-usage"]["remaining"] == 2999
        text = await (await gw.admin("GET", "/metrics")).text()
        samples = {(s.name, s.labels.get("window")): s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name.startswith("tether_upstream_quota")}
        assert samples[("tether_upstream_quota_remaining", "api-usage")] == 2999
        assert samples[("tether_upstream_quota_limit", "api-usage")] == 15000
        recs = [x for x in await gw.journal() if x.get("alert") == "quota_low"]
        assert len(recs) == 1 and recs[0]["upstream"] == "sf"
        denied = [x for x in await gw.journal() if x.get("error") == "upstream_quota"]
        assert denied and all(not x.get("forwarded") for x in denied)
    finally:
        await fake.stop()


async def test_hubspot_interval_spent_blocks_until_it_resets(make_gateway, tmp_path):
    fake = await HubSpotFake().start()
    try:
        rec = fake.put("contacts", {"email": "a@b.c"})
        caps = {"hs.read": {"upstream": "hs", "method": "GET", "path": "/crm/v3/objects/contacts/{contactId}"}}
        gw = await make_gateway(_rules(str(tmp_path / "t.db"), {"hs": {
            "url": fake.url, "adapter": "hubspot", "credentials": {"type": "bearer", "token": {"value": fake.token}}}},
            caps))
        path = f"/crm/v3/objects/contacts/{rec['id']}"
        fake.response_headers = {"X-HubSpot-RateLimit-Max": "100", "X-HubSpot-RateLimit-Remaining": "0",
                                 "X-HubSpot-RateLimit-Interval-Milliseconds": "1500",
                                 "X-HubSpot-RateLimit-Daily": "250000",
                                 "X-HubSpot-RateLimit-Daily-Remaining": "200000"}
        assert (await gw.request("GET", path, upstream="hs")).status == 200
        r = await gw.request("GET", path, upstream="hs")
        assert r.status == 429 and (await r.json())["error"]["code"] == "upstream_quota"
        assert r.headers["Retry-After"] in ("1", "2")
        fake.response_headers = {}
        t0 = time.monotonic()
        while (r := await gw.request("GET", path, upstream="hs")).status == 429:  # until the interval resets
            assert time.monotonic() - t0 < 10
            await __import__("asyncio").sleep(0.2)
        assert r.status == 200
    finally:
        await fake.stop()
