"""The portal in a real browser: Debian's Chromium, headless, driven by Playwright, against the
real server on a free local port. A resident signs in, grants a consent, revokes it and opens
the access log, all in Chinese; and a browser without JavaScript still grants a consent.
Skipped only where Chromium is absent outside CI."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import uvicorn
from portal_helpers import PASSWORD, PortalEnv, build_env, put, resident

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.definitions import Definitions
from cityhealth.migrate import upgrade
from cityhealth.portal.assets import AssetError, install_assets
from cityhealth.portal.i18n import local_date

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI") == "true"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not IN_CI, reason="/usr/bin/chromium is not installed"
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served(
    definitions: Definitions, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, PortalEnv]]:
    tmp = tmp_path_factory.mktemp("browser")
    url = f"sqlite:///{tmp / 'cityhealth.db'}"
    upgrade(url)
    db = Database(url, pool_size=4)
    try:
        install_assets(Settings(var_dir=tmp / "var"))
    except AssetError:
        if IN_CI:  # CI installs htmx (make install); pages must also work without it
            raise
    port = _free_port()
    env = build_env(db, definitions, tmp, public_url=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(
        uvicorn.Config(env.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", env
    server.should_exit = True
    thread.join(10)
    db.dispose()


def test_a_resident_grants_and_revokes_a_consent_and_sees_the_access_log(
    served: tuple[str, PortalEnv], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, env = served
    hospital = put(env, {"resourceType": "Organization", "name": "中卫市人民医院"})
    person = resident(env, "马", "丽")
    env.engine.create(
        SYSTEM,
        "AuditEvent",
        {
            "resourceType": "AuditEvent",
            "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
            "action": "R",
            "recorded": "2026-11-30T02:00:00+00:00",
            "outcome": "0",
            "agent": [
                {"who": {"reference": "Practitioner/d1", "display": "王建国"}, "requestor": True},
                {"who": {"reference": hospital, "display": "中卫市人民医院"}, "requestor": False},
            ],
            "source": {"observer": {"reference": "Device/platform"}},
            "entity": [{"what": {"reference": person.fhir_user}}],
        },
    )
    last_day = (local_date(env.clock()) + timedelta(days=90)).isoformat()
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=ARGS
        )
        page = browser.new_page(locale="zh-CN")
        page.set_default_timeout(20_000)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))

        page.goto(f"{base}/")
        expect(page.locator("h1")).to_have_text("登录")
        page.fill("#username", person.username)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        expect(page.locator(".topbar .name")).to_have_text("马丽")
        expect(page.locator(".topbar .role")).to_have_text("居民")
        assert page.evaluate("document.documentElement.lang") == "zh-CN"
        htmx = page.evaluate("typeof window.htmx") == "object"
        assert htmx or not IN_CI

        page.click("nav.menu >> text=授权调阅")
        expect(page.locator("h1")).to_have_text("授权调阅")
        expect(page.locator("main")).to_contain_text("目前没有生效中的授权")
        page.click("text=新增授权")
        expect(page.locator("h1")).to_have_text("新增授权")
        page.fill("#q", "人民")
        if not htmx:
            page.click("form[role=search] button")
        # With htmx the results arrive as the name is typed, without leaving the page.
        page.check("label.choice:has-text('中卫市人民医院') input")
        page.check("input[name=scope][value=categories]")
        page.check("label.choice:has-text('检验结果') input")
        page.fill("#end", last_day)
        page.click("text=确认授权")
        expect(page.locator("main")).to_contain_text("授权成功")
        in_force = page.locator("ul.cards").first
        expect(in_force).to_contain_text("中卫市人民医院")
        expect(in_force).to_contain_text("检验结果")
        page.screenshot(path=str(tmp_path / "consents.png"), full_page=True)

        page.click("button:has-text('撤销授权')")
        expect(page.locator("main")).to_contain_text("授权已撤销，立即失效。")
        expect(page.locator("main")).to_contain_text("目前没有生效中的授权")
        expect(page.locator("main")).to_contain_text("已撤销")

        page.click("nav.menu >> text=谁看过我的档案")
        expect(page.locator("h1")).to_have_text("谁看过我的档案")
        line = page.locator("ol.log li").first
        expect(line).to_contain_text("王建国")
        expect(line).to_contain_text("中卫市人民医院")
        expect(line).to_contain_text("2026年11月30日 10:00:00")

        page.click("text=退出登录")
        expect(page.locator("main")).to_contain_text("您已安全退出登录")
        browser.close()
    consents = env.engine.search(
        SYSTEM, env.engine.parse_search("Consent", [("patient", person.fhir_user)])
    ).matches
    assert len(consents) == 1 and '"status":"inactive"' in consents[0].body
    assert problems == []


def test_the_pages_work_without_javascript(served: tuple[str, PortalEnv]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, env = served
    put(env, {"resourceType": "Organization", "name": "中宁县人民医院"})
    person = resident(env, "杨", "帆")
    last_day = (local_date(env.clock()) + timedelta(days=30)).isoformat()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=ARGS
        )
        page = browser.new_page(locale="zh-CN", java_script_enabled=False)
        page.set_default_timeout(20_000)
        page.goto(f"{base}/consents/new")
        page.fill("#username", person.username)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        expect(page.locator("h1")).to_have_text("新增授权")
        page.fill("#q", "中宁")
        page.click("form[role=search] button")  # the search reloads the form with its results
        page.check("label.choice:has-text('中宁县人民医院') input")
        page.fill("#end", last_day)
        page.click("text=确认授权")
        expect(page.locator("main")).to_contain_text("授权成功")
        expect(page.locator("ul.cards").first).to_contain_text("中宁县人民医院")
        browser.close()


def test_the_sign_in_page_switches_language_and_keeps_the_login(
    served: tuple[str, PortalEnv], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, env = served
    person = resident(env, "周", "宁")
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=ARGS
        )
        # A phone without JavaScript: the switch and the form are plain links and posts.
        page = browser.new_page(
            locale="zh-CN", java_script_enabled=False, viewport={"width": 390, "height": 844}
        )
        page.set_default_timeout(20_000)
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.goto(f"{base}/access-log")
        expect(page.locator("h1")).to_have_text("登录")
        expect(page.locator("label[for=username]")).to_have_text("用户名")
        page.screenshot(path=str(tmp_path / "sign-in-zh.png"), full_page=True)
        page.click("nav.languages >> text=English")
        expect(page.locator("h1")).to_have_text("Sign in")
        assert page.evaluate("document.documentElement.lang") == "en"
        assert page.url.startswith(f"{base}/oauth/authorize?")
        page.screenshot(path=str(tmp_path / "sign-in-en.png"), full_page=True)
        page.fill("#username", person.username)
        page.fill("#password", "Wrong-password-1")
        page.click("main button[type=submit]")
        expect(page.locator("#error")).to_have_text("The user name or password is not correct.")
        page.fill("#password", PASSWORD)
        page.click("main button[type=submit]")
        expect(page.locator("h1")).to_have_text("Who accessed my record")
        browser.close()
    assert problems == []
