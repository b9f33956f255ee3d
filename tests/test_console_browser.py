"""The console in a real browser (Debian's chromium, Playwright), against a real gateway with SmolLM2 on
llama.cpp: sign-in by keyboard, the session cookie, sign-out, CSRF, a tenant walled in its own tenant,
the policy matrix as `gateway policy explain`, usage and quotas to the token, and on every page at 1,280
and 390 px: no Content-Security-Policy report, no script error, no serious axe-core finding, no sideways
scroll. The key pages (create, use, revoke) need the `wiring` branch: tests/test_console_keys.py."""

from __future__ import annotations

import csv
import io
import time

import httpx
import openai
import pytest

from gateway.registry import load_registry
from gateway.tenancy.tenants import load_tenants
from tests.conftest import LOCAL_MODEL
from tests.support.console import (ADMIN_KEY, at, PROD_KEY, QUOTA_KEY, QUOTA_TENANT, SUBST_KEY, WIDTHS, ConsoleGateway,
                                   browser, console_gateway, console_tenants, csp_violations, new_page,
                                   explain, serious_axe_violations, sign_in)

__all__ = ["browser", "console_gateway"]  # fixtures
pytestmark = pytest.mark.llamacpp
PAGES = ("overview", "models", "policy", "tenants", "usage")


