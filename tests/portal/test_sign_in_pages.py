"""The authorization endpoint's pages as portal pages: Chinese by default, English after the
language switch (which keeps the pending authorization request), every notice in both
languages, the security headers, and values escaped, on each database backend."""

from __future__ import annotations

import html
import re
import secrets
from datetime import timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from portal_helpers import (
    PASSWORD,
    PortalEnv,
    authorize,
    follow_callback,
    hidden_fields,
    resident,
    submit_login,
    unique,
)
from sqlalchemy import update

from cityhealth.portal import i18n
from cityhealth.security import oauth_pages as pages
from cityhealth.security.passwords import PasswordPolicy
from cityhealth.security.schema import account, to_us
from cityhealth.security.tokens import pkce_challenge

NEW_PASSWORD = "Shapotou#2027"
APP_REDIRECT = "https://app.example/callback"
_SWITCH = re.compile(r'<a href="(/lang\?to=([a-z_A-Z]+)&amp;next=[^"]*)"')
_URLS = re.compile(r"""(?:src|href|action)=["']([^"']*)["']""")


def switch_link(page: str, locale: str) -> str:
    """The language switch's link to `locale` on a page."""
    links = {code: html.unescape(href) for href, code in _SWITCH.findall(page)}
    return links[locale]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def expire_password(env: PortalEnv, account_id: str) -> None:
    old = to_us(env.clock() - timedelta(days=91))
    with env.accounts.db.write() as conn:
        conn.execute(
            update(account).where(account.c.id == account_id).values(password_changed_at=old)
        )


def login_form(browser: TestClient, next_path: str = "/") -> tuple[str, httpx.Response]:
    """The authorization URL the portal sends a browser to, and the form it shows."""
    target = authorize(browser, next_path)
    form = browser.get(target)
    assert form.status_code == 200, form.text
    return target, form


def app_request(env: PortalEnv, name: str, state: str) -> dict[str, str]:
    """A third-party application registered under `name`, and its authorization request."""
    client_id = unique("app")
    env.accounts.create_client(
        client_id,
        name=name,
        kind="public",
        redirect_uris=[APP_REDIRECT],
        scopes="patient/*.read launch/patient",
    )
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": APP_REDIRECT,
        "scope": "patient/*.read launch/patient",
        "state": state,
        "code_challenge": pkce_challenge(secrets.token_urlsafe(48)),
        "code_challenge_method": "S256",
    }


def test_the_sign_in_page_is_chinese_by_default_and_english_after_switching(
    env: PortalEnv,
) -> None:
    person = resident(env)
    browser = env.browser()
    target, chinese = login_form(browser, "/consents")
    assert '<html lang="zh-CN">' in chinese.text
    assert chinese.headers["content-language"] == "zh-CN"
    assert '<label for="username">用户名</label>' in chinese.text
    assert '<label for="password">密码</label>' in chinese.text
    assert "<h1>登录</h1>" in chinese.text
    assert "查看和检索本人健康档案中的全部数据" in chinese.text
    request = query_of(target)
    assert hidden_fields(chinese.text) == {
        **{name: values[0] for name, values in request.items()},
        "lang": "zh_CN",
    }

    switched = browser.get(switch_link(chinese.text, "en"))
    assert switched.status_code == 303 and browser.cookies.get("lang") == "en"
    back = switched.headers["location"]
    assert urlsplit(back).path == "/oauth/authorize"
    assert query_of(back) == request  # the pending request, state and challenge included
    english = browser.get(back)
    assert english.status_code == 200
    assert '<html lang="en">' in english.text
    assert english.headers["content-language"] == "en"
    assert '<label for="username">User name</label>' in english.text
    assert "<h1>Sign in</h1>" in english.text
    assert "read and search all data in your own health record" in english.text
    assert "登录" not in english.text and "用户名" not in english.text
    assert hidden_fields(english.text)["lang"] == "en"

    # Signing in from the English form finishes the very login the portal started.
    answer = submit_login(browser, english, person.username, password=PASSWORD)
    signed_in = follow_callback(browser, answer)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/consents"
    assert "Record access consents" in browser.get("/consents").text


