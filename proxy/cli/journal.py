"""``tether journal``: tail, verify, export, show and archive the audit journal.

These commands read the store directly (the SQLite file or the PostgreSQL database), so they work
while the gateway runs (``kubectl exec ... tether journal tail -f``) and after it stopped.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import orjson

from ..config import parse_duration
from ..journal.lines import human_line
from ..journal.search import journal_time
from ..journal.writer import archive, now_iso, verify, verify_archives
from .common import add_store_args, fail, open_cli_store, rules_from, run

_FILTERS = (("agent", "agent"), ("user", "on_behalf_of"), ("capability", "capability"), ("decision", "decision"),
            ("kind", "kind"), ("request_id", "request_id"))


def parse_time(value: str | None) -> str | None:
    """RFC 3339 / ISO date, or a relative age like 10m, 2h, 7d -> the journal's timestamp format; a value
    that is neither ends the command with one clear line."""
    try:
        return journal_time(value)
    except ValueError as exc:
        raise SystemExit(f"tether: {exc}") from None


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {col: getattr(args, flag) for flag, col in _FILTERS if getattr(args, flag, None) is not None}


def _emit(seq: int, rec: dict[str, Any], as_json: bool, hash_: str | None = None) -> None:
    if as_json:
        from ..inert import json_text

        doc = {"seq": seq, **rec}
        if hash_:
            doc["hash"] = hash_
        sys.stdout.write(json_text(orjson.dumps(doc).decode()) + "\n")
    else:
        sys.stdout.write(human_line(seq, rec) + "\n")
    sys.stdout.flush()


def cmd_tail(args: argparse.Namespace) -> int:
    """The last N matching records (then, with -f, each new one). ``--agent``/``--user``/``--capability``
    take an exact value or a part of one (see proxy/journal/search.py); when more records match than
    were printed, it says how many."""
    from ..journal.search import ChannelMatch, accepts, resolve, scan_back, sql_filters

    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        try:
            base = {col: getattr(args, flag) for flag, col in _FILTERS if getattr(args, flag, None) is not None
                    and col not in ("agent", "on_behalf_of", "capability")}
            matches = [await resolve(store, "agent", "--agent", args.agent),
                       await resolve(store, "on_behalf_of", "--user", args.user),
                       await resolve(store, "capability", "--capability", args.capability)]
            if getattr(args, "channel", None):
                matches.append(ChannelMatch(args.channel))  # type: ignore[arg-type]
            filters = sql_filters(base, matches)
            since = parse_time(args.since)
            head = (await store.journal_head())[0]
            shown: list[Any] = []
            more = 0
            async for r in scan_back(store, filters, matches, since=since, before_seq=head + 1):
                if len(shown) < args.lines:
                    shown.append(r)
                    continue
                more += 1
                if more >= COUNT_MORE_UPTO:
                    break
            for r in reversed(shown):
                _emit(r.seq, r.record(), args.json)
            for m in matches:
                said = m.said() if m is not None else None
                if said:
                    print(f"tether: {said}", file=sys.stderr)
            if more:
                many = f"more than {COUNT_MORE_UPTO - 1:,}" if more >= COUNT_MORE_UPTO else f"{more:,}"
                print(f"tether: {many} older record{'s' if more != 1 else ''} match too "
                      f"(-n {args.lines + min(more, COUNT_MORE_UPTO)} or --since to see them)", file=sys.stderr)
            if not args.follow:
                return 0
            after = head
            while True:
                now = (await store.journal_head())[0]
                if now <= after:
                    await store.journal_wait(after, 1.0)
                    continue
                cursor = after
                while cursor < now:
                    new = await store.journal_query(after_seq=cursor, before_seq=now + 1, filters=filters,
                                                    since=since, limit=1000)
                    for r in new:
                        if accepts(r, matches):
                            _emit(r.seq, r.record(), args.json)
                    if len(new) < 1000:
                        break
                    cursor = new[-1].seq
                after = now
        finally:
            await store.close()

    try:
        return run(go())
    except KeyboardInterrupt:
        return 0


def _verifying_keys(args: argparse.Namespace) -> dict[str, Any]:
    """key id -> public key: --public-key files, else the rules file's checkpoint key (its public half)."""
    from ..journal.checkpoint import key_id, load_public_key, signer_from_config

    keys: dict[str, Any] = {}
    for path in args.public_key or []:
        try:
            pub = load_public_key(open(path).read(), path)
        except OSError as exc:
            raise SystemExit(f"tether: cannot read {path}: {exc.strerror}") from None
        keys[key_id(pub)] = pub
    if not keys:
        from ..config import ConfigError

        try:
            rules = rules_from(args)
            signer = signer_from_config(rules.server.journal, args.config or "<rules>") if rules else None
        except ConfigError as exc:
            raise SystemExit(f"tether: {exc}") from None
        if signer is None:
            raise SystemExit("tether: --checkpoints needs the public key: --public-key FILE (or a rules file whose "
                             "server.journal.checkpoint_key can be read)")
        keys[signer.key_id] = signer.public_key
    return keys


