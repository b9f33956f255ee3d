"""Runs last (file order): no API key may appear in any log or audit line the session produced."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LIMITED_KEY, PROD_KEY, RESEARCH_KEY, SUBST_KEY
from tests.support.processes import Server

KEYS = [RESEARCH_KEY, PROD_KEY, SUBST_KEY, LIMITED_KEY, "sk-test-fresh-key", "sk-wrong-secret-123"]


def test_no_key_in_any_log_or_audit_record(gateway: Server, log_dir: Path) -> None:
    files = [path for path in log_dir.iterdir() if path.is_file()]
    assert any(path.name == "audit.jsonl" for path in files) and any(path.name == "gateway.log" for path in files)
    for path in files:
        text = path.read_text(errors="replace")
        for key in KEYS:
            assert key not in text, f"{key} leaked into {path.name}"