def test_a_failed_login_says_one_generic_thing_in_the_language_of_its_form(
    env: PortalEnv,
) -> None:
    person = resident(env)
    english_browser = env.browser(**{"Accept-Language": "en-GB,en;q=0.9"})
    _, english = login_form(english_browser)
    assert hidden_fields(english.text)["lang"] == "en"
    wrong = submit_login(english_browser, english, person.username, password="Wrong-password-1")
    assert wrong.status_code == 200 and "location" not in wrong.headers
    assert "The user name or password is not correct." in wrong.text
    assert '<html lang="en">' in wrong.text and "用户名" not in wrong.text
    assert 'aria-describedby="error"' in wrong.text and 'id="error" role="alert"' in wrong.text
    unknown = submit_login(english_browser, english, unique("nobody"), password=PASSWORD)
    assert "The user name or password is not correct." in unknown.text

    browser = env.browser()
    _, chinese = login_form(browser)
    wrong = submit_login(browser, chinese, person.username, password="Wrong-password-1")
    assert "用户名或密码错误。" in wrong.text and '<html lang="zh-CN">' in wrong.text
    # The typed name comes back; the request still rides along; the switch keeps it.
    assert f'value="{person.username}"' in wrong.text
    request = hidden_fields(chinese.text)
    assert hidden_fields(wrong.text) == request
    back = query_of(switch_link(wrong.text, "en"))["next"][0]
    assert query_of(back) == {n: [v] for n, v in request.items() if n != "lang"}


def test_the_password_change_page_in_both_languages(env: PortalEnv) -> None:
    for locale, accept in (("zh_CN", "zh-CN"), ("en", "en")):
        person = resident(env)
        expire_password(env, person.id)
        browser = env.browser(**{"Accept-Language": accept})
        _, form = login_form(browser)
        asked = submit_login(browser, form, person.username, password=PASSWORD)
        assert asked.status_code == 200
        page = asked.text
        for input_id in re.findall(r'<input[^>]* id="([^"]+)"', page):
            assert f'<label for="{input_id}">' in page, input_id
        assert hidden_fields(page)["lang"] == locale
        differ = submit_login(
            browser,
            asked,
            person.username,
            password=PASSWORD,
            new_password=NEW_PASSWORD,
            new_password_confirm="Other-pass-2027",
        )
        weak = submit_login(
            browser,
            asked,
            person.username,
            password=PASSWORD,
            new_password="Ab1",
            new_password_confirm="Ab1",
        )
        if locale == "zh_CN":
            assert "<h1>修改密码</h1>" in page and "您的密码已过期" in page
            assert "密码至少 8 位" in page and "修改密码并登录" in page
            assert "两次输入的新密码不一致。" in differ.text
            assert "密码至少需要 8 个字符。" in weak.text
        else:
            assert "<h1>Change password</h1>" in page and "Your password has expired" in page
            assert "At least 8 characters" in page and "Change password and sign in" in page
            assert "The two new passwords are not the same." in differ.text
            assert "The password must have at least 8 characters." in weak.text
            assert "密码" not in page + differ.text + weak.text
        changed = submit_login(
            browser,
            asked,
            person.username,
            password=PASSWORD,
            new_password=NEW_PASSWORD,
            new_password_confirm=NEW_PASSWORD,
        )
        assert follow_callback(browser, changed).status_code == 303
        assert env.accounts.authenticate(person.username, NEW_PASSWORD).ok


