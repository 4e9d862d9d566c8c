"""``tether review``: list, show, approve and reject dry-run items (through the admin API)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson

from ..inert import inert
from .common import AdminError, add_admin_args, admin_call, fail, print_json, table

STATES = ("pending", "approved", "replayed", "replay_failed", "rejected", "expired")


def _age(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def cmd_list(args: argparse.Namespace) -> int:
    state = args.state
    if state in ("", "all"):
        state = "all"
    try:
        doc = admin_call(args, "GET", "/api/review/items", params={
            "state": state, "agent": args.agent, "capability": args.capability, "upstream": args.upstream,
            "limit": args.limit})
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(doc["items"])
        return 0
    rows = doc["items"]
    if not rows:
        print("no items" if state == "all" else f"no {state.replace('_', ' ')} items")
        return 0
    print(table(["ID", "STATE", "AGE", "CAPABILITY", "WHAT"],
                [[it["id"], it["state"], _age(it["created_at"]), it["capability"],
                  (it.get("headline") or {}).get("text") or it.get("intent") or ""] for it in rows],
                right={"AGE"}))
    return 0


def render_item(it: dict[str, Any]) -> str:
    """An item as text; everything the agent controlled is made inert (see proxy/inert.py)."""
    req = it["request"]
    headline = (it.get("headline") or {}).get("text")
    lines = []
    if headline:
        lines += [inert(headline), ""]
    lines += [
        f"Item        {inert(it['id'])}  ({it['state']})",
        f"Agent       {inert(it['agent'])}  on behalf of {inert(it.get('on_behalf_of') or it['agent'])}"
        + (f" ({inert(it['on_behalf_of_proof'])})" if it.get("on_behalf_of_proof") else ""),  # verified / asserted
        f"Intent      {inert(it.get('intent') or '-')}",
        f"Capability  {inert(', '.join(it.get('capabilities') or [it['capability']]))}  (upstream {inert(it['upstream'])})",
        f"Captured    {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(it['created_at']))}Z   request {inert(it.get('request_id'))}",
    ]
    fields = (it.get("headline") or {}).get("fields") or []
    if fields:
        from ..safety.headline import show_value

        lines += ["", "Changes"]
        width = max(len(inert(f["label"])) for f in fields)
        for f in fields:
            old = f"{inert(show_value(f['from']))} → " if f.get("known") else ""
            lines.append(f"  {inert(f['label']):<{width}}  {old}{inert(show_value(f['to']))}")
    if req.get("kind") == "tool":  # a call of an MCP upstream's tool: the tool and its arguments
        lines += ["", inert(f"Tool {req.get('tool')} on MCP upstream {it['upstream']}, called with:")]
    else:
        lines += ["", inert(f"{req['method']} {req['path']}{'?' + req['query'] if req.get('query') else ''}")]
    for k, v in req.get("headers") or []:
        lines.append(inert(f"{k}: {v}"))
    if req.get("content_type"):
        lines.append(inert(f"Content-Type: {req['content_type']}"))
    body = req.get("body_json")
    if body is not None:
        lines += ["", _json(body)]
    elif req.get("body_text"):
        lines += ["", inert(req["body_text"])]
    syn = it.get("synthetic") or {}
    if req.get("kind") == "tool":
        lines += ["", "The agent was told the call is pending review (nothing was called)."]
    else:
        lines += ["", f"Synthetic response given to the agent: {syn.get('status')}"]
    if syn.get("body") is not None:
        lines.append(_json(syn["body"]))
    dec = it.get("decision")
    if dec:
        lines += ["", inert(f"Decision    {dec.get('action')} by {dec.get('by', '-')}"
                            + (f": {dec['reason']}" if dec.get("reason") else "")
                            + (" (edited)" if dec.get("edited") else ""))]
    rep = it.get("replay")
    if rep:
        how = "replayed with the reviewer's edits" if (dec or {}).get("edited") else "replayed as sent"
        if req.get("kind") == "tool" and rep.get("status"):
            lines.append(inert(f"Replay      {how}: the tool answered" + (" an error" if rep.get("is_error") else "")
                               + (f" (result sha256 {rep['result_sha256']})" if rep.get("result_sha256") else "")))
        else:
            lines.append(inert(f"Replay      {how}: upstream answered {rep.get('status') or rep.get('error')}"))
    return "\n".join(lines)


def _json(doc: Any) -> str:
    """Pretty JSON whose strings can hold no terminal control (the inert escapes are valid JSON)."""
    from ..inert import json_text

    return json_text(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def cmd_show(args: argparse.Namespace) -> int:
    try:
        it = admin_call(args, "GET", f"/api/review/items/{args.id}")
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(it)
    else:
        print(render_item(it))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.edit:
        try:
            raw = sys.stdin.read() if args.edit == "-" else open(args.edit).read()
        except OSError as exc:
            return fail(f"cannot read {args.edit}: {exc.strerror}", 2)
        try:
            body["edit"] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body["edit"] = raw
    if args.note:
        body["note"] = args.note
    try:
        it = admin_call(args, "POST", f"/api/review/items/{args.id}/approve", body)
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(it)
    else:
        rep = it.get("replay") or {}
        how = "replayed with your edits" if (it.get("decision") or {}).get("edited") else "replayed as sent"
        if it["state"] == "replayed":
            print(f"{it['id']}: {how} (upstream answered {rep.get('status')})")
        else:
            print(f"{it['id']}: {it['state']} (upstream answered {rep.get('status') or rep.get('error')})")
    return 0 if it["state"] == "replayed" else 1


def cmd_reject(args: argparse.Namespace) -> int:
    try:
        it = admin_call(args, "POST", f"/api/review/items/{args.id}/reject", {"reason": args.reason})
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(it)
    else:
        print(f"{it['id']}: rejected")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("review", help="the dry-run review queue (admin API)",
                       description="Decide captured dry-run writes. Talks to the admin API with a reviewer token "
                                   "($TETHER_ADMIN_URL, $TETHER_ADMIN_TOKEN).")
    rs = p.add_subparsers(dest="review_command", metavar="SUBCOMMAND")
    ls = rs.add_parser("list", help="list items (newest first)")
    add_admin_args(ls)
    ls.add_argument("--state", default="pending", choices=[*STATES, "all"], metavar="STATE", type=lambda v: v or "all",
                    help="pending (default), approved, replayed, replay_failed, rejected, expired, or all")
    ls.add_argument("--agent")
    ls.add_argument("--capability")
    ls.add_argument("--upstream")
    ls.add_argument("--limit", type=int, default=200)
    ls.set_defaults(func=cmd_list)
    sh = rs.add_parser("show", help="show an item: the request as it would be sent, identity, intent")
    add_admin_args(sh)
    sh.add_argument("id")
    sh.set_defaults(func=cmd_show)
    ap = rs.add_parser("approve", help="approve an item: it is replayed to the upstream")
    add_admin_args(ap)
    ap.add_argument("id")
    ap.add_argument("--edit", metavar="FILE", help="approve with this body instead (JSON file, or - for stdin); "
                                                    "validated against the capability's rules again")
    ap.add_argument("--note", help="a note kept with the decision")
    ap.set_defaults(func=cmd_approve)
    rj = rs.add_parser("reject", help="reject an item (never sent)")
    add_admin_args(rj)
    rj.add_argument("id")
    rj.add_argument("--reason", required=True, help="why (kept with the decision and in the journal)")
    rj.set_defaults(func=cmd_reject)