def _parse_expect(value: str) -> tuple[int | None, str]:
    seq, sep, h = value.rpartition(":")
    h = h.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", h) or (sep and not seq.isdigit()):
        raise SystemExit(f"tether: --expect-head takes HASH or SEQ:HASH (64 hex digits), got {value!r}")
    return (int(seq) if sep else None), h


COUNT_MORE_UPTO = 10_001  # records counted past -n before saying "more than 10,000"


def cmd_report(args: argparse.Namespace) -> int:
    """What an agent did for a person over a period (see proxy/cli/journal_report.py)."""
    from ..journal.search import resolve, scan_forward, sql_filters
    from .journal_report import RENDERERS, Report, grouped_by

    if not args.agent and not args.user:
        return fail("give --agent and/or --user (a name, or a part of one)", 2)

    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        try:
            matches = [await resolve(store, "agent", "--agent", args.agent),
                       await resolve(store, "on_behalf_of", "--user", args.user)]
            since, until = parse_time(args.since), parse_time(args.until)
            rep = Report(agent=args.agent, user=args.user, since=since, until=until)
            async for r in scan_forward(store, sql_filters({}, matches), matches, since=since, until=until):
                rep.add(r.record())
            rep.matched = grouped_by(matches)
            if len(matches[0].matched if matches[0] else {}) == 1:
                rep.agent = next(iter(matches[0].matched))  # type: ignore[union-attr]
            if len(matches[1].matched if matches[1] else {}) == 1:
                rep.user = next(iter(matches[1].matched))  # type: ignore[union-attr]
            text = RENDERERS[args.format](rep)
            if args.output:
                with open(args.output, "w", encoding="utf-8", newline="") as f:
                    f.write(text + "\n")
                print(f"wrote {args.output} ({rep.records} records read)", file=sys.stderr)
            else:
                sys.stdout.write(text + "\n")
            return 0
        finally:
            await store.close()

    return run(go())