def test_the_error_pages_in_both_languages(env: PortalEnv) -> None:
    unknown = {**app_request(env, "健康中卫", "st-1"), "client_id": "nobody"}
    path = f"/oauth/authorize?{urlencode(unknown)}"
    chinese = env.browser().get(path)
    assert chinese.status_code == 400 and "location" not in chinese.headers
    assert "无法处理授权请求" in chinese.text
    assert "未知或已停用的应用（client_id）。" in chinese.text
    english = env.browser(**{"Accept-Language": "en"}).get(path)
    assert english.status_code == 400
    assert "The authorization request cannot be processed" in english.text
    assert "The application (client_id) is unknown or disabled." in english.text
    assert "无法" not in english.text
    # The switch shows the same error in the other language.
    assert query_of(switch_link(chinese.text, "en"))["next"][0] == path

    elsewhere = {**app_request(env, "健康中卫", "st-2"), "redirect_uri": "https://evil.example/"}
    browser = env.browser()
    browser.cookies.set("lang", "en")
    wrong = browser.get(f"/oauth/authorize?{urlencode(elsewhere)}")
    assert wrong.status_code == 400 and "location" not in wrong.headers
    assert "The callback address (redirect_uri) is not the one registered" in wrong.text

    malformed = browser.post(
        "/oauth/authorize", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert malformed.status_code == 400
    assert "请求无效" in malformed.text  # a POST without its form: the default language
    for page in (chinese, english, wrong, malformed):
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-frame-options"] == "DENY"


def test_a_guardian_switches_language_while_choosing_the_patient(env: PortalEnv) -> None:
    person = resident(env)
    child = "Patient/" + unique("child")
    env.accounts.link_guardian(person.id, child)
    browser = env.browser()
    _, form = login_form(browser)
    chooser = submit_login(browser, form, person.username, password=PASSWORD)
    assert chooser.status_code == 200 and "<h1>选择居民</h1>" in chooser.text
    assert f"{child}（被监护人）" in chooser.text
    assert f"{person.fhir_user}（本人）" in chooser.text
    fields = hidden_fields(chooser.text)
    assert "login_session" in fields and "password" not in fields
    # The switch posts the signed-in step back: the same question, now in English.
    assert '<button type="submit" name="lang" value="en" lang="en">English</button>' in (
        chooser.text
    )
    switch = {name: value for name, value in fields.items() if name != "lang"}
    english = browser.post("/oauth/authorize", data={**switch, "lang": "en"})
    assert english.status_code == 200
    assert "<h1>Choose the resident</h1>" in english.text
    assert f"{child} (in your care)" in english.text
    assert "Please choose a resident." not in english.text  # no choice made yet: no error
    fields = hidden_fields(english.text)
    assert fields["lang"] == "en" and fields["login_session"] == switch["login_session"]
    stranger = browser.post("/oauth/authorize", data={**fields, "patient": "Patient/other"})
    assert "Please choose a resident." in stranger.text
    chosen = browser.post("/oauth/authorize", data={**fields, "patient": child})
    assert follow_callback(browser, chosen).status_code == 303


def test_a_hostile_client_name_and_state_are_escaped(env: PortalEnv) -> None:
    name = '<script>alert("name")</script> & "quotes"'
    state = '"><img src=x onerror=alert(1)>&amp;'
    request = app_request(env, name, state)
    for accept in ("zh-CN", "en"):
        page = env.browser(**{"Accept-Language": accept}).get(
            f"/oauth/authorize?{urlencode(request)}"
        )
        assert page.status_code == 200
        assert "<script" not in page.text and "<img" not in page.text
        assert "&lt;script&gt;alert(&#34;name&#34;)&lt;/script&gt; &amp; &#34;quotes&#34;" in (
            page.text
        )
        assert hidden_fields(page.text)["state"] == state
        assert hidden_fields(page.text)["client_id"] == request["client_id"]
        back = query_of(switch_link(page.text, "en"))["next"][0]
        assert query_of(back)["state"] == [state]


def test_the_pages_load_only_the_portals_own_assets(env: PortalEnv) -> None:
    browser = env.browser()
    _, form = login_form(browser)
    policy = form.headers["content-security-policy"]
    assert "'unsafe-inline'" not in policy and "script-src" not in policy
    assert "style-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert form.headers["x-frame-options"] == "DENY"
    assert form.headers["cache-control"] == "no-store"
    assert "<script" not in form.text and "<style" not in form.text and " style=" not in form.text
    urls = _URLS.findall(form.text)
    assert "/static/portal/portal.css" in urls
    for url in urls:
        local = url.startswith(("/", "#")) and not url.startswith("//")
        assert local or url == "data:,", url
    assert browser.get("/static/portal/portal.css").status_code == 200


def alert(page: str) -> str:
    """The text of a page's notice."""
    found = re.search(r'role="alert">(.*?)</(?:p|ul)>', page, re.S)
    assert found, page
    return " ".join(re.sub(r"<[^>]+>", " ", found[1]).split())


def worded(key: str, locale: str) -> list[str]:
    """The notice `key` as each page of the endpoint shows it in `locale`."""
    reasons = ("reason 1", "reason 2") if key == pages.PASSWORD_REJECTED else ()
    notice = pages.Notice(key, seconds=60, detail="scope is required", reasons=reasons)
    fields = {"client_id": "app", "state": "s"}
    i18n.use(locale)
    try:
        answers = [
            pages.error_page(notice, 400, "/oauth/authorize"),
            pages.login_page("App", ["openid"], fields, notice=notice),
            pages.password_page("App", ["openid"], fields, PasswordPolicy(), notice=notice),
            pages.choose_patient_page("App", fields, "t", [("Patient/a", "self")], notice=notice),
        ]
    finally:
        i18n.use(i18n.DEFAULT)
    return [alert(bytes(answer.body).decode()) for answer in answers]


@pytest.mark.parametrize("key", pages.NOTICES)
def test_every_notice_is_worded_in_both_languages(key: str) -> None:
    chinese, english = worded(key, i18n.ZH), worded(key, i18n.EN)
    assert all(chinese) and all(english)
    assert len(set(chinese)) == 1 and len(set(english)) == 1  # the same words on every page
    if key == pages.PASSWORD_REJECTED:  # its reasons come worded by the password policy
        assert chinese[0] == english[0] == "reason 1 reason 2"
    else:
        assert chinese[0] != english[0]
        assert re.search(r"[\u4e00-\u9fff]", chinese[0]), chinese[0]
        assert not re.search(r"[\u4e00-\u9fff]", english[0]), english[0]