def _spend(gateway: ConsoleGateway, key: str, prompts: list[str]) -> list[openai.types.CompletionUsage]:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=300)
    return [client.chat.completions.create(model=LOCAL_MODEL, max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": text}]).usage for text in prompts]


def _fits(page, width: int) -> bool:
    return page.evaluate("document.documentElement.scrollWidth") <= width


def test_sign_in_and_move_around_by_keyboard_alone(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    page.goto(console_gateway.url + "/console/")
    assert "/console/sign-in" in page.url
    assert page.evaluate("document.activeElement.id") == "key"  # the field has the focus
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    page.wait_for_url(at("/console/overview"))
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.goto(console_gateway.url + "/console/overview")
    for _ in range(12):  # the skip link, the brand, then the pages in order
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Policy":
            break
    page.keyboard.press("Enter")
    page.wait_for_url(at("/console/policy"))
    cell = page.locator('td.cell[data-tenant="prod-app"][data-model="llama-2-7b-chat"] summary')
    cell.focus()
    page.keyboard.press("Enter")
    details = page.locator('td.cell[data-tenant="prod-app"][data-model="llama-2-7b-chat"] details')
    assert details.get_attribute("open") is not None
    assert "has not attested" in cell.locator("xpath=..").inner_text()


def test_the_session_cookie_is_http_only_strict_and_expires(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    cookie = next(c for c in page.context.cookies() if c["name"] == "gw_console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # 127.0.0.1: a browser keeps no Secure cookie over plain HTTP
    assert abs(cookie["expires"] - (time.time() + 8 * 3600)) < 120
    # Reached by any other name than a loopback one, the cookies are Secure.
    with httpx.Client(base_url=console_gateway.url, headers={"host": "console.example.com"}) as http:
        form = http.get("/console/sign-in")
        assert "Secure" in form.headers["set-cookie"]
        token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        http.cookies.set("gw_console_sign_in", token)  # a client keeps no Secure cookie over plain HTTP
        answer = http.post("/console/sign-in", data={"key": ADMIN_KEY, "csrf_token": token})
        assert answer.status_code == 303
        session = next(v for v in answer.headers.get_list("set-cookie") if v.startswith("gw_console_session="))
        assert "Secure" in session and "HttpOnly" in session and "SameSite=strict" in session


@pytest.mark.parametrize("width", WIDTHS)
def test_every_page_is_accessible_within_its_policy_and_fits(browser, console_gateway: ConsoleGateway,
                                                             width: int) -> None:
    page = new_page(browser, width)
    page.goto(console_gateway.url + "/console/sign-in")
    assert serious_axe_violations(page) == [], "sign-in"
    sign_in(page, console_gateway.url, ADMIN_KEY)
    for name in PAGES:
        page.goto(f"{console_gateway.url}/console/{name}")
        page.wait_for_load_state("networkidle")
        assert serious_axe_violations(page) == [], name
        assert _fits(page, width), f"{name} scrolls sideways at {width} px"
        assert ADMIN_KEY not in page.content()
    page.goto(f"{console_gateway.url}/console/policy?tenant=prod-subst")  # the one-tenant list
    assert serious_axe_violations(page) == [] and _fits(page, width)
    page.goto(f"{console_gateway.url}/console/policy?tenant=no-such-tenant")  # an error page
    assert page.get_by_test_id("error-message").inner_text().startswith("No tenant")
    assert serious_axe_violations(page) == [] and _fits(page, width)
    assert csp_violations(page) == [] and page.console_errors == []
    tenant = new_page(browser, width)
    sign_in(tenant, console_gateway.url, PROD_KEY)
    for name in PAGES:
        tenant.goto(f"{console_gateway.url}/console/{name}")
        tenant.wait_for_load_state("networkidle")
        assert serious_axe_violations(tenant) == [], f"{name} (tenant)"
        assert _fits(tenant, width), f"{name} (tenant) scrolls sideways at {width} px"
    assert csp_violations(tenant) == [] and tenant.console_errors == []


def test_the_policy_matrix_is_policy_explain_for_every_cell(browser, console_gateway: ConsoleGateway) -> None:
    registry = load_registry(console_gateway.registry)
    tenants = load_tenants(console_gateway.tenants, registry)
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    page.goto(console_gateway.url + "/console/policy")
    shown = page.evaluate("""[...document.querySelectorAll('td.cell')].map(td => ({
        tenant: td.dataset.tenant, model: td.dataset.model, verdict: td.dataset.verdict, rule: td.dataset.rule,
        hidden: td.dataset.hidden === 'true', served: td.dataset.served,
        reason: td.querySelector('.reason').textContent,
        shownRule: td.querySelector('.rule').textContent}))""")
    cells = {(c["tenant"], c["model"]): c for c in shown}
    assert set(cells) == {(t, m) for t in tenants.tenants for m in registry.models}
    for (tenant, model), cell in cells.items():
        said = explain(registry, tenants, tenant, model)
        assert (cell["verdict"], cell["rule"], cell["shownRule"], cell["reason"], cell["hidden"]) == \
               (said["verdict"], said["rule"], said["rule"], said["reason"], said["hidden"]), (tenant, model)
        if said["served"]:
            assert cell["served"] == said["served"]
    # A tenant's own view: the same decisions, every reason written out.
    own = new_page(browser)
    sign_in(own, console_gateway.url, SUBST_KEY)
    own.goto(console_gateway.url + "/console/policy")
    rows = own.locator("tr.cell")
    assert rows.count() == sum(not cells[("prod-subst", m)]["hidden"] for m in registry.models)
    row = own.locator('tr.cell[data-model="llama-7b"]')
    assert row.get_attribute("data-verdict") == "substitute"
    assert row.locator(".reason").inner_text() == explain(registry, tenants, "prod-subst", "llama-7b")["reason"]


def test_usage_shows_the_tokens_just_spent(browser, console_gateway: ConsoleGateway, tmp_path) -> None:
    spent = _spend(console_gateway, PROD_KEY, ["Say hi.", "Name a colour."])
    expected = {"requests": 2, "input": sum(u.prompt_tokens for u in spent),
                "output": sum(u.completion_tokens for u in spent)}
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    page.goto(console_gateway.url + "/console/usage?range=24h&group=tenant")
    row = page.locator('[data-testid="usage-totals"] tr[data-group="prod-app"]')
    assert {"requests": int(row.get_attribute("data-requests")), "input": int(row.get_attribute("data-input")),
            "output": int(row.get_attribute("data-output"))} == expected
    assert row.locator("td").nth(3).inner_text() == f"{expected['input'] + expected['output']:,}"
    chart = page.evaluate("Object.fromEntries(Chart.getChart('usage-chart').data.datasets"
                          ".map(d => [d.label, d.data.reduce((a, b) => a + b, 0)]))")
    assert chart["prod-app"] == expected["input"] + expected["output"]
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    rows = list(csv.DictReader(io.StringIO(open(download.value.path(), encoding="utf-8").read())))
    mine = [r for r in rows if r["tenant"] == "prod-app"]
    assert sum(int(r["input_tokens"]) for r in mine) == expected["input"]
    assert sum(int(r["output_tokens"]) for r in mine) == expected["output"]
    # By license: SmolLM2 is Apache-2.0; the seven-day view has the same figures in its one day.
    page.goto(console_gateway.url + "/console/usage?range=7d&group=license&tenant=prod-app")
    row = page.locator('[data-testid="usage-totals"] tr[data-group="apache-2.0"]')
    assert int(row.get_attribute("data-input")) == expected["input"]
    # The overview's license classes are the usage API's figures by license, summed by class.
    now = int(time.time())
    api = httpx.get(console_gateway.url + "/v1/organization/usage/completions", timeout=30,
                    headers={"authorization": f"Bearer {ADMIN_KEY}"},
                    params={"start_time": now // 3600 * 3600 - 23 * 3600, "bucket_width": "1h", "limit": 24,
                            "group_by": "license"}).json()
    commercial = sum(r["input_tokens"] + r["output_tokens"] for b in api["data"] for r in b["results"]
                     if r["license"] == "apache-2.0")
    page.goto(console_gateway.url + "/console/overview")
    tile = page.locator('.tile[data-class="Commercial"]')
    assert int(tile.get_attribute("data-tokens")) == commercial >= expected["input"] + expected["output"]
    # The tenant's own usage page shows its figures, and nobody else's.
    own = new_page(browser)
    sign_in(own, console_gateway.url, PROD_KEY)
    own.goto(console_gateway.url + "/console/usage?range=24h&group=tenant")
    groups = own.locator('[data-testid="usage-totals"] tbody tr').evaluate_all("rows => rows.map(r => r.dataset.group)")
    assert groups == ["prod-app"]
    assert int(own.locator('tr[data-group="prod-app"]').get_attribute("data-output")) == expected["output"]


def test_tenants_show_quota_used_and_left_and_the_overview_warns(browser, console_gateway: ConsoleGateway) -> None:
    spent = _spend(console_gateway, QUOTA_KEY, ["Count to three."])
    used = sum(u.total_tokens for u in spent)
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    page.goto(f"{console_gateway.url}/console/tenants?tenant={QUOTA_TENANT}")
    day = page.locator('[data-quota="tokens_per_day"]').inner_text()
    assert f"{used:,} of 1,000,000 tokens used" in day and f"{1_000_000 - used:,} left" in day
    page.goto(console_gateway.url + "/console/overview")
    assert QUOTA_TENANT not in page.locator("#quota + *").inner_text()
    # The same tenant with a daily quota it has nearly spent (a reload keeps the counts): a warning.
    console_gateway.write_tenants(console_tenants(quota_day=used + 1))
    try:
        assert httpx.post(console_gateway.url + "/admin/reload", timeout=30,
                          headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
        page.goto(console_gateway.url + "/console/overview")
        warning = page.locator(".warnings li", has_text=QUOTA_TENANT)
        assert "daily quota" in warning.inner_text() and f"{used:,} of {used + 1:,}" in warning.inner_text()
    finally:
        console_gateway.write_tenants(console_tenants())
        httpx.post(console_gateway.url + "/admin/reload", timeout=30, headers={"authorization": f"Bearer {ADMIN_KEY}"})


def test_a_tenant_key_sees_its_own_tenant_and_no_other(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    sign_in(page, console_gateway.url, PROD_KEY)
    for name in PAGES:
        page.goto(f"{console_gateway.url}/console/{name}")
        text = page.content()
        assert page.get_by_test_id("who").inner_text() == "prod-app"
        for other in ("prod-subst", "research-lab", "limited-dev", QUOTA_TENANT):
            assert other not in text, (name, other)
    for url in ("/console/policy?tenant=prod-subst", "/console/tenants?tenant=prod-subst",
                "/console/usage?tenant=prod-subst"):
        response = page.goto(console_gateway.url + url)
        assert response.status == 403, url
        assert "own" in page.get_by_test_id("error-message").inner_text()
    page.goto(console_gateway.url + "/console/tenants")
    assert page.locator("section.card[data-tenant]").evaluate_all("c => c.map(x => x.dataset.tenant)") == ["prod-app"]
    # Naming its own tenant is no trespass.
    response = page.goto(console_gateway.url + "/console/usage?tenant=prod-app")
    assert response.status == 200


def test_a_post_without_the_csrf_token_is_refused(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    page.evaluate("document.querySelector('form[action$=\"/sign-out\"] input[name=csrf_token]').remove()")
    with page.expect_response("**/console/sign-out") as answer:
        page.get_by_role("button", name="Sign out").click()
    assert answer.value.status == 403
    assert "CSRF" in page.get_by_test_id("error-message").inner_text()
    page.goto(console_gateway.url + "/console/overview")
    assert page.url.endswith("/console/overview")  # nothing happened: still signed in
    # A wrong token is no better than none.
    page.evaluate("document.querySelector('form[action$=\"/sign-out\"] input[name=csrf_token]').value = 'x'.repeat(64)")
    with page.expect_response("**/console/sign-out") as answer:
        page.get_by_role("button", name="Sign out").click()
    assert answer.value.status == 403
    # The sign-in form has its own token: without it, no session is made.
    fresh = new_page(browser)
    fresh.goto(console_gateway.url + "/console/sign-in")
    fresh.evaluate("document.querySelector('input[name=csrf_token]').remove()")
    fresh.get_by_label("API key").fill(ADMIN_KEY)
    with fresh.expect_response("**/console/sign-in") as answer:
        fresh.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 403
    assert not any(c["name"] == "gw_console_session" for c in fresh.context.cookies())


def test_signed_out_means_signed_out(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    old = [c for c in page.context.cookies() if c["name"] == "gw_console_session"]
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/sign-in?notice=signed-out")
    assert page.get_by_role("status").inner_text() == "You are signed out."
    page.goto(console_gateway.url + "/console/tenants")
    assert "/console/sign-in" in page.url
    # The old cookie, kept by someone, opens nothing: the session ended on the server.
    replay = new_page(browser)
    replay.context.add_cookies(old)
    replay.goto(console_gateway.url + "/console/tenants")
    assert "/console/sign-in?next=/console/tenants" in replay.url
    response = replay.request.post(console_gateway.url + "/console/sign-out", form={"csrf_token": "x"})
    assert response.status == 401


def test_a_wrong_key_is_refused_without_echoing_it(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    page.goto(console_gateway.url + "/console/sign-in")
    page.get_by_label("API key").fill("sk-not-a-key-0123456789")
    with page.expect_response("**/console/sign-in") as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    assert "not accepted" in page.get_by_test_id("error-message").inner_text()
    assert "sk-not-a-key" not in page.content()


def test_sign_in_goes_back_to_the_page_asked_for_and_nowhere_else(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    page.goto(console_gateway.url + "/console/models?family=falcon")
    page.get_by_label("API key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: url.endswith("/console/models?family=falcon"))
    other = new_page(browser)
    other.goto(console_gateway.url + "/console/sign-in?next=//evil.example/console/x")
    other.get_by_label("API key").fill(ADMIN_KEY)
    other.get_by_role("button", name="Sign in").click()
    other.wait_for_url(at("/console/overview"))


def test_model_search_updates_in_place(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    sign_in(page, console_gateway.url, ADMIN_KEY)
    page.goto(console_gateway.url + "/console/models")
    everything = page.locator("tr[data-model]").count()
    page.evaluate("window.__samePage = true")
    page.get_by_label("Search").press_sequentially("beluga")
    page.wait_for_function("n => document.querySelectorAll('tr[data-model]').length < n", arg=everything)
    ids = page.locator("tr[data-model]").evaluate_all("rows => rows.map(r => r.dataset.model)")
    assert ids and all("beluga" in i for i in ids)
    assert page.evaluate("window.__samePage === true")  # htmx swapped the results; no page load
    assert "q=beluga" in page.url  # ... and the address says what is shown
    page.get_by_label("Search").fill("")
    page.get_by_label("Commercial use").select_option("conditional")
    page.wait_for_function("() => { const rows = [...document.querySelectorAll('tr[data-model]')];"
                           " return rows.length > 0 && rows.every(r => r.querySelector('.use-conditional')); }")
    assert csp_violations(page) == [] and page.console_errors == []


def test_a_session_ends_with_its_key(browser, console_gateway: ConsoleGateway) -> None:
    page = new_page(browser)
    sign_in(page, console_gateway.url, SUBST_KEY)
    document = console_tenants()
    document["tenants"] = [t for t in document["tenants"] if t["name"] != "prod-subst"]
    console_gateway.write_tenants(document)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        assert httpx.post(console_gateway.url + "/admin/reload", headers=admin, timeout=30).status_code == 200
        page.goto(console_gateway.url + "/console/overview")
        assert "/console/sign-in" in page.url
    finally:
        console_gateway.write_tenants(console_tenants())
        httpx.post(console_gateway.url + "/admin/reload", headers=admin, timeout=30)
    page.goto(console_gateway.url + "/console/overview")
    assert "/console/sign-in" in page.url  # the key is back, the ended session is not
