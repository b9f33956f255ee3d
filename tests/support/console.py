"""The console's test rig: a gateway with the test tenants and SmolLM2 on llama.cpp, Debian's chromium
driven by Playwright, and helpers to sign in, check a page's Content-Security-Policy reports and run
axe-core (vendored in tests/support/axe/) on it."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway import cli
from gateway.tenancy.tenants import hash_key
from tests.conftest import ROOT, tenants_document
from tests.support.processes import Server, free_port, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AXE = Path(__file__).parent / "axe" / "axe.min.js"
ADMIN_KEY = "sk-test-any-key"  # research-lab, admin (tests/conftest.py)
PROD_KEY = "sk-test-prod-key"  # prod-app, production
SUBST_KEY = "sk-test-subst-key"  # prod-subst, production, Llama 2 attested
QUOTA_KEY = "sk-test-console-quota"
QUOTA_TENANT = "quota-lab"
QUOTA_DAY = 1_000_000
WIDTHS = (1280, 390)

# Records every CSP violation of a page (an init script runs outside the page's policy).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', e => window.__cspViolations.push(
  e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + (e.sourceFile || '') + ':' + e.lineNumber));
"""


def console_tenants(quota_day: int = QUOTA_DAY) -> dict:
    document = tenants_document()
    document["tenants"].append({"name": QUOTA_TENANT, "environment": "production",
                                "api_key_hashes": [hash_key(QUOTA_KEY)],
                                "limits": {"tokens_per_day": quota_day, "tokens_per_month": 10 * quota_day}})
    return document


@dataclass
class ConsoleGateway:
    server: Server
    url: str
    registry: list[Path]
    tenants: Path

    def write_tenants(self, document: dict) -> None:
        self.tenants.write_text(yaml.safe_dump(document))


def start_console_gateway(name: str, llama_cpp: Server, log_dir: Path, work: Path,
                          env: dict[str, str] | None = None) -> ConsoleGateway:
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())
    local["models"][0]["backends"][0]["url"] = llama_cpp.url
    overlay = work / "smollm2-here.yaml"
    overlay.write_text(yaml.safe_dump(local))
    tenants = work / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(console_tenants()))
    registry = [ROOT / "model_registry.yaml", overlay]
    port = free_port()
    server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port, "/ready",
                          log_dir, {"GATEWAY_REGISTRY": ",".join(map(str, registry)), "GATEWAY_TENANTS": str(tenants),
                                    "GATEWAY_AUDIT_SINK": str(work / "audit.jsonl"),
                                    "GATEWAY_HEALTH_PROBE_INTERVAL_S": "1",
                                    "GATEWAY_DATA_DIR": str(work / "data"),  # its own database, where it has one
                                    **(env or {})})
    server.wait_ready(60)
    return ConsoleGateway(server, server.url, registry, tenants)


@pytest.fixture(scope="module")
def console_gateway(llama_cpp: Server, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[ConsoleGateway]:
    work = tmp_path_factory.mktemp("console")
    gateway = start_console_gateway(f"console-gateway-{work.name}", llama_cpp, log_dir, work)
    try:
        yield gateway
    finally:
        gateway.server.stop()


@pytest.fixture(scope="module")  # not the session: Playwright's sync API holds an event loop on this thread while
def browser():                   # it runs, and later modules' asyncio.run() would find it running
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is missing: `make test` installs it (make chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield instance
        finally:
            instance.close()


def new_page(browser, width: int = 1280):
    """A fresh browser profile (no cookies) with the CSP watch installed."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.add_init_script(CSP_WATCH)
    page = context.new_page()
    page.console_errors = []  # type: ignore[attr-defined]
    errors = page.console_errors  # type: ignore[attr-defined]
    # Script errors, and any script, style or image that failed; an error page's own 403 or 404 is its answer.
    page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
            and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and r.request.resource_type != "document"
            and errors.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: r.resource_type != "document" and errors.append(f"failed {r.url}"))
    return page


def at(path: str):
    """A wait_for_url predicate: the page's path is `path` (a glob would match `?next=` + path too)."""
    from urllib.parse import urlsplit

    return lambda url: urlsplit(url).path == path


def sign_in(page, base: str, key: str) -> None:
    page.goto(f"{base}/console/sign-in")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(at("/console/overview"))


def csp_violations(page) -> list[str]:
    return page.evaluate("window.__cspViolations || []")


def serious_axe_violations(page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now."""
    page.evaluate(AXE.read_text(encoding="utf-8") + "\n;0")  # DevTools evaluation: outside the page's CSP
    result = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
                           ".filter(v => ['serious', 'critical'].includes(v.impact))"
                           ".map(v => v.id + ' (' + v.impact + '): ' + v.help + ' -- '"
                           " + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | '))")
    return result


def explain(registry, tenants, tenant: str, model: str) -> dict:
    """What `gateway policy explain --tenant T --model M` prints, read back into fields."""
    args = cli._parser().parse_args(["policy", "explain", "--tenant", tenant, "--model", model])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli._report(args, registry, tenants) == 0
    first, *rest = out.getvalue().splitlines()
    head, _, reason = first.partition(": ")
    verdict, _, rule = head.partition(" (")
    served = next((line.removeprefix("served model: ") for line in rest if line.startswith("served model: ")), None)
    return {"verdict": verdict, "rule": rule.rstrip(")"), "reason": reason,
            "hidden": any("404 model_not_found" in line for line in rest), "served": served}
