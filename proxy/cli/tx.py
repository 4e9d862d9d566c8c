"""``tether tx``: list, show, roll back and retry transactions (through the admin API)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..inert import inert
from .common import AdminError, add_admin_args, admin_call, fail, print_json, table

TX_STATES = ("open", "committed", "rolling_back", "rolled_back", "needs_attention")


def render_tx(tx: dict[str, Any]) -> str:
    """A transaction as text; its name, ids and intents are the agent's, so each is made inert."""
    lines = [f"Transaction {inert(tx['id'])}  ({tx['state']})",
             f"Agent       {inert(tx['agent'])}  on behalf of {inert(tx.get('on_behalf_of') or tx['agent'])}",
             f"Name        {inert(tx.get('name') or '-')}",
             f"Deadline    {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(tx['deadline']))}Z" if tx.get("deadline")
             else "Deadline    -"]
    if tx.get("rollback_reason"):
        lines.append(f"Rolled back {inert(tx['rollback_reason'])}")
    if tx.get("problem"):
        lines.append(f"Problem     {inert(tx['problem'])}")
    steps = tx.get("steps") or []
    if steps:
        rows = []
        for s in steps:
            plan = s.get("plan") or {}
            req = plan.get("request") or {}
            undo = f"{req.get('method', '')} {req.get('path', '')}".strip() or "-"
            err = f"  [{s['last_error']}]" if s.get("last_error") and s["state"] != "compensated" else ""
            rows.append([s["id"], s["state"], s.get("capability", ""),
                         f"{s.get('method', '')} {s.get('path', '')}", undo + err])
        lines += ["", table(["STEP", "STATE", "CAPABILITY", "ACTION", "UNDO"], rows, right={"STEP"})]
    if tx.get("remaining_steps"):
        lines.append(f"\nRemaining steps: {', '.join(str(x) for x in tx['remaining_steps'])}")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    state = None if args.state in (None, "", "all") else args.state
    try:
        doc = admin_call(args, "GET", "/api/transactions", params={"state": state, "agent": args.agent})
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(doc["transactions"])
        return 0
    if not doc["transactions"]:
        print("no transactions")
        return 0
    print(table(["ID", "STATE", "AGENT", "OPENED", "NAME"],
                [[tx["id"], tx["state"], tx["agent"],
                  time.strftime("%Y-%m-%d %H:%M", time.gmtime(tx["created_at"])) if tx.get("created_at") else "-",
                  tx.get("name") or ""] for tx in doc["transactions"]]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        tx = admin_call(args, "GET", f"/api/transactions/{args.id}")
    except AdminError as exc:
        return fail(str(exc))
    print_json(tx) if args.json else print(render_tx(tx))
    return 0


def _act(args: argparse.Namespace, action: str) -> int:
    body = {"resolve_conflicts": args.resolve_conflicts} if getattr(args, "resolve_conflicts", None) else {}
    try:
        tx = admin_call(args, "POST", f"/api/transactions/{args.id}/{action}", body)
    except AdminError as exc:
        return fail(str(exc))
    print_json(tx) if args.json else print(render_tx(tx))
    return 0 if tx["state"] == "rolled_back" else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tx", help="transactions and their compensation steps (admin API)",
                       description="Inspect and roll back agents' transactions. Talks to the admin API with a "
                                   "reviewer token ($TETHER_ADMIN_URL, $TETHER_ADMIN_TOKEN).")
    ts = p.add_subparsers(dest="tx_command", metavar="SUBCOMMAND")
    ls = ts.add_parser("list", help="list transactions")
    add_admin_args(ls)
    ls.add_argument("--state", choices=[*TX_STATES, "all"], metavar="STATE",
                    help="open, committed, rolling_back, rolled_back, needs_attention or all (default)")
    ls.add_argument("--agent")
    ls.set_defaults(func=cmd_list)
    sh = ts.add_parser("show", help="a transaction with its steps and their undo operations")
    add_admin_args(sh)
    sh.add_argument("id")
    sh.set_defaults(func=cmd_show)
    for action, text in (("rollback", "roll back an open transaction (newest step first)"),
                         ("retry", "resume the rollback of a needs_attention transaction")):
        q = ts.add_parser(action, help=text)
        add_admin_args(q)
        q.add_argument("id")
        q.add_argument("--resolve-conflicts", dest="resolve_conflicts", choices=["skip", "overwrite"],
                       help="for steps flagged conflict: skip them, or overwrite the concurrent change")
        q.set_defaults(func=lambda a, _action=action: _act(a, _action))
