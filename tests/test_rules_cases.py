"""Every rules/*.cases.yaml passes against its rules file (the `tether rules test` runner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli.casetest import run_cases

CASES = sorted((Path(__file__).resolve().parent.parent / "rules").glob("*.cases.yaml"))


@pytest.mark.parametrize("cases_path", CASES, ids=[p.name for p in CASES])
async def test_rules_cases(cases_path):
    results = await run_cases(cases_path)
    failed = [r.describe() for r in results if not r.ok]
    assert results and not failed, "\n".join(failed)


async def test_a_wrong_expectation_fails(tmp_path):
    src = Path(__file__).resolve().parent.parent / "rules" / "example.yaml"
    (tmp_path / "example.yaml").write_text(src.read_text())
    (tmp_path / "example.cases.yaml").write_text(
        "cases:\n  - name: wrong\n    agent: renewal-bot\n    request: {method: DELETE, path: /opportunities/1}\n"
        "    expect: {decision: live}\n")
    results = await run_cases(tmp_path / "example.cases.yaml")
    assert [r.ok for r in results] == [False]
    assert "want 'live', got 'denied'" in results[0].describe()


def test_rules_test_cli_exit_codes(tmp_path):
    from tests.procs import run_cli

    src = Path(__file__).resolve().parent.parent / "rules" / "example.yaml"
    r = run_cli("rules", "test", str(src))
    assert r.returncode == 0 and "7/7 cases passed" in r.stdout
    (tmp_path / "example.yaml").write_text(src.read_text())
    (tmp_path / "example.cases.yaml").write_text(
        "cases:\n  - name: wrong\n    agent: renewal-bot\n    request: {method: GET, path: /accounts/1}\n"
        "    expect: {decision: denied}\n")
    r = run_cli("rules", "test", str(tmp_path))
    assert r.returncode == 1 and "FAIL wrong" in r.stdout


async def test_cases_run_against_the_sink_whatever_the_upstream_egress(tmp_path):
    """A rules file whose upstream goes through a proxy with mutual TLS still runs its cases: the sink that
    replaces the upstream is plain http on loopback (no proxy, no TLS files needed on this machine)."""
    src = Path(__file__).resolve().parent.parent / "rules"
    text = (src / "example.yaml").read_text().replace(
        "    url: http://127.0.0.1:9000\n",
        "    url: https://crm.example.com\n    proxy: http://proxy.invalid:3128\n    ca_file: certs/crm-ca.pem\n"
        "    client_cert: {cert: certs/tether.crt, key: certs/tether.key}\n    server_name: crm.example.com\n"
        "    host_header: crm.example.com\n    max_connections: 4\n")
    assert "proxy.invalid" in text
    (tmp_path / "example.yaml").write_text(text)
    (tmp_path / "example.cases.yaml").write_text((src / "example.cases.yaml").read_text())
    results = await run_cases(tmp_path / "example.cases.yaml")
    failed = [r.describe() for r in results if not r.ok]
    assert len(results) == 7 and not failed, "\n".join(failed)
