"""The console's Keys and Decisions pages in a real browser, on the key lifecycle and decision APIs of the
`wiring` branch (issue 20): create a key (its secret shown once, with a copy button), use it with the
OpenAI SDK, revoke it and see the SDK get 401 within 2 s; rotate; a tenant sees its own keys, read-only;
pages of keys; decisions by request id; axe-core, CSP and 390 px on both pages; a console session of a
database key ends when the key is revoked.

Until that branch is merged this gateway has no `/admin/keys`, and the whole module is skipped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import LOCAL_MODEL
from tests.support.console import (ADMIN_KEY, PROD_KEY, WIDTHS, ConsoleGateway, at, browser, csp_violations,
                                   new_page, serious_axe_violations, sign_in, start_console_gateway)
from tests.support.processes import Server

__all__ = ["browser"]


def _has_key_api() -> bool:
    """Whether the gateway's app routes GET /admin/keys (asked of its router; nothing is started)."""
    from starlette.routing import Match

    from gateway.api.app import create_app
    from gateway.settings import Settings

    app = create_app(Settings())
    while not hasattr(app, "routes"):  # RequestContextMiddleware(GenerationRoutes(FastAPI))
        app = app.app
    scope = {"type": "http", "method": "GET", "path": "/admin/keys", "root_path": "", "headers": [],
             "query_string": b""}
    return any(route.matches(scope)[0] is Match.FULL for route in app.routes)


pytestmark = [pytest.mark.llamacpp, pytest.mark.skipif(
    not _has_key_api(), reason="needs the key lifecycle and decision APIs of the `wiring` branch "
                               "(/admin/keys, /admin/decisions): run after merging it")]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def gateway(llama_cpp: Server, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleGateway]:
    work = tmp_path_factory.mktemp("console-keys")
    started = start_console_gateway("console-keys-gateway", llama_cpp, log_dir, work)  # its own SQLite database
    try:
        yield started
    finally:
        started.server.stop()


def _create(gateway: ConsoleGateway, tenant: str, name: str) -> dict:
    answer = httpx.post(gateway.url + "/admin/keys", json={"tenant": tenant, "name": name}, headers=ADMIN, timeout=30)
    assert answer.status_code == 201, answer.text
    return answer.json()


def _chat(gateway: ConsoleGateway, key: str):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=300)
    return client.chat.completions.create(model=LOCAL_MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])


def _refused_within(gateway: ConsoleGateway, key: str, seconds: float) -> float:
    """How long, from now, until the key is refused (401); fails if it still works `seconds` later."""
    started = time.monotonic()
    return _refused_at(gateway, key, started + seconds) - started


def _refused_at(gateway: ConsoleGateway, key: str, deadline: float) -> float:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)
    while time.monotonic() < deadline:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("the key still works")


