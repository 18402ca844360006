"""Signing in to the portal through the platform's OAuth server, sessions, CSRF, idle expiry,
logout and password changes, on each database backend."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from portal_helpers import (
    PASSWORD,
    PortalEnv,
    authorize,
    csrf,
    follow_callback,
    resident,
    sign_in,
    submit_login,
)
from sqlalchemy import update

from cityhealth.security.grants import GrantError
from cityhealth.security.schema import account, to_us

NEW_PASSWORD = "Shapotou#2027"


def test_a_page_without_a_session_sends_the_browser_to_login(env: PortalEnv) -> None:
    browser = env.browser()
    answer = browser.get("/consents?for=Patient/x")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=%2Fconsents%3Ffor%3DPatient%2Fx"
    partial = browser.get("/consents/recipients?q=a", headers={"HX-Request": "true"})
    assert partial.status_code == 401
    assert partial.headers["HX-Redirect"].startswith("/login?next=")


def test_login_is_authorization_code_with_pkce_for_the_portal_client(env: PortalEnv) -> None:
    browser = env.browser()
    target = urlsplit(authorize(browser, "/consents"))
    params = {name: values[0] for name, values in parse_qs(target.query).items()}
    assert params["client_id"] == "portal"
    assert params["redirect_uri"] == "http://testserver/portal/callback"
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43 and len(params["state"]) >= 32
    cookie = next(c for c in browser.cookies.jar if c.name == "portal_login")
    assert cookie.path == "/portal/callback"
    assert cookie.has_nonstandard_attr("HttpOnly")
    client = env.accounts.client("portal")
    assert client is not None and client.kind == "public"
    assert client.redirect_uris == ("http://testserver/portal/callback",)


def test_a_resident_signs_in_and_sees_their_name_and_role(env: PortalEnv) -> None:
    person = resident(env, "马", "丽")
    browser = env.browser()
    sign_in(browser, person.username, next_path="/consents")
    session = next(c for c in browser.cookies.jar if c.name == "portal_session")
    assert session.path == "/" and session.has_nonstandard_attr("HttpOnly")
    assert not session.secure  # the public URL is http here
    page = browser.get("/consents")
    assert page.status_code == 200
    assert '<html lang="zh-CN">' in page.text
    assert "马丽" in page.text and "居民" in page.text and "退出登录" in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_the_session_cookie_is_secure_on_https(env: PortalEnv) -> None:
    from cityhealth.portal.session import PortalSessions

    sessions = PortalSessions(env.security, "https://health.zhongwei.example", env.settings.var_dir)
    assert sessions.secure and sessions.cookie == "__Host-portal"
    assert sessions.redirect_uri == "https://health.zhongwei.example/portal/callback"


def test_a_callback_without_its_login_cookie_or_with_another_state_is_refused(
    env: PortalEnv,
) -> None:
    person = resident(env)
    browser = env.browser()
    form = browser.get(authorize(browser, "/"))
    answer = submit_login(browser, form, person.username, password=PASSWORD)
    location = urlsplit(answer.headers["location"])
    stranger = env.browser()  # the code arrives in a browser that did not start the login
    refused = stranger.get(f"{location.path}?{location.query}")
    assert refused.status_code == 400
    assert "请重新登录" in refused.text
    assert "portal_session" not in stranger.cookies
    tampered = location.query.replace("state=", "state=x")
    assert browser.get(f"{location.path}?{tampered}").status_code == 400
    assert browser.get(f"{location.path}?code=c&state=登录").status_code == 400
    assert "portal_session" not in browser.cookies


def test_a_used_code_does_not_sign_in_twice(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    form = browser.get(authorize(browser, "/"))
    answer = submit_login(browser, form, person.username, password=PASSWORD)
    login_cookie = browser.cookies.get("portal_login")
    assert login_cookie
    assert follow_callback(browser, answer).status_code == 303
    again = env.browser()  # the same login cookie and code, replayed
    again.cookies.set("portal_login", login_cookie)
    location = urlsplit(answer.headers["location"])
    assert again.get(f"{location.path}?{location.query}").status_code == 400


def test_sessions_end_after_the_idle_time_but_not_while_in_use(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    for _ in range(3):  # each request restarts the idle time
        env.clock.advance(minutes=25)
        assert browser.get("/").status_code == 200
    env.clock.advance(minutes=31)
    ended = browser.get("/")
    assert ended.status_code == 303 and ended.headers["location"].startswith("/login")


def test_logout_needs_its_csrf_token_and_revokes_the_session(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    home = browser.get("/")
    token = browser.cookies.get("portal_session")
    assert token
    for forged_token in ("forged", "令牌"):
        forged = browser.post("/logout", data={"csrf_token": forged_token})
        assert forged.status_code == 403
    assert browser.get("/").status_code == 200  # still signed in
    out = browser.post("/logout", data={"csrf_token": csrf(home)})
    assert out.status_code == 303 and out.headers["location"] == "/signed-out"
    assert "portal_session" not in browser.cookies
    assert "已安全退出登录" in browser.get("/signed-out").text
    with pytest.raises(GrantError):
        env.portal.sessions.grants.refresh_grant(token, client_id="portal")
    browser.cookies.set("portal_session", token)  # a copy of the old cookie is worthless
    assert browser.get("/").status_code == 303


def test_a_post_without_the_csrf_token_changes_nothing(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    refused = browser.post(
        "/password",
        data={
            "current_password": PASSWORD,
            "new_password": NEW_PASSWORD,
            "new_password_confirm": NEW_PASSWORD,
        },
    )
    assert refused.status_code == 403
    assert "表单已失效" in refused.text
    assert env.accounts.authenticate(person.username, PASSWORD).ok


def test_password_change_shows_policy_violations_in_the_viewers_language(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    form = browser.get("/password")
    assert "至少 8 位" in form.text
    token = csrf(form)

    def change(current: str, new: str, confirm: str | None = None) -> str:
        data = {
            "csrf_token": token,
            "current_password": current,
            "new_password": new,
            "new_password_confirm": new if confirm is None else confirm,
        }
        answer = browser.post("/password", data=data)
        assert answer.status_code == 422
        return answer.text

    assert "密码至少需要 8 个字符" in change(PASSWORD, "Ab1")
    assert "两次输入的新密码不一致" in change(PASSWORD, NEW_PASSWORD, "other")
    assert "当前密码不正确" in change("wrong-Password-1", NEW_PASSWORD)
    browser.cookies.set("lang", "en")
    assert "at least 8 characters" in change(PASSWORD, "Ab1")
    browser.cookies.set("lang", "zh_CN")
    done = browser.post(
        "/password",
        data={
            "csrf_token": token,
            "current_password": PASSWORD,
            "new_password": NEW_PASSWORD,
            "new_password_confirm": NEW_PASSWORD,
        },
    )
    assert done.status_code == 303 and done.headers["location"] == "/password?changed=1"
    assert "密码修改成功" in browser.get("/password?changed=1").text
    assert env.accounts.authenticate(person.username, NEW_PASSWORD).ok


def test_an_expired_password_must_be_changed_before_anything_else(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    old = to_us(env.clock() - timedelta(days=91))
    with env.accounts.db.write() as conn:
        conn.execute(
            update(account).where(account.c.id == person.id).values(password_changed_at=old)
        )
    sent = browser.get("/consents")
    assert sent.status_code == 303 and sent.headers["location"] == "/password"
    form = browser.get("/password")
    assert "您的密码已过期" in form.text
    done = browser.post(
        "/password",
        data={
            "csrf_token": csrf(form),
            "current_password": PASSWORD,
            "new_password": NEW_PASSWORD,
            "new_password_confirm": NEW_PASSWORD,
        },
    )
    assert done.status_code == 303
    assert browser.get("/consents").status_code == 200


def test_an_expired_password_is_changed_while_signing_in(env: PortalEnv) -> None:
    person = resident(env)
    old = to_us(env.clock() - timedelta(days=91))
    with env.accounts.db.write() as conn:
        conn.execute(
            update(account).where(account.c.id == person.id).values(password_changed_at=old)
        )
    browser = env.browser()
    form = browser.get(authorize(browser, "/"))
    asked = submit_login(browser, form, person.username, password=PASSWORD)
    assert asked.status_code == 200 and "密码已过期" in asked.text
    changed = submit_login(
        browser,
        asked,
        person.username,
        password=PASSWORD,
        new_password=NEW_PASSWORD,
        new_password_confirm=NEW_PASSWORD,
    )
    assert follow_callback(browser, changed).status_code == 303
    assert browser.get("/").status_code == 200


def test_a_staff_member_gets_the_shell_but_not_the_residents_pages(env: PortalEnv) -> None:
    from portal_helpers import doctor, put

    hospital = put(env, {"resourceType": "Organization", "name": "中卫市人民医院"})
    person = doctor(env, hospital)
    browser = env.browser()
    sign_in(browser, person.username)
    home = browser.get("/")
    assert home.status_code == 200 and "医生" in home.text
    assert "/consents" not in home.text
    refused = browser.get("/consents")
    assert refused.status_code == 403 and "仅供居民使用" in refused.text
