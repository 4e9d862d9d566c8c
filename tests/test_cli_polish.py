"""CLI polish (issue 26 item 6) and inert operator text in `review show` / `tx list/show` (issue 20 item 8):
aligned columns for real ids, `--state all`, and every failure one line with no traceback."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tests.conftest import base_rules
from tests.procs import run_cli
from tests.test_headline import cli

HOSTILE = "renew\r\x1b[2K\x1b[32mAPPROVED\x1b[0m \u202eevil\u2066 | state=rolled_back"


def rules(upstream: Any, tmp_path: Any) -> dict[str, Any]:
    r = base_rules(upstream.url, str(tmp_path / "t.db"))
    r["agents"]["bot"]["grants"] = ["contact.read", {"capability": "contact.create", "mode": "dry_run"},
                                    {"capability": "contact.update", "mode": "live"}]
    return r


async def test_review_list_state_all_and_states_one_by_one(make_gateway, upstream, tmp_path, capsys):
    gw = await make_gateway(rules(upstream, tmp_path))
    ids = []
    for name in ("Ann", "Bo", "Cy"):
        r = await gw.request("POST", "/api/contacts", json={"name": name}, intent=f"add {name}")
        ids.append(r.headers["X-Tether-Dry-Run"])
    await gw.admin("POST", f"/api/review/items/{ids[0]}/approve", json={})
    await gw.admin("POST", f"/api/review/items/{ids[1]}/reject", json={"reason": "duplicate"})
    args = ("--admin-url", gw.admin_url, "--token", gw.reviewer_token())

    rc, out, _ = await cli(capsys, "review", "list", "--state", "all", *args)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 4
    states = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert states == {ids[0]: "replayed", ids[1]: "rejected", ids[2]: "pending"}
    width = len(ids[0])
    assert lines[0].index("STATE") == width + 2  # the ID column is as wide as a real id
    rc, out, _ = await cli(capsys, "review", "list", "--state", "rejected", *args)
    assert [line.split()[0] for line in out.splitlines()[1:]] == [ids[1]]
    rc, out, _ = await cli(capsys, "review", "list", "--state", "expired", *args)
    assert rc == 0 and out.strip() == "no expired items"
    # the API refuses a state it does not know instead of listing nothing
    r = await gw.admin("GET", "/api/review/items", params={"state": "bogus"})
    assert r.status == 400


async def test_review_show_and_tx_views_make_agent_text_inert(make_gateway, upstream, tmp_path, capsys):
    gw = await make_gateway(rules(upstream, tmp_path))
    r = await gw.request("POST", "/api/contacts", json={"name": "Ann\x1b]0;pwned\x07", "note": "\u202edlrow"},
                         intent="add Ann")
    item = r.headers["X-Tether-Dry-Run"]
    # what an agent could have stored (the views must be safe whatever the input rules let through)
    await gw.gw.store.review_transition(item, ("pending",), "pending", {"intent": HOSTILE})
    async with gw.session.post(f"{gw.url}/_tether/transactions", headers=gw.headers(), json={"name": "renewal"}) as resp:
        tx = (await resp.json())["id"]
    await gw.gw.store.tx_transition(tx, ("open",), "open", {"name": HOSTILE})
    args = ("--admin-url", gw.admin_url, "--token", gw.reviewer_token())

    for argv in (("review", "show", item), ("review", "list"), ("tx", "list", "--state", "all"), ("tx", "show", tx),
                 ("review", "show", item, "--json"), ("tx", "show", tx, "--json")):
        rc, out, err = await cli(capsys, *argv, *args)
        assert rc == 0, (argv, err)
        for bad in ("\x1b", "\r", "\u202e", "\u2066", "\x07"):
            assert bad not in out, (argv, repr(bad))
        assert "\\x1b" in out or "\\u001b" in out, argv
        if "--json" in argv:
            doc = orjson.loads(out)  # still the same JSON, with the exact text inside
            assert HOSTILE in (doc.get("intent"), doc.get("name")), argv
    rc, out, _ = await cli(capsys, "tx", "list", *args)
    row = next(line for line in out.splitlines() if line.startswith(tx))
    assert row.split()[1] == "open"  # the name's fake "state=rolled_back" is just text at the end


def one_line_failure(res: Any) -> str:
    err = res.stderr.strip()
    assert res.returncode != 0, res
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("tether"), err
    return err


async def test_every_failure_is_one_line(make_gateway, upstream, tmp_path):
    gw = await make_gateway(rules(upstream, tmp_path))
    notadb = tmp_path / "notes.db"
    notadb.write_text("not a database\n")
    admin = ["--admin-url", gw.admin_url, "--token", gw.reviewer_token()]
    cases = [
        (["review", "show", "dr_nope", *admin], "admin API answered 404: not_found"),
        (["review", "approve", "dr_nope", *admin], "not_found"),
        (["review", "list", "--admin-url", "http://127.0.0.1:1", "--token", "x"], "cannot reach the admin API"),
        (["review", "list", "--state", "bogus"], "invalid choice: 'bogus'"),
        (["tx", "show", "tx_nope", *admin], "not_found"),
        (["journal", "tail", "--store", str(notadb)], "file is not a database"),
        (["journal", "report", "--store", str(notadb), "--user", "jane"], "file is not a database"),
        (["journal", "tail", "--store", str(tmp_path / "t.db"), "--since", "yesterday-ish"], "neither a time"),
        (["review", "list", "--admin-url", upstream.url + "/echo", "--token", "x"], "not Tether's admin listener"),
    ]
    for argv, expect in cases:
        res = await asyncio.to_thread(run_cli, *argv, timeout=60)
        assert expect in one_line_failure(res), (argv, res.stderr)
