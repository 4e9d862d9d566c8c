"""``tether rules test``: run the ``*.cases.yaml`` beside a rules file, like ``opa test``.

A cases file lists requests and the decisions they must get::

    rules: salesforce.yaml          # optional; default: the rules file with the same stem
    cases:
      - name: the renewal bot may move a stage (in dry-run)
        agent: renewal-bot
        on_behalf_of: ae:jane@acme   # optional
        intent: renew Acme           # optional (default "rules test")
        request:
          upstream: salesforce       # optional when the rules have one upstream
          method: PATCH
          path: /services/data/v59.0/sobjects/Opportunity/0065g00000AbCdEAAZ
          json: {StageName: Negotiation}     # or form: {...}, or body: "raw text"
          headers: {X-Custom: 1}
        expect:
          decision: dry_run          # live | dry_run | denied | refused
          code: capability_not_granted   # the error code, for denials
          status: 403
          capability: opportunity.update_stage

The cases run through a real gateway built from the rules file (in this process, on loopback), with
every upstream replaced by a local sink that answers success and a temporary store, so the decision is
exactly the one production would make — nothing is sent anywhere.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ConfigError, RulesFile, load_rules


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CaseRequest(_M):
    method: str
    path: str
    upstream: str | None = None
    headers: dict[str, str] = {}
    json_body: Any = Field(None, alias="json")
    form: dict[str, Any] | None = None
    body: str | None = None


class CaseExpect(_M):
    decision: Literal["live", "dry_run", "denied", "refused"] | None = None
    code: str | None = None
    status: int | None = None
    capability: str | None = None


class Case(_M):
    name: str
    agent: str
    on_behalf_of: str | None = None
    intent: str | None = "rules test"
    transaction: str | None = None
    request: CaseRequest
    expect: CaseExpect


class CasesFile(_M):
    rules: str | None = None
    cases: list[Case]


@dataclass
class CaseResult:
    name: str
    ok: bool
    got: dict[str, Any]
    want: dict[str, Any]

    def describe(self) -> str:
        if self.ok:
            return f"PASS {self.name}"
        diffs = ", ".join(f"{k}: want {v!r}, got {self.got.get(k)!r}" for k, v in self.want.items()
                          if self.got.get(k) != v)
        return f"FAIL {self.name}: {diffs}"


def load_cases(path: Path) -> CasesFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), [("", f"cannot read: {exc}")]) from None
    try:
        return CasesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), [(".".join(str(x) for x in e["loc"]), e["msg"])
                                      for e in exc.errors(include_url=False)]) from None


def rules_for(cases_path: Path, cases: CasesFile) -> Path:
    if cases.rules:
        return (cases_path.parent / cases.rules).resolve()
    stem = cases_path.name[: -len(".cases.yaml")] if cases_path.name.endswith(".cases.yaml") else cases_path.stem
    return cases_path.parent / f"{stem}.yaml"


async def _sink() -> tuple[web.AppRunner, int]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.json_response({"id": "sink0000000000001", "success": True, "ok": True, "errors": []},
                                 status=201 if request.method == "POST" else 200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def _test_rules(rules: RulesFile, sink_url: str, store: str) -> tuple[RulesFile, str]:
    """The same policy, wired to the sink: no secrets, no fixed ports, a throwaway store."""
    secret = secrets.token_hex(32)
    doc = rules.model_dump(mode="python", exclude_none=False)
    doc["server"].update({"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store, "tls": None,
                          "workers": 1})
    doc["server"]["journal"]["mirror_file"] = None
    doc["identity"] = {"issuer": rules.identity.issuer, "audience": rules.identity.audience,
                       "hs_secret": {"value": secret}, "algorithms": ["HS256"],
                       "reviewer_claim": rules.identity.reviewer_claim, "reviewer_role": rules.identity.reviewer_role}
    doc["governance"]["alerts"] = []
    # every case is judged on its own: no error budget carries over from one case to the next
    doc["governance"]["error_budget"] = {"min_requests": 10**9}
    for a in doc["agents"].values():
        a["error_budget"] = None
    # MCP upstreams are left out (a case is a REST request; Tether would start their servers), with their
    # capabilities and the grants of them
    mcp_ups = {n for n, up in doc["upstreams"].items() if up.get("kind") == "mcp"}
    mcp_caps = {n for n, c in doc["capabilities"].items() if c.get("upstream") in mcp_ups}
    for n in mcp_ups:
        del doc["upstreams"][n]
    for n in mcp_caps:
        del doc["capabilities"][n]
    for a in doc["agents"].values():
        a["grants"] = [g for g in a["grants"] if (g if isinstance(g, str) else g["capability"]) not in mcp_caps]
    for up in doc["upstreams"].values():
        up.update({"url": sink_url, "listen": None, "tls": None, "credentials": {"type": "none"},
                   # the sink is plain http on loopback: no proxy, no upstream TLS settings
                   "proxy": "direct", "ca_file": None, "client_cert": None, "server_name": None,
                   "host_header": None, "max_connections": None})
    return RulesFile.model_validate(doc), secret


async def run_cases(cases_path: Path, rules_path: Path | None = None) -> list[CaseResult]:
    from ..app.gateway import Gateway
    from ..policy.identity import mint_token

    cases = load_cases(cases_path)
    rules_path = rules_path or rules_for(cases_path, cases)
    rules = load_rules(rules_path)
    runner, port = await _sink()
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        test_rules, _ = _test_rules(rules, f"http://127.0.0.1:{port}", str(Path(tmp) / "cases.db"))
        gw = Gateway(test_rules)
        await gw.start()
        try:
            base = f"http://127.0.0.1:{gw.listeners[0].bound_port}"
            async with aiohttp.ClientSession() as s:
                for case in cases.cases:
                    results.append(await _run_one(gw, s, base, case, test_rules, mint_token))
        finally:
            await gw.stop(grace=1)
            await runner.cleanup()
    return results


async def _run_one(gw: Any, s: aiohttp.ClientSession, base: str, case: Case, rules: RulesFile, mint: Any) -> CaseResult:
    req = case.request
    rest = rules.rest_upstreams
    upstream = req.upstream or (next(iter(rest)) if len(rest) == 1 else None)
    want = case.expect.model_dump(exclude_none=True)
    if upstream is None:
        return CaseResult(case.name, False, {"error": "request.upstream is required (several upstreams)"}, want)
    token = mint(rules.identity, case.on_behalf_of, actor=case.agent) if case.on_behalf_of else mint(rules.identity, case.agent)
    headers = {"Authorization": f"Bearer {token}", **req.headers}
    if case.intent:
        headers["X-Tether-Intent"] = case.intent
    if case.transaction:
        headers["X-Tether-Transaction"] = case.transaction
    kw: dict[str, Any] = {}
    if req.json_body is not None:
        kw["json"] = req.json_body
    elif req.form is not None:
        from ..policy.bodies import encode_form

        kw["data"] = encode_form(req.form)
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif req.body is not None:
        kw["data"] = req.body.encode()
    url = base + f"/{upstream}" + req.path
    async with s.request(req.method, aiohttp.client.URL(url, encoded=True), headers=headers, **kw) as r:
        await r.read()
        status = r.status
        rid = r.headers.get("X-Tether-Request-Id")
    await gw.journal.flush(5)
    got: dict[str, Any] = {"status": status}
    if rid:
        rows = await gw.store.journal_query(filters={"request_id": rid}, limit=10)
        recs = [r.record() for r in rows]
        req = next((r for r in recs if r["kind"] == "request"), None)
        out = next((r for r in recs if r["kind"] == "outcome"), None)
        if req is not None:
            got.update({"decision": req.get("decision"), "code": req.get("error"), "capability": req.get("capability")})
            if out is not None and out.get("error") and not out.get("forwarded"):
                # refused after the intent was journaled (e.g. non_compensable_in_transaction)
                got.update({"decision": "denied" if out.get("status", 0) < 500 else "refused",
                            "code": out.get("error")})
    ok = all(got.get(k) == v for k, v in want.items())
    return CaseResult(case.name, ok, got, want)


def run_cases_sync(cases_path: Path, rules_path: Path | None = None) -> list[CaseResult]:
    return asyncio.run(run_cases(cases_path, rules_path))
