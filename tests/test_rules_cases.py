"""Every rules/*.cases.yaml passes against its rules file (the `tether rules test` runner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.casetest import run_cases

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