def cmd_verify(args: argparse.Namespace) -> int:
    from ..journal.checkpoint import CheckpointError, check_chain, read_checkpoints
    from ..journal.writer import read_archive

    try:
        checkpoints = [cp for f in args.checkpoints or [] for cp in read_checkpoints(f)]
    except (OSError, CheckpointError) as exc:
        return fail(f"cannot read checkpoints: {exc}", 2)
    keys = _verifying_keys(args) if args.checkpoints else {}
    if args.checkpoints and not checkpoints:
        return fail(f"no checkpoints in {', '.join(args.checkpoints)}", 2)
    expect = [_parse_expect(v) for v in args.expect_head or []]

    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        try:
            anchor = await store.journal_anchor()
            archived = 0
            if args.archives:
                res, last = verify_archives(args.archives)
                if not res.ok:
                    print(f"FAIL archive: {res.problem}")
                    return 1
                if last != anchor:
                    print(f"FAIL archives end at record {last[0]} but the store's chain starts after record "
                          f"{anchor[0]}: an archive is missing or was altered")
                    return 1
                archived = res.checked
            wanted = {cp["seq"] for cp in checkpoints if isinstance(cp.get("seq"), int)}
            wanted_hashes = {h for _, h in expect}
            seen: dict[int, str] = {}
            by_hash: dict[str, int] = {}

            def note(r: Any) -> None:
                if r.seq in wanted:
                    seen[r.seq] = r.hash
                if r.hash in wanted_hashes:
                    by_hash[r.hash] = r.seq

            res = await verify(store, note if (wanted or wanted_hashes) else None)
            if not res.ok:
                print(f"FAIL at record {res.broken_seq}: {res.problem} ({res.checked} records verified before it)")
                return 1
            head_seq = (await store.journal_head())[0]
            archived_hashes: dict[int, str] | None = None
            if args.archives and (wanted or wanted_hashes):
                archived_hashes = {}
                for path in sorted(Path(args.archives).glob("journal-*.jsonl")):
                    for r in read_archive(path):
                        archived_hashes[r.seq] = r.hash
                        if r.hash in wanted_hashes:
                            by_hash[r.hash] = r.seq
            if anchor[0] and anchor[1] in wanted_hashes:
                by_hash.setdefault(anchor[1], anchor[0])
            for seq, h in expect:
                got = by_hash.get(h)
                if got is None or (seq is not None and got != seq):
                    where = f"record {seq}" if seq is not None else "any record"
                    print(f"FAIL --expect-head: {where} should have hash {h[:16]}…, but the chain holds no such "
                          "record: the history was rewritten or cut")
                    return 1
            extra = f", plus {archived} archived records" if archived else (
                f" (records up to {anchor[0]} are archived; pass --archives DIR to verify them too)" if anchor[0] else "")
            span = f"records {res.first_seq}..{res.last_seq}" if res.checked else "no records"
            if checkpoints:
                cres = check_chain(checkpoints, keys, seen, anchor=anchor, head_seq=head_seq,
                                   archived_hashes=archived_hashes)
                if not cres.ok:
                    print(f"FAIL {cres.problem}")
                    return 1
                extra += (f"; {cres.checked} signed checkpoint(s) match (latest: record {cres.latest})"
                          + (f", {cres.archived} older than the store's records not checked (--archives DIR)"
                             if cres.archived else ""))
            if expect:
                extra += f"; {len(expect)} expected head(s) found"
            print(f"OK {res.checked} records verified ({span}){extra}")
            return 0
        finally:
            await store.close()

    return run(go())


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Sign the chain head now (or print the public key verifiers need)."""
    from ..config import ConfigError
    from ..journal.checkpoint import (
        CheckpointError,
        Signer,
        append_line,
        load_private_key,
        public_pem,
        signer_from_config,
    )

    try:
        if args.key:
            try:
                signer: Signer | None = Signer(load_private_key(open(args.key).read(), args.key))
            except OSError as exc:
                return fail(f"cannot read {args.key}: {exc.strerror}", 2)
        else:
            rules = rules_from(args)
            signer = signer_from_config(rules.server.journal, args.config or "<rules>") if rules else None
    except (CheckpointError, ConfigError) as exc:
        return fail(str(exc), 2)
    if signer is None:
        return fail("no key: give --key FILE, or a rules file with server.journal.checkpoint_key", 2)
    if args.public_key:
        sys.stdout.write(public_pem(signer.public_key))
        return 0

    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        try:
            seq, head = await store.journal_head()
        finally:
            await store.close()
        cp = signer.sign(seq, head, now_iso())
        if args.output:
            append_line(args.output, cp)
        sys.stdout.write(orjson.dumps(cp).decode() + "\n")
        return 0

    return run(go())


def cmd_export(args: argparse.Namespace) -> int:
    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        out = open(args.output, "w") if args.output else sys.stdout
        n = 0
        try:
            after = 0
            since, until = parse_time(args.since), parse_time(args.until)
            while True:
                rows = await store.journal_query(after_seq=after, since=since, until=until, filters=_filters(args),
                                                 limit=5000)
                if not rows:
                    break
                for r in rows:
                    out.write(orjson.dumps({"seq": r.seq, "prev_hash": r.prev_hash, "hash": r.hash, **r.record()})
                              .decode() + "\n")
                    n += 1
                after = rows[-1].seq
        finally:
            if args.output:
                out.close()
            await store.close()
        print(f"exported {n} records", file=sys.stderr)
        return 0

    return run(go())


def cmd_show(args: argparse.Namespace) -> int:
    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        try:
            if args.id.isdigit():
                rows = await store.journal_query(after_seq=int(args.id) - 1, limit=1)
                rows = [r for r in rows if r.seq == int(args.id)]
            else:
                rows = await store.journal_query(filters={"request_id": args.id}, limit=100)
            if not rows:
                return fail(f"no journal record {args.id!r}")
            for r in rows:
                sys.stdout.write(orjson.dumps({"seq": r.seq, "prev_hash": r.prev_hash, "hash": r.hash, **r.record()},
                                              option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        finally:
            await store.close()

    return run(go())


def cmd_archive(args: argparse.Namespace) -> int:
    rules = rules_from(args)
    folder = args.dir or (str(rules.server.journal.archive_dir) if rules and rules.server.journal.archive_dir else None)
    if not folder:
        return fail("give --dir (or server.journal.archive_dir in the rules file)", 2)
    if args.older_than is None and args.keep is None:
        return fail("give --older-than AGE and/or --keep N", 2)

    async def go() -> int:
        store = open_cli_store(args)
        await store.open()
        try:
            path = await archive(store, folder, older_than=parse_duration(args.older_than) if args.older_than else None,
                                 keep_records=args.keep)
            print(f"archived to {path}" if path else "nothing to archive")
            return 0
        finally:
            await store.close()

    return run(go())


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("journal", help="read, verify, export and archive the audit journal",
                       description="The audit journal: every request's intent and outcome, hash-chained.")
    js = p.add_subparsers(dest="journal_command", metavar="SUBCOMMAND")

    def filters(q: argparse.ArgumentParser) -> None:
        q.add_argument("--agent", help="only this agent (tail: a name or a part of one)")
        q.add_argument("--user", help="only requests on behalf of this user (tail: a name or a part of one)")
        q.add_argument("--capability", help="only this capability (tail: a name or a part of one)")
        q.add_argument("--decision", help="only this decision (denied, live, dry_run, approved, ...)")
        q.add_argument("--kind", help="only this record kind (request, outcome, review, tx, system)")
        q.add_argument("--request-id", dest="request_id", help="only this request")

    t = js.add_parser("tail", help="print recent records; -f to follow",
                      description="Print the last records as 'agent=… | on_behalf_of=… | intent=\"…\" | …' lines "
                                  "(or JSON lines with --json); -f keeps following new records. Says how many more "
                                  "records match when it stops at -n. Control and bidi characters are shown "
                                  "escaped, and a value holding ' | ' or a quote is quoted.")
    add_store_args(t)
    filters(t)
    t.add_argument("--channel", choices=["rest", "mcp"], help="only requests that came by this door (REST or MCP)")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new records as they are committed")
    t.add_argument("-n", "--lines", type=int, default=20, help="how many past records to print first (default 20)")
    t.add_argument("--since", help="only records at or after this time (RFC 3339) or age (10m, 2h, 7d)")
    t.add_argument("--json", action="store_true", help="JSON lines instead of human lines")
    t.set_defaults(func=cmd_tail)

    rp = js.add_parser("report", help="what an agent did for a person: by capability and decision, reviews, "
                                      "denials, rollbacks",
                       description="One report from the journal: what the agent did for the person over the period, "
                                   "grouped by capability and decision, with intents, reviewers, denials and "
                                   "rollbacks. --agent/--user take a name or a part of one (it says which matched).")
    add_store_args(rp)
    rp.add_argument("--agent", help="the agent (a name, or a part of one)")
    rp.add_argument("--user", help="the person it acted for (a name, or a part of one: 'jane')")
    rp.add_argument("--since", default="7d", help="from this time or age (default 7d)")
    rp.add_argument("--until", help="up to (not including) this time or age")
    rp.add_argument("--format", choices=["text", "markdown", "csv"], default="text",
                    help="text (default), markdown, or csv (one row per request)")
    rp.add_argument("--output", "-o", help="file to write (default stdout)")
    rp.set_defaults(func=cmd_report)

    v = js.add_parser("verify", help="check the hash chain; exit 1 at the first broken or missing record",
                      description="Check the hash chain from its anchor to its head. The chain alone cannot show a "
                                  "history that was rewritten and rechained by someone with write access to the "
                                  "database; signed checkpoints kept outside it (--checkpoints) or a head hash "
                                  "noted earlier (--expect-head) can.")
    add_store_args(v)
    v.add_argument("--archives", metavar="DIR", help="also verify archived records in DIR (they precede the store)")
    v.add_argument("--checkpoints", metavar="FILE", action="append",
                   help="JSON lines with signed checkpoints (a checkpoint file, or the journal mirror); each must "
                        "verify and match the chain (repeatable)")
    v.add_argument("--public-key", dest="public_key", metavar="FILE", action="append",
                   help="Ed25519 public key that signed the checkpoints (PEM or raw hex/base64; repeatable for "
                        "rotated keys); default: the public half of the rules file's checkpoint_key")
    v.add_argument("--expect-head", dest="expect_head", metavar="[SEQ:]HASH", action="append",
                   help="a chain head noted earlier: the chain must still hold a record with this hash (repeatable)")
    v.set_defaults(func=cmd_verify)

    c = js.add_parser("checkpoint", help="sign the chain head now with the checkpoint key; print it (JSON)",
                      description="Sign (seq, hash) of the chain head with server.journal.checkpoint_key (or --key) "
                                  "and print the checkpoint as one JSON line; -o also appends it to FILE (fsynced). "
                                  "Keep checkpoints where whoever can write the database cannot: another host, a "
                                  "log pipeline, write-once storage. --public-key prints the key verifiers need.")
    add_store_args(c)
    c.add_argument("--key", metavar="FILE", help="Ed25519 private key (PEM or 32-byte seed as hex/base64); default: "
                                                 "the rules file's server.journal.checkpoint_key")
    c.add_argument("--output", "-o", metavar="FILE", help="also append the checkpoint to FILE")
    c.add_argument("--public-key", dest="public_key", action="store_true",
                   help="print the public key (PEM) instead of signing")
    c.set_defaults(func=cmd_checkpoint)

    e = js.add_parser("export", help="write records as JSON lines (for auditors)")
    add_store_args(e)
    filters(e)
    e.add_argument("--since", help="from this time or age")
    e.add_argument("--until", help="up to (not including) this time or age")
    e.add_argument("--output", "-o", help="file to write (default stdout)")
    e.set_defaults(func=cmd_export)

    s = js.add_parser("show", help="show one record by sequence number, or all records of a request id")
    add_store_args(s)
    s.add_argument("id", help="sequence number or request id")
    s.set_defaults(func=cmd_show)

    a = js.add_parser("archive", help="move old records to an archive file; the chain stays verifiable")
    add_store_args(a)
    a.add_argument("--dir", help="archive folder (default server.journal.archive_dir)")
    a.add_argument("--older-than", dest="older_than", help="archive records older than this age (e.g. 90d)")
    a.add_argument("--keep", type=int, help="keep at most this many records in the store")
    a.set_defaults(func=cmd_archive)
