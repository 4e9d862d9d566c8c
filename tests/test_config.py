"""The rules file: validated at startup, every problem named by file, key path and reason."""

from __future__ import annotations

import argparse

import pytest
import yaml

from proxy.cli.main import effective_rules
from proxy.config import ConfigError, load_rules, parse_duration, parse_rules
from tests.conftest import SECRET, base_rules
from tests.procs import GatewayProcess, run_cli


def _write(tmp_path, doc, name="rules.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False) if not isinstance(doc, str) else doc)
    return p


def test_unknown_key_is_named(tmp_path):
    doc = base_rules("http://127.0.0.1:1", "x.db")
    doc["capabilities"]["contact.read"]["mehtod"] = "GET"
    with pytest.raises(ConfigError) as e:
        load_rules(_write(tmp_path, doc))
    assert "capabilities.contact.read.mehtod: unknown key" in str(e.value)
    assert "rules.yaml" in str(e.value)


def test_every_problem_is_listed_at_once(tmp_path):
    doc = base_rules("ftp://nope", "x.db")
    doc["capabilities"]["contact.read"]["method"] = "get"
    doc["capabilities"]["contact.list"]["path"] = "api/contacts"
    doc["agents"]["bot"]["grants"].append("no.such.capability")
    with pytest.raises(ConfigError) as e:
        load_rules(_write(tmp_path, doc))
    keys = [p for p, _ in e.value.problems]
    assert "upstreams.crm.url" in keys
    assert "capabilities.contact.read.method" in keys
    assert "capabilities.contact.list.path" in keys


def test_cross_references_are_checked(tmp_path):
    doc = base_rules("http://127.0.0.1:1", "x.db")
    doc["agents"]["bot"]["grants"].append("no.such.capability")
    doc["capabilities"]["orphan"] = {"upstream": "nowhere", "method": "GET", "path": "/x/{id}", "params": {"nid": "x"}}
    with pytest.raises(ConfigError) as e:
        load_rules(_write(tmp_path, doc))
    msg = str(e.value)
    assert "agents.bot.grants[7]: unknown capability 'no.such.capability'" in msg
    assert "capabilities.orphan.upstream: unknown upstream 'nowhere'" in msg
    assert "capabilities.orphan.params.nid" in msg


def test_duplicate_yaml_keys_are_refused(tmp_path):
    p = _write(tmp_path, "version: 1\nidentity: {hs_secret: x}\nupstreams: {}\nupstreams: {}\n")
    with pytest.raises(ConfigError) as e:
        load_rules(p)
    assert "duplicate key 'upstreams'" in str(e.value)


def test_yaml_syntax_error_names_line(tmp_path):
    p = _write(tmp_path, "version: 1\nupstreams:\n  crm: [\n")
    with pytest.raises(ConfigError) as e:
        load_rules(p)
    assert "line" in str(e.value) and "YAML error" in str(e.value)


def test_bad_template_and_pattern(tmp_path):
    doc = base_rules("http://127.0.0.1:1", "x.db")
    doc["capabilities"]["contact.read"]["path"] = "/api/contacts/x{id}"
    doc["capabilities"]["contact.list"]["params"] = {"id": "("}
    with pytest.raises(ConfigError) as e:
        load_rules(_write(tmp_path, doc))
    msg = str(e.value)
    assert "capabilities.contact.read.path" in msg and "whole segment" in msg


def test_identity_needs_a_key(tmp_path):
    doc = base_rules("http://127.0.0.1:1", "x.db")
    doc["identity"] = {"algorithms": ["RS256"]}
    with pytest.raises(ConfigError) as e:
        load_rules(_write(tmp_path, doc))
    assert "identity" in str(e.value) and "public_key_file" in str(e.value)


def test_durations_and_sizes():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("30d") == 30 * 86400
    assert parse_duration(2.5) == 2.5
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_relative_key_paths_resolve_against_the_rules_file(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "secret").write_text(SECRET)
    doc = base_rules("http://127.0.0.1:1", "x.db")
    doc["identity"] = {"hs_secret": {"file": "secret"}}
    rules = load_rules(_write(tmp_path / "conf", doc))
    assert str(rules.identity.hs_secret.file) == str((tmp_path / "conf" / "secret").resolve())


def test_flags_override_env_override_file(tmp_path):
    doc = base_rules("http://127.0.0.1:1", "x.db")
    doc["server"]["listen"] = "127.0.0.1:7001"
    doc["server"]["store"] = "file.db"
    p = _write(tmp_path, doc)
    args = argparse.Namespace(config=str(p), listen=None, store=None, admin_listen=None, log_level=None, workers=None,
                              grace_period=None, journal_mirror=None, journal_synchronous=None, max_body_bytes=None,
                              max_in_flight=None)
    env = {"TETHER_LISTEN": "127.0.0.1:7002", "TETHER_STORE": "env.db"}
    r = effective_rules(args, env)
    assert r.server.listen == "127.0.0.1:7002" and r.server.store == "env.db"
    args.listen = "127.0.0.1:7003"
    r = effective_rules(args, env)
    assert r.server.listen == "127.0.0.1:7003" and r.server.store == "env.db"
    r = effective_rules(args, {})
    assert r.server.store == str(tmp_path / "file.db")  # the file's path is relative to the file
    with pytest.raises(ConfigError) as e:
        effective_rules(args, {"TETHER_WORKERS": "many"})
    assert "TETHER_WORKERS" in str(e.value)


def test_serve_with_a_malformed_file_exits_nonzero_naming_the_key(tmp_path):
    doc = base_rules("http://127.0.0.1:1", str(tmp_path / "x.db"))
    doc["upstreams"]["crm"]["credentials"] = {"type": "bearer", "tokn": {"env": "X"}}
    p = _write(tmp_path, doc)
    r = run_cli("serve", "--config", str(p))
    assert r.returncode == 2
    assert str(p) in r.stderr
    assert "upstreams.crm.credentials" in r.stderr


def test_serve_help_documents_env_vars():
    r = run_cli("serve", "--help")
    assert r.returncode == 0
    for s in ("TETHER_LISTEN", "TETHER_STORE", "TETHER_CONFIG", "--admin-listen", "SIGHUP"):
        assert s in r.stdout


def test_token_mint_cli(tmp_path):
    doc = base_rules("http://127.0.0.1:1", "x.db")
    p = _write(tmp_path, doc)
    r = run_cli("token", "mint", "--config", str(p), "--agent", "bot", "--on-behalf-of", "ae:jane", "--ttl", "5m")
    assert r.returncode == 0, r.stderr
    rules = parse_rules(doc)
    from proxy.policy.identity import TokenVerifier

    ident = TokenVerifier(rules.identity).authenticate("Bearer " + r.stdout.strip())
    assert (ident.agent, ident.on_behalf_of) == ("bot", "ae:jane")
    r = run_cli("token", "mint", "--config", str(p), "--agent", "ghost")
    assert r.returncode == 2 and "not declared" in r.stderr


async def test_python_m_proxy_serve_starts_and_proxies(tmp_path, upstream):
    doc = base_rules(upstream.url, str(tmp_path / "t.db"))
    proc = GatewayProcess(doc, tmp_path).start()
    try:
        import aiohttp

        from proxy.policy.identity import mint_token

        token = mint_token(parse_rules(doc).identity, "bot")
        upstream.put_record("contacts", {"id": "1", "name": "A"})
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proc.url}/crm/api/contacts/1", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
    finally:
        assert proc.stop() == 0


def test_serve_refuses_the_pure_python_http_parser(tmp_path):
    """aiohttp's Python parser accepts far more than llhttp: Tether will not run on it."""
    p = _write(tmp_path, base_rules("http://127.0.0.1:1", str(tmp_path / "x.db")))
    r = run_cli("serve", "--config", str(p), env={"AIOHTTP_NO_EXTENSIONS": "1"}, timeout=30)
    assert r.returncode != 0
    assert "pure-Python HTTP parser" in r.stderr