def test_create_a_key_use_it_then_revoke_it(browser, gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    sign_in(page, gateway.url, ADMIN_KEY)
    page.goto(gateway.url + "/console/keys")
    page.get_by_text("Create a key").click()
    page.locator("#new-tenant").select_option("prod-app")
    page.get_by_label("Name").fill("console-made")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_test_id("secret").input_value()
    assert secret.startswith("sk-gw-")
    page.get_by_role("button", name="Copy").click()
    page.wait_for_function("() => document.querySelector('[data-copied-for=secret]').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    assert _chat(gateway, secret).choices  # the new key works with the OpenAI SDK
    page.goto(gateway.url + "/console/keys?tenant=prod-app")
    assert secret not in page.content()  # shown once: never again
    key_id = page.locator("tr[data-key]", has_text="console-made").get_attribute("data-key")
    page.get_by_role("button", name=f"Revoke key {key_id}").click()
    page.wait_for_url(lambda url: "notice=revoked" in url)
    assert _refused_within(gateway, secret, 2.0) < 2.0
    assert "revoked" in page.locator(f'tr[data-key="{key_id}"]').inner_text()
    assert csp_violations(page) == [] and page.console_errors == []


def test_rotate_shows_the_new_secret_once_and_the_old_key_lasts_its_grace(browser, gateway: ConsoleGateway) -> None:
    old = _create(gateway, "prod-app", "to-rotate")
    page = new_page(browser)
    sign_in(page, gateway.url, ADMIN_KEY)
    page.goto(gateway.url + "/console/keys?tenant=prod-app")
    row = page.locator(f'tr[data-key="{old["id"]}"]')
    grace = 8
    row.get_by_label("Grace (s)").fill(str(grace))
    asked = time.monotonic()
    row.get_by_role("button", name="Rotate").click()
    new = page.get_by_test_id("secret").input_value()
    assert new.startswith("sk-gw-") and new != old["key"]
    refused = _refused_at(gateway, old["key"], asked + grace + 5)  # the old one until its grace is over
    assert asked + grace - 1 <= refused <= asked + grace + 2.5
    assert _chat(gateway, new).choices  # the new one works with the SDK


def test_a_tenant_sees_its_own_keys_and_may_not_change_them(browser, gateway: ConsoleGateway) -> None:
    mine, theirs = _create(gateway, "prod-app", "mine"), _create(gateway, "prod-subst", "theirs")
    page = new_page(browser)
    sign_in(page, gateway.url, PROD_KEY)
    page.goto(gateway.url + "/console/keys")
    shown = page.locator("tr[data-key]").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert mine["id"] in shown and theirs["id"] not in shown
    assert page.get_by_role("button", name="Create key").count() == 0
    assert page.get_by_role("button", name="Revoke key").count() == 0
    response = page.goto(gateway.url + "/console/keys?tenant=prod-subst")
    assert response.status == 403 or theirs["id"] not in page.content()
    csrf = page.locator("input[name=csrf_token]").first.input_value()
    refused = page.request.post(f"{gateway.url}/console/keys/{mine['id']}/revoke", form={"csrf_token": csrf})
    assert refused.status == 403
    assert _chat(gateway, mine["key"]).choices  # still live


def test_keys_come_a_page_at_a_time(browser, gateway: ConsoleGateway) -> None:
    made = {_create(gateway, "limited-dev", f"bulk-{n}")["id"] for n in range(60)}
    page = new_page(browser)
    sign_in(page, gateway.url, ADMIN_KEY)
    page.goto(gateway.url + "/console/keys?tenant=limited-dev")
    seen: list[str] = []
    while True:
        rows = page.locator("tr[data-key]").evaluate_all("rows => rows.map(r => r.dataset.key)")
        assert len(rows) <= 50
        seen += rows
        following = page.get_by_role("link", name="Next keys")
        if following.count() == 0:
            break
        following.click()
        page.wait_for_load_state()
    assert made <= set(seen) and len(seen) == len(set(seen))


def test_decisions_are_found_by_request_id(browser, gateway: ConsoleGateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=PROD_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="llama-7b", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    request_id = denied.value.response.headers["x-request-id"]
    page = new_page(browser)
    sign_in(page, gateway.url, ADMIN_KEY)
    deadline = time.monotonic() + 10  # decisions reach the database in batches (about a second)
    while True:
        page.goto(f"{gateway.url}/console/decisions?request_id={request_id}")
        row = page.locator(f'tr[data-request-id="{request_id}"]')
        if row.count() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    text = row.inner_text()
    assert "prod-app" in text and "deny" in text and "non-commercial-license-in-production" in text
    page.goto(f"{gateway.url}/console/decisions?tenant=prod-app&decision=deny")
    assert page.locator(f'tr[data-request-id="{request_id}"]').count() == 1
    tenant = new_page(browser)
    sign_in(tenant, gateway.url, "sk-test-subst-key")
    tenant.goto(f"{gateway.url}/console/decisions?request_id={request_id}")
    assert tenant.locator(f'tr[data-request-id="{request_id}"]').count() == 0  # another tenant's decision


@pytest.mark.parametrize("width", WIDTHS)
def test_keys_and_decisions_pages_are_accessible_and_fit(browser, gateway: ConsoleGateway, width: int) -> None:
    page = new_page(browser, width)
    sign_in(page, gateway.url, ADMIN_KEY)
    _create(gateway, "prod-app", f"a11y-{width}")
    for path in ("/console/keys", "/console/decisions"):
        page.goto(gateway.url + path)
        assert serious_axe_violations(page) == [], path
        assert page.evaluate("document.documentElement.scrollWidth") <= width, path
    page.goto(gateway.url + "/console/keys")
    page.get_by_text("Create a key").click()
    page.get_by_label("Name").fill("a11y-secret")
    page.get_by_role("button", name="Create key").click()
    assert serious_axe_violations(page) == [] and page.evaluate("document.documentElement.scrollWidth") <= width
    assert csp_violations(page) == [] and page.console_errors == []


def test_a_console_session_of_a_database_key_ends_with_the_key(browser, gateway: ConsoleGateway) -> None:
    key = _create(gateway, "prod-app", "console-sign-in")
    page = new_page(browser)
    sign_in(page, gateway.url, key["key"])
    assert page.get_by_test_id("who").inner_text() == "prod-app"
    assert httpx.post(f"{gateway.url}/admin/keys/{key['id']}/revoke", headers=ADMIN, timeout=30).status_code == 200
    page.goto(gateway.url + "/console/overview")
    page.wait_for_url(at("/console/sign-in"))
