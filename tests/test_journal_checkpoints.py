"""Signed checkpoints: a history rewritten and rechained by someone who can write the database is caught.

The hash chain alone cannot catch it: an attacker who edits a record and recomputes every later hash
(and the recorded head) leaves a chain that verifies. A checkpoint of the head, signed with a key that is
not in the store and kept outside it, still names the old hash.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.chain import canonical, record_hash
from tests.conftest import base_rules, pg_admin, store_sql
from tests.procs import run_cli

pytestmark = pytest.mark.stores


def write_key(path: Path) -> Path:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def rechain(url: str, seq: int, tamper: Callable[[dict[str, Any]], dict[str, Any]], *, cut_after: int | None = None) -> None:
    """What an attacker with write access to the database does: edit record ``seq``, recompute every later
    hash and the recorded head (optionally also dropping the records after ``cut_after``)."""
    rows = store_sql(url, "SELECT seq, prev_hash, hash, record FROM journal ORDER BY seq")
    pg = url.startswith("postgresql")
    stmts, prev = [], None
    for s, _, h, rec in rows:
        if cut_after is not None and s > cut_after:
            stmts.append(f"DELETE FROM journal WHERE seq = {s}")
            continue
        payload = bytes(rec)
        if s < seq:
            prev = h.hex() if isinstance(h, bytes) else h  # the SQLite store keeps a hash as its 32 bytes
            continue
        if s == seq:
            payload = canonical(tamper(orjson.loads(payload)))
        new = record_hash(prev, s, payload)
        lit = f"'\\x{payload.hex()}'::bytea" if pg else f"X'{payload.hex()}'"
        stmts.append(f"UPDATE journal SET prev_hash = '{prev}', hash = '{new}', record = {lit} WHERE seq = {s}")
        prev = new
    last = cut_after if cut_after is not None else rows[-1][0]
    stmts.append(f"UPDATE journal_meta SET head_seq = {last}, head_hash = '{prev}' WHERE id = 1")
    if pg:
        from proxy.store.postgres import parse_url

        pg_admin(";\n".join(stmts) + ";", schema=parse_url(url)[1]["schema"])
    else:
        con = sqlite3.connect(url)
        con.executescript("BEGIN;\n" + ";\n".join(stmts) + ";\nCOMMIT;")
        con.close()


async def test_a_rechained_history_passes_verify_but_not_the_signed_checkpoints(make_gateway, upstream, store_url,
                                                                               tmp_path):
    key = write_key(tmp_path / "checkpoint.pem")
    rules = base_rules(upstream.url, store_url)
    rules["server"]["journal"] = {"checkpoint_key": {"file": str(key)}, "checkpoint_interval": 0.05,
                                  "mirror_file": str(tmp_path / "mirror.jsonl"),
                                  "checkpoint_file": str(tmp_path / "checkpoints.jsonl")}
    gw = await make_gateway(rules)
    for i in range(5):
        assert (await gw.request("POST", "/api/contacts", json={"name": f"n{i}"}, intent=f"create n{i}")).status == 201
        await asyncio.sleep(0.06)  # past the interval: the next commit is followed by a checkpoint
    r = await gw.admin("GET", "/api/journal/checkpoint")
    fetched = await r.json()
    assert r.status == 200 and fetched["kind"] == "checkpoint" and fetched["seq"] == (await gw.gw.store.journal_head())[0]
    await gw.gw.stop(grace=1)  # the head at stop is signed too
    env = {"TETHER_CONFIG": str(gw.rules_path)}
    cps = [orjson.loads(x) for x in (tmp_path / "checkpoints.jsonl").read_bytes().splitlines()]
    mirrored = [x for x in map(orjson.loads, (tmp_path / "mirror.jsonl").read_bytes().splitlines())
                if x.get("kind") == "checkpoint"]
    assert len(cps) >= 3 and cps == mirrored
    assert cps[-1]["seq"] == max(x["seq"] for x in map(orjson.loads, (tmp_path / "mirror.jsonl").read_bytes().splitlines()))
    # `tether journal checkpoint` signs the head from outside the gateway, and prints the public key
    out = run_cli("journal", "checkpoint", "-o", str(tmp_path / "offsite.jsonl"), env=env)
    assert out.returncode == 0, out.stderr
    offsite = orjson.loads(out.stdout)
    assert offsite["seq"] == cps[-1]["seq"] and offsite["hash"] == cps[-1]["hash"]
    pub = run_cli("journal", "checkpoint", "--public-key", env=env)
    assert pub.returncode == 0 and "BEGIN PUBLIC KEY" in pub.stdout
    (tmp_path / "pub.pem").write_text(pub.stdout)
    verify = ["journal", "verify", "--store", store_url]
    with_cps = [*verify, "--public-key", str(tmp_path / "pub.pem"), "--checkpoints", str(tmp_path / "checkpoints.jsonl"),
                "--checkpoints", str(tmp_path / "mirror.jsonl")]
    ok = run_cli(*with_cps)
    assert ok.returncode == 0 and "signed checkpoint(s) match" in ok.stdout, ok.stdout + ok.stderr
    assert run_cli(*verify, "--expect-head", f"{fetched['seq']}:{fetched['hash']}").returncode == 0

    # the attacker rewrites an early record's intent and rechains everything after it
    victim = next(x for x in await_records(store_url) if x.get("intent") == "create n1")
    rechain(store_url, victim["seq"], lambda rec: {**rec, "intent": "nothing to see here"})
    plain = run_cli(*verify)
    assert plain.returncode == 0 and plain.stdout.startswith("OK"), plain.stdout  # the chain alone is fooled
    caught = run_cli(*with_cps)
    assert caught.returncode == 1 and "rewritten" in caught.stdout, caught.stdout + caught.stderr
    caught = run_cli(*verify, "--expect-head", fetched["hash"])
    assert caught.returncode == 1 and "rewritten or cut" in caught.stdout
    # the key is the rules file's: no --public-key needed on the operator's side
    assert run_cli(*verify, "--checkpoints", str(tmp_path / "offsite.jsonl"), env=env).returncode == 1

    # a forged checkpoint (the attacker "fixes" the file to the new head) fails its signature
    new_head = store_sql(store_url, "SELECT head_seq, head_hash FROM journal_meta")[0]
    forged = {**offsite, "hash": new_head[1]}
    (tmp_path / "forged.jsonl").write_bytes(orjson.dumps(forged) + b"\n")
    bad = run_cli(*verify, "--public-key", str(tmp_path / "pub.pem"), "--checkpoints", str(tmp_path / "forged.jsonl"))
    assert bad.returncode == 1 and "signature does not verify" in bad.stdout


def await_records(url: str) -> list[dict[str, Any]]:
    """The records as stored, request records expanded from their compact form (proxy.compact)."""
    from proxy.compact import expand

    return [expand(orjson.loads(bytes(r[1]))) | {"seq": r[0]}
            for r in store_sql(url, "SELECT seq, record FROM journal ORDER BY seq")]


async def test_a_cut_tail_is_caught_by_the_last_checkpoint(make_gateway, upstream, store_url, tmp_path):
    key = write_key(tmp_path / "k.pem")
    rules = base_rules(upstream.url, store_url)
    rules["server"]["journal"] = {"checkpoint_key_file": str(key), "checkpoint_file": str(tmp_path / "cps.jsonl")}
    gw = await make_gateway(rules)
    for i in range(3):
        assert (await gw.request("POST", "/api/contacts", json={"name": f"n{i}"})).status == 201
    await gw.gw.stop(grace=1)
    env = {"TETHER_CONFIG": str(gw.rules_path)}
    cps = [orjson.loads(x) for x in (tmp_path / "cps.jsonl").read_bytes().splitlines()]
    assert len(cps) == 2  # the first commit (the interval is 60 s), and the head at stop
    cp = cps[-1]
    head = cp["seq"]
    rechain(store_url, head - 2, lambda rec: rec, cut_after=head - 2)  # drop the last two records
    verify = ["journal", "verify", "--store", store_url]
    assert run_cli(*verify).returncode == 0
    r = run_cli(*verify, "--checkpoints", str(tmp_path / "cps.jsonl"), env=env)
    assert r.returncode == 1 and "records were removed" in r.stdout, r.stdout


def test_a_checkpoint_key_that_cannot_be_read_stops_the_gateway_from_starting(tmp_path, store_url):
    from proxy.app.gateway import Gateway
    from proxy.config import ConfigError, parse_rules

    (tmp_path / "bad.pem").write_text("not a key")
    for ref in ({"file": str(tmp_path / "missing.pem")}, {"file": str(tmp_path / "bad.pem")}, {"env": "NO_SUCH_VAR_X"}):
        rules = base_rules("http://127.0.0.1:9", store_url)
        rules["server"]["journal"] = {"checkpoint_key": ref}
        with pytest.raises(ConfigError, match="server.journal.checkpoint_key"):
            Gateway(parse_rules(rules))
