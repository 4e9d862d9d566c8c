"""``tether promote``, ``tether agents``, ``tether grants``: governance through the admin API."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import AdminError, add_admin_args, admin_call, fail, print_json


def _evidence_lines(ev: dict[str, Any]) -> list[str]:
    g = ev["gate"]
    return [
        f"  reviewed        {ev['reviewed']:>6}   (gate: ≥ {g['min_reviewed']}, window {ev['window_days']:g} days)",
        f"  approval rate   {ev['approval_rate']:>6.1%}   (gate: ≥ {g['min_approval_rate']:.1%})",
        f"  edited before   {ev['edit_share']:>6.1%}   (gate: ≤ {g['max_edit_share']:.1%})",
        f"  approved {ev['approved']}, rejected {ev['rejected']}, replay failed {ev['replay_failed']}, "
        f"pending {ev['pending']}",
    ]


def cmd_promote(args: argparse.Namespace) -> int:
    if args.history:
        try:
            doc = admin_call(args, "GET", "/api/promotions", params={"history": 1, "agent": args.agent,
                                                                     "capability": args.capability})
        except AdminError as exc:
            return fail(str(exc))
        if args.json:
            print_json(doc["promotions"])
            return 0
        for p in doc["promotions"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(p["at"]))
            forced = f" FORCED ({p.get('reason')})" if p.get("forced") else (f" ({p['reason']})" if p.get("reason") else "")
            print(f"{when}Z  {p['agent']:<20} {p['capability']:<30} {p.get('from', '?')} -> {p['mode']}  "
                  f"by {p['by']}{forced}")
        if not doc["promotions"]:
            print("no promotions recorded")
        return 0
    if not (args.agent and args.capability and args.to):
        return fail("usage: tether promote AGENT CAPABILITY --to canary|live [--force --reason R]", 2)
    body = {"agent": args.agent, "capability": args.capability, "to": args.to, "force": args.force,
            "reason": args.reason}
    try:
        row = admin_call(args, "POST", "/api/promotions", body)
    except AdminError as exc:
        details = (exc.body or {}).get("error", {}).get("details") if isinstance(exc.body, dict) else None
        if exc.status == 409 and details:
            print(f"REFUSED: {args.agent} / {args.capability} stays {details['from']}; the gate for "
                  f"{details['to']} is not met:")
            for m in details["missing"]:
                print(f"  - {m}")
            print("Evidence:")
            print("\n".join(_evidence_lines(details["evidence"])))
            print("(--force --reason '...' overrides; the override is journaled)")
            return 1
        return fail(str(exc))
    if args.json:
        print_json(row)
        return 0
    print(f"PROMOTED {args.agent} / {args.capability}: {row['from']} -> {row['mode']}"
          + (" (FORCED: gate not met)" if row["forced"] else ""))
    print("Evidence:")
    print("\n".join(_evidence_lines(row["evidence"])))
    return 0


def cmd_agents_status(args: argparse.Namespace) -> int:
    try:
        doc = admin_call(args, "GET", "/api/agents")
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(doc["agents"])
        return 0
    for a in doc["agents"]:
        s = a["sli"]
        q = a["quarantined"]
        state = f"QUARANTINED ({q.get('reason')})" if q else "ok"
        print(f"{a['agent']}: {state}")
        print(f"  window {s['budget']['window']:g}s: {s['requests']} requests, {s['bad']} bad "
              f"({s['bad_ratio']:.1%}; budget {s['budget']['max_bad_ratio']:.1%}, "
              f"{s['budget_left_ratio']:.0%} left) — denials {s['denials']} (validation {s['validation']}, "
              f"rate-limited {s['rate_limited']}), upstream errors {s['upstream_errors']}, rejected reviews "
              f"{s['rejected_reviews']}, rollbacks {s['rollbacks']}")
        for g in a["grants"]:
            print(f"    {g['capability']:<32} {g['effect']:<5} {g['mode']}")
    for u in doc.get("upstreams") or []:
        if not (u["windows"] or u["blocked"] or u["reserve"]):
            continue
        figures = ", ".join(f"{w} {d['remaining']:g}" + (f"/{d['limit']:g}" if d.get("limit") else "") + " left"
                            for w, d in u["windows"].items() if d.get("remaining") is not None) or "no figures yet"
        state = (f"BLOCKED for agents until {time.strftime('%H:%M:%S', time.localtime(u['blocked_until']))} "
                 f"({u['reason']})" if u["blocked"] else "ok")
        print(f"upstream {u['upstream']} quota: {state}; {figures}; reserve {u['reserve'] or 'none'}")
    return 0


def cmd_agents_action(args: argparse.Namespace, action: str) -> int:
    try:
        admin_call(args, "POST", f"/api/agents/{args.agent}/{action}", {"reason": args.reason})
    except AdminError as exc:
        return fail(str(exc))
    print(f"{args.agent}: {'released' if action == 'release' else 'quarantined'}")
    return 0


def cmd_grants_status(args: argparse.Namespace) -> int:
    try:
        doc = admin_call(args, "GET", "/api/grants")
    except AdminError as exc:
        return fail(str(exc))
    if args.json:
        print_json(doc["grants"])
        return 0
    print(f"{'AGENT':<20} {'CAPABILITY':<30} {'MODE':<8} {'REVIEWED':>8} {'APPROVAL':>9} {'GATE':<5} CANARY (live ok/failed, captured)")
    for g in doc["grants"]:
        ev, c = g["evidence"], g["canary"]
        canary = f"{c['live_ok']}/{c['live_failed']}, {c['dry_run']}" if (c["live"] or c["dry_run"]) else "-"
        print(f"{g['agent']:<20} {g['capability']:<30} {g['mode']:<8} {ev['reviewed']:>8} "
              f"{ev['approval_rate']:>9.1%} {'met' if g['gate_met'] else 'no':<5} {canary}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("promote", help="promote a grant dry_run -> canary -> live, gated on review evidence",
                       description="Promote (or demote) an agent's grant. Promotion to canary or live succeeds only "
                                   "when the capability's promotion gate is met by the dry-run record; the evidence "
                                   "is printed either way. --history lists past promotions.")
    add_admin_args(p)
    p.add_argument("agent", nargs="?")
    p.add_argument("capability", nargs="?")
    p.add_argument("--to", choices=["dry_run", "canary", "live"])
    p.add_argument("--force", action="store_true", help="override a failed gate (needs --reason; journaled)")
    p.add_argument("--reason", help="why (kept with the promotion)")
    p.add_argument("--history", action="store_true", help="list recorded promotions instead")
    p.set_defaults(func=cmd_promote)

    a = sub.add_parser("agents", help="agents' SLIs, error budgets and quarantine")
    asub = a.add_subparsers(dest="agents_command", metavar="SUBCOMMAND")
    st = asub.add_parser("status", help="SLIs, budget left and mode per grant, for every agent")
    add_admin_args(st)
    st.set_defaults(func=cmd_agents_status)
    for action, text in (("release", "lift an agent's quarantine"), ("quarantine", "quarantine an agent by hand")):
        q = asub.add_parser(action, help=text)
        add_admin_args(q)
        q.add_argument("agent")
        q.add_argument("--reason", required=True)
        q.set_defaults(func=lambda ns, _a=action: cmd_agents_action(ns, _a))

    g = sub.add_parser("grants", help="grants: modes, promotion evidence, canary outcomes")
    gsub = g.add_subparsers(dest="grants_command", metavar="SUBCOMMAND")
    gs = gsub.add_parser("status", help="every write grant with its mode, evidence and canary comparison")
    add_admin_args(gs)
    gs.set_defaults(func=cmd_grants_status)
