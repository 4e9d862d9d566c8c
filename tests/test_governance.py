"""Governance: promotion gates, canary, error budgets and quarantine, alerts, metrics."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_rules
from tests.procs import run_cli


def gov_rules(upstream, tmp_path, **extra):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["capabilities"]["contact.create"]["promotion"] = {"min_reviewed": 50, "min_approval_rate": 0.9,
                                                            "max_edit_share": 0.2, "window": "30d",
                                                            "canary_percent": 10}
    rules["agents"]["bot"]["grants"] = ["contact.read", "contact.create", "contact.list",
                                        {"capability": "contact.update", "mode": "live"}]
    rules.update(extra)
    return rules


async def _capture_and_decide(gw, n_approve: int, n_reject: int) -> None:
    ids = []
    for i in range(n_approve + n_reject):
        r = await gw.request("POST", "/api/contacts", json={"name": f"n{i}"})
        ids.append(r.headers["X-Tether-Dry-Run"])
    tok = gw.reviewer_token("rita")
    for i, item in enumerate(ids):
        if i < n_approve:
            r = await gw.admin("POST", f"/api/review/items/{item}/approve", token=tok)
        else:
            r = await gw.admin("POST", f"/api/review/items/{item}/reject", json={"reason": "no"}, token=tok)
        assert r.status == 200


LENIENT = {"error_budget": {"max_bad_ratio": 0.5}}


async def test_gate_refuses_with_49_reviews_and_allows_with_50(make_gateway, upstream, tmp_path):
    gw = await make_gateway(gov_rules(upstream, tmp_path, governance=LENIENT))
    await _capture_and_decide(gw, 45, 4)  # 49 reviewed, 45/49 = 91.8% approved
    env = {"TETHER_ADMIN_URL": gw.admin_url, "TETHER_ADMIN_TOKEN": gw.reviewer_token("rita")}
    r = await asyncio.to_thread(run_cli, "promote", "bot", "contact.create", "--to", "live", env=env)
    assert r.returncode == 1
    assert "1 more reviewed item(s) needed (49 of 50)" in r.stdout and "reviewed" in r.stdout
    assert (await gw.request("POST", "/api/contacts", json={"name": "x"})).headers.get("X-Tether-Dry-Run")
    await _capture_and_decide(gw, 1, 0)  # the 50th, at 46/50 = 92%
    r = await asyncio.to_thread(run_cli, "promote", "bot", "contact.create", "--to", "live", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PROMOTED bot / contact.create: dry_run -> live" in r.stdout
    before = len(upstream.seen("POST"))
    r = await gw.request("POST", "/api/contacts", json={"name": "live now"})
    assert r.status == 201 and "X-Tether-Dry-Run" not in r.headers
    assert len(upstream.seen("POST")) == before + 1
    # history, and promotions survive a restart (they live in the store)
    r = await asyncio.to_thread(run_cli, "promote", "--history", "--json", env=env)
    hist = json.loads(r.stdout)
    assert hist[-1]["mode"] == "live" and hist[-1]["forced"] is False
    gw2 = await make_gateway(gov_rules(upstream, tmp_path, governance=LENIENT))
    r = await gw2.request("POST", "/api/contacts", json={"name": "after restart"})
    assert "X-Tether-Dry-Run" not in r.headers


async def test_low_approval_rate_and_forced_promotion(make_gateway, upstream, tmp_path):
    gw = await make_gateway(gov_rules(upstream, tmp_path))
    r = await gw.admin("POST", "/api/promotions", json={"agent": "bot", "capability": "contact.create", "to": "canary"})
    assert r.status == 409
    missing = (await r.json())["error"]["details"]["missing"]
    assert any("50 more reviewed" in m for m in missing)
    r = await gw.admin("POST", "/api/promotions", json={"agent": "bot", "capability": "contact.create", "to": "live",
                                                        "force": True})
    assert r.status == 400  # --force needs a reason
    r = await gw.admin("POST", "/api/promotions", json={"agent": "bot", "capability": "contact.create", "to": "live",
                                                        "force": True, "reason": "pilot approved by CFO"})
    assert r.status == 201 and (await r.json())["forced"] is True
    recs = [x for x in await gw.journal() if x["kind"] == "governance"]
    assert recs[-1]["event"] == "forced_promotion" and recs[-1]["reason"] == "pilot approved by CFO"
    # demotion needs no gate
    r = await gw.admin("POST", "/api/promotions", json={"agent": "bot", "capability": "contact.create", "to": "dry_run"})
    assert r.status == 201
    r = await gw.request("POST", "/api/contacts", json={"name": "x"})
    assert "X-Tether-Dry-Run" in r.headers


async def test_canary_sends_about_ten_percent_live(make_gateway, upstream, tmp_path):
    rules = gov_rules(upstream, tmp_path)
    rules["agents"]["bot"]["grants"][1] = {"capability": "contact.create", "mode": "canary"}
    gw = await make_gateway(rules)
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> bool:
        async with sem:
            r = await gw.request("POST", "/api/contacts", json={"name": f"c{i}"})
            assert r.status == 201
            return "X-Tether-Dry-Run" in r.headers

    captured = await asyncio.gather(*[one(i) for i in range(1000)])
    live = captured.count(False)
    assert 60 <= live <= 140, live
    assert len(upstream.seen("POST")) == live
    items = (await (await gw.admin("GET", "/api/review/items", params={"limit": 5000})).json())["items"]
    assert len(items) == 1000 - live and all(i["canary"] == "dry_run" for i in items)
    env = {"TETHER_ADMIN_URL": gw.admin_url, "TETHER_ADMIN_TOKEN": gw.reviewer_token()}
    r = await asyncio.to_thread(run_cli, "grants", "status", "--json", env=env)
    row = [g for g in json.loads(r.stdout) if g["capability"] == "contact.create"][0]
    assert row["mode"] == "canary" and row["canary"]["live"] == live and row["canary"]["dry_run"] == 1000 - live
    assert row["canary"]["live_success_rate"] == 1.0


async def test_agent_past_its_budget_is_quarantined_on_the_next_request(make_gateway, upstream, tmp_path, webhook):
    rules = gov_rules(upstream, tmp_path, governance={
        "error_budget": {"window": "1h", "max_bad_ratio": 0.2, "min_requests": 10},
        "alerts": [{"url": webhook.url, "format": "json"}]})
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    for _ in range(8):
        assert (await gw.request("GET", "/api/contacts/1")).status == 200
    assert (await gw.request("PATCH", "/api/contacts/1", json={"name": "ok"})).status == 200
    # now misbehave: denials count against the budget
    statuses = [(await gw.request("DELETE", "/api/contacts/1")).status for _ in range(3)]
    assert statuses == [403, 403, 403]
    # 3 bad of 12 = 25% > 20%: the very next write is already forced to dry-run
    r = await gw.request("PATCH", "/api/contacts/1", json={"name": "after"})
    assert r.status == 200 and r.headers["X-Tether-Quarantined"] == "true" and "X-Tether-Dry-Run" in r.headers
    assert upstream.records["contacts"]["1"]["name"] == "ok"
    # reads continue
    assert (await gw.request("GET", "/api/contacts/1")).status == 200
    alert = await webhook.wait_for(lambda a: a["event"] == "quarantine")
    assert alert["agent"] == "bot" and "error budget" in alert["reason"]
    env = {"TETHER_ADMIN_URL": gw.admin_url, "TETHER_ADMIN_TOKEN": gw.reviewer_token()}
    r = await asyncio.to_thread(run_cli, "agents", "status", env=env)
    assert "bot: QUARANTINED" in r.stdout and "denials 3" in r.stdout
    r = await asyncio.to_thread(run_cli, "agents", "release", "bot", "--reason", "fixed the prompt", env=env)
    assert r.returncode == 0
    r = await gw.request("PATCH", "/api/contacts/1", json={"name": "released"})
    assert "X-Tether-Quarantined" not in r.headers and upstream.records["contacts"]["1"]["name"] == "released"
    events = [x.get("event") for x in await gw.journal() if x["kind"] == "governance"]
    assert "quarantine" in events and "release" in events


async def test_quarantine_can_refuse_writes_and_survives_restart(make_gateway, upstream, tmp_path):
    rules = gov_rules(upstream, tmp_path, governance={"quarantine_action": "refuse"})
    gw = await make_gateway(rules)
    r = await gw.admin("POST", "/api/agents/bot/quarantine", json={"reason": "suspicious"})
    assert r.status == 200
    r = await gw.request("PATCH", "/api/contacts/1", json={"name": "x"})
    assert r.status == 403 and (await r.json())["error"]["code"] == "agent_quarantined"
    assert (await gw.request("GET", "/api/contacts")).status == 200
    gw2 = await make_gateway(rules)
    r = await gw2.request("PATCH", "/api/contacts/1", json={"name": "x"})
    assert r.status == 403
    assert upstream.seen("PATCH") == []


async def test_metrics_parse_and_match_the_traffic(make_gateway, upstream, tmp_path):
    gw = await make_gateway(gov_rules(upstream, tmp_path))
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    for _ in range(3):
        await gw.request("GET", "/api/contacts/1")
    for _ in range(2):
        await gw.request("POST", "/api/contacts", json={"name": "x"})
    await gw.request("GET", "/api/nope")
    await asyncio.sleep(2.2)  # gauges refresh
    async with gw.session.get(f"{gw.admin_url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.labels.get("capability"), s.labels.get("decision"), s.labels.get("status")): s.value
               for s in fams["tether_requests"].samples if s.name == "tether_requests_total"}
    assert samples[("contact.read", "live", "200")] == 3
    assert samples[("contact.create", "dry_run", "201")] == 2
    assert samples[("-", "denied", "403")] == 1
    depth = [s.value for s in fams["tether_review_queue_depth"].samples][0]
    assert depth == 2
    assert "tether_journal_commit_seconds" in fams and "tether_request_duration_seconds" in fams
    # the request-duration histogram: cumulative buckets ending at +Inf == count, one series per decision
    lat = fams["tether_request_duration_seconds"].samples
    live = [s for s in lat if s.labels.get("decision") == "live"]
    buckets = [(s.labels["le"], s.value) for s in live if s.name.endswith("_bucket")]
    assert [b for b, _ in buckets][-1] == "+Inf" and buckets[0][0] == "0.0005"
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    [count] = [s.value for s in live if s.name.endswith("_count")]
    assert count == buckets[-1][1] == 3
    assert 0 < [s.value for s in live if s.name.endswith("_sum")][0] < 3
    up = [s for s in fams["tether_upstream_duration_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in up) == 3  # the three forwarded reads (dry-run writes never left)


async def test_an_agent_cannot_choose_the_canary_side_of_its_writes(make_gateway, upstream, tmp_path):
    """The attack: request ids are a per-process prefix plus a counter the agent sees in
    X-Tether-Request-Id, so the id of its next request is known in advance. When the side was a hash
    of that id, an agent could send cheap reads until the next id hashed "live", then send the write
    it wanted live: every such write went live. Drawn from a CSPRNG, the share stays ~10%."""
    import hashlib

    rules = gov_rules(upstream, tmp_path, governance=LENIENT)
    rules["agents"]["bot"]["grants"][1] = {"capability": "contact.create", "mode": "canary"}
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "1", "name": "A"})

    def predicted_live(request_id: str) -> bool:  # what the old decision computed
        return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) % 10000 < 10 * 100

    sent = went_live = 0
    while sent < 30:
        r = await gw.request("GET", "/api/contacts/1")
        rid = r.headers["X-Tether-Request-Id"]
        nxt = f"{rid[:16]}{int(rid[16:], 16) + 1:016x}"
        if not predicted_live(nxt):
            continue
        r = await gw.request("POST", "/api/contacts", json={"name": f"chosen {sent}"})
        assert r.status == 201
        assert r.headers["X-Tether-Request-Id"] == nxt  # the prediction of the id itself holds
        sent += 1
        went_live += "X-Tether-Dry-Run" not in r.headers
    # 10% of 30 is 3; the chance of 15 or more by luck is below 1e-8
    assert went_live < 15, f"{went_live} of the {sent} writes the agent timed went live"
    assert len(upstream.seen("POST")) == went_live
