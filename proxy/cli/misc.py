"""Small commands: ``tether certs dev``."""

from __future__ import annotations

import argparse


def cmd_certs_dev(args: argparse.Namespace) -> int:
    from .certs import make_dev_cert

    crt, key = make_dev_cert(args.out, args.host or ["localhost", "127.0.0.1", "::1"], days=args.days)
    print(f"certificate: {crt}\nkey:         {key}\n\n"
          f"Use them on a listener:\n  upstreams:\n    salesforce:\n      listen: 127.0.0.1:8443\n"
          f"      tls: {{cert: {crt}, key: {key}}}\n\n"
          f"and make the agent's SDK trust the certificate (e.g. REQUESTS_CA_BUNDLE={crt} for requests-based SDKs).")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("certs", help="development TLS certificates")
    cs = p.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    d = cs.add_parser("dev", help="make a self-signed certificate and key for a TLS listener",
                      description="Write a self-signed certificate (also usable as its own CA bundle) and key.")
    d.add_argument("--out", default="certs", help="folder to write to (default ./certs)")
    d.add_argument("--host", action="append", help="host name or IP the certificate is for (repeatable; "
                                                   "default localhost, 127.0.0.1, ::1)")
    d.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    d.set_defaults(func=cmd_certs_dev)
