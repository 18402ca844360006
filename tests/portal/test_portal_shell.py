"""The portal's shell: languages (cookie, Accept-Language, default Chinese), complete catalogs,
no asset from another site, local static files, and accessible page structure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po
from portal_helpers import PortalEnv, put, resident, sign_in

from cityhealth.portal import i18n

PORTAL = Path(i18n.__file__).parent
_URLS = re.compile(r"""(?:src|href|action|hx-get|hx-post)=["']([^"']*)["']""")


@pytest.mark.parametrize(
    ("cookie", "accept", "expected"),
    [
        (None, None, "zh_CN"),
        (None, "en-US,en;q=0.9", "en"),
        (None, "fr-FR, en;q=0.5, zh-CN;q=0.8", "zh_CN"),
        (None, "de, en-GB;q=0.3", "en"),
        (None, "zh-TW", "zh_CN"),
        (None, "fr, de", "zh_CN"),
        (None, "en;q=0, zh;q=0.1", "zh_CN"),
        (None, "en;q=bad", "zh_CN"),
        ("en", "zh-CN", "en"),
        ("zh_CN", "en", "zh_CN"),
        ("klingon", "en", "en"),
    ],
)
def test_the_language_comes_from_the_cookie_then_accept_language(
    cookie: str | None, accept: str | None, expected: str
) -> None:
    assert i18n.negotiate(cookie, accept) == expected


def _messages() -> set[str]:
    method_map = [("**.py", "python"), ("**/templates/**.html", "jinja2.ext:babel_extract")]
    options = {"**/templates/**.html": {"extensions": "jinja2.ext.i18n"}}
    keywords = {"_": None, "gettext": None, "ngettext": (1, 2), "N_": None}
    return {
        message
        for _file, _line, message, _comments, _context in extract_from_dir(
            str(PORTAL), method_map, options, keywords=keywords
        )
    }


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_every_message_of_the_code_and_templates_is_translated(locale: str) -> None:
    used = _messages()
    assert len(used) > 50
    with (PORTAL / "translations" / locale / "LC_MESSAGES" / "messages.po").open("rb") as po:
        catalog = read_po(po, locale=locale)
    translated = {m.id for m in catalog if m.id and m.string and not m.fuzzy}
    assert used - translated == set()
    assert translated - used == set(), "catalog entries no page uses any more"


def test_placeholders_survive_translation() -> None:
    with (PORTAL / "translations/zh_CN/LC_MESSAGES/messages.po").open("rb") as po:
        catalog = read_po(po, locale="zh_CN")
    for message in catalog:
        if message.id:
            wanted = sorted(re.findall(r"%\(\w+\)s", str(message.id)))
            assert sorted(re.findall(r"%\(\w+\)s", str(message.string))) == wanted, message.id


def test_pages_are_chinese_by_default_and_english_on_request(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    chinese = browser.get("/")
    assert '<html lang="zh-CN">' in chinese.text and "授权调阅" in chinese.text
    assert chinese.headers["content-language"] == "zh-CN"
    english = env.browser(**{"Accept-Language": "en-GB,en;q=0.8"})
    sign_in(english, person.username)
    page = english.get("/")
    assert '<html lang="en">' in page.text and "Record access consents" in page.text
    assert "授权调阅" not in page.text
    switched = browser.get("/lang?to=en&next=%2Fconsents")
    assert switched.status_code == 303 and switched.headers["location"] == "/consents"
    assert browser.cookies.get("lang") == "en"
    assert "Who accessed my record" in browser.get("/consents").text
    back = browser.get("/lang?to=zh_CN&next=https%3A%2F%2Fevil.example%2F")
    assert back.headers["location"] == "/"  # never to another site
    assert "谁看过我的档案" in browser.get("/").text


def test_the_language_switch_is_in_every_page_and_names_its_language(env: PortalEnv) -> None:
    browser = env.browser()
    page = browser.get("/signed-out")
    assert 'href="/lang?to=en&amp;next=%2Fsigned-out" lang="en" hreflang="en"' in page.text
    assert 'lang="zh-CN" hreflang="zh-CN" aria-current="true"' in page.text


def test_no_page_loads_anything_from_another_site(env: PortalEnv) -> None:
    put(env, {"resourceType": "Organization", "name": "中卫市中医医院"})
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    pages = [
        "/",
        "/consents",
        "/consents/new?q=中医",
        "/access-log",
        "/password",
        "/signed-out",
    ]
    seen_static = set()
    for path in pages:
        page = browser.get(path)
        assert page.status_code == 200, path
        assert "http://" not in page.text and "https://" not in page.text, path
        for url in _URLS.findall(page.text):
            local = url.startswith(("/", "#")) and not url.startswith("//")
            assert local or url == "data:,", (path, url)
            if url.startswith("/static/"):
                seen_static.add(url)
    assert "/static/portal/portal.css" in seen_static
    for url in seen_static:
        assert browser.get(url).status_code == 200, url
    # Without `install-assets` the pages do without htmx, and its URL is simply not found.
    assert "/static/vendor/htmx.min.js" not in seen_static
    assert browser.get("/static/vendor/htmx.min.js").status_code == 404


def test_forms_are_labelled(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    for path in ("/consents/new", "/password"):
        page = browser.get(path).text
        for input_id in re.findall(r'<(?:input|select)[^>]* id="([^"]+)"', page):
            assert f'for="{input_id}"' in page, (path, input_id)
        assert 'class="skip" href="#main"' in page and '<main id="main"' in page
