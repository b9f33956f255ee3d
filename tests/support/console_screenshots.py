"""Screenshots of every console page for docs/console/, taken from a real gateway with SmolLM2 on llama.cpp
after some real traffic (the test tenants of tests/conftest.py):

    PYTHONPATH=. .venv/bin/python tests/support/console_screenshots.py [--out docs/console]

The key and decision pages need the key and decision APIs (`/admin/keys`, `/admin/decisions`); where the
gateway has none, those two are skipped, with a line saying so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx
import openai

from tests.conftest import LOCAL_MODEL, smollm2_gguf
from tests.support.console import (ADMIN_KEY, CHROMIUM, CHROMIUM_FLAGS, PROD_KEY, QUOTA_KEY, SUBST_KEY,
                                   start_console_gateway)
from tests.support.processes import free_port, start_server

SHOTS = [  # file, key, path, width, full page
    ("sign-in", None, "/console/sign-in", 1280, False),
    ("overview", ADMIN_KEY, "/console/overview", 1280, True),
    ("models", ADMIN_KEY, "/console/models?commercial_use=conditional", 1280, False),
    ("policy-matrix", ADMIN_KEY, "/console/policy", 1280, False),
    ("policy-tenant", ADMIN_KEY, "/console/policy?tenant=prod-app", 1280, False),
    ("tenants", ADMIN_KEY, "/console/tenants", 1280, False),
    ("usage", ADMIN_KEY, "/console/usage?range=24h&group=tenant", 1280, True),
    ("keys", ADMIN_KEY, "/console/keys", 1280, False),
    ("decisions", ADMIN_KEY, "/console/decisions", 1280, False),
    ("policy-phone", PROD_KEY, "/console/policy", 390, False),
    ("usage-phone", PROD_KEY, "/console/usage?range=7d&group=model", 390, True),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/console"))
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="console-shots-"))
    port = free_port()
    llama = start_server("llama-cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
                                       "--model_alias", "smollm2-local", "--host", "127.0.0.1", "--port", str(port),
                                       "--n_threads", "2", "--n_ctx", "2048"], port, "/v1/models", work)
    llama.wait_ready(120)
    gateway = None
    try:
        gateway = start_console_gateway("console-shots", llama, work, work)
        for key, prompts in ((PROD_KEY, ["Say hi.", "Name a colour.", "Count to three."]),
                             (SUBST_KEY, ["What is 2+2?"]), (QUOTA_KEY, ["Name a fruit.", "Name a tree."])):
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=300)
            for text in prompts:
                client.chat.completions.create(model=LOCAL_MODEL, max_tokens=16,
                                               messages=[{"role": "user", "content": text}])
        try:  # a license refusal, for the decisions page
            openai.OpenAI(base_url=gateway.url + "/v1", api_key=PROD_KEY, max_retries=0).chat.completions.create(
                model="llama-7b", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        except openai.PermissionDeniedError:
            pass
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        has = {path: httpx.get(gateway.url + path, headers=admin).status_code != 404
               for path in ("/admin/keys", "/admin/decisions")}
        if has["/admin/keys"]:
            for tenant, name in (("prod-app", "billing-service"), ("prod-app", "support-bot"),
                                 ("prod-subst", "batch-jobs")):
                httpx.post(gateway.url + "/admin/keys", json={"tenant": tenant, "name": name}, headers=admin)
        _shoot(gateway.url, out, has)
    finally:
        if gateway is not None:
            gateway.server.stop()
        llama.stop()
    return 0


def _shoot(base: str, out: Path, has: dict[str, bool]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        pages: dict[tuple[str | None, int], object] = {}
        for name, key, path, width, full in SHOTS:
            api = {"keys": "/admin/keys", "decisions": "/admin/decisions"}.get(name)
            if api and not has[api]:
                print(f"{name}: skipped, this gateway has no {api}")
                continue
            page = pages.get((key, width))
            if page is None:
                page = pages[(key, width)] = browser.new_context(viewport={"width": width, "height": 900}).new_page()
                if key:
                    page.goto(base + "/console/sign-in")
                    page.get_by_label("API key").fill(key)
                    page.get_by_role("button", name="Sign in").click()
                    page.wait_for_load_state("networkidle")
            page.goto(base + path)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(out / f"{name}.png"), full_page=full)
            print(f"{name}: {out / f'{name}.png'}")
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
