"""The consent pages (授权调阅): grant → listed → revoke → inactive, the stored Consent's shape,
validation without half-written data, guardians, and other residents' consents."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from portal_helpers import (
    PASSWORD,
    PortalEnv,
    authorize,
    consents_of,
    csrf,
    follow_callback,
    put,
    resident,
    sign_in,
    submit_login,
)

from cityhealth.portal.i18n import local_date
from cityhealth.security.consent_shape import (
    ACT_CODE,
    PARTICIPATION,
    SENSITIVE_LABELS,
    read_consent,
)


@pytest.fixture(scope="module")
def hospital(env: PortalEnv) -> str:
    return put(env, {"resourceType": "Organization", "name": "中卫市人民医院"})


@pytest.fixture(scope="module")
def doctor_record(env: PortalEnv) -> str:
    return put(env, {"resourceType": "Practitioner", "name": [{"family": "欧阳", "given": ["明"]}]})


def signed_in_resident(env: PortalEnv) -> tuple[TestClient, str]:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    return browser, person.fhir_user


def day(env: PortalEnv, days: int) -> str:
    return (local_date(env.clock()) + timedelta(days=days)).isoformat()


def grant(
    browser: TestClient, patient: str, recipient: str, end: str, **fields: Any
) -> httpx.Response:
    form = browser.get(f"/consents/new?for={patient}")
    data = {
        "csrf_token": csrf(form),
        "for": patient,
        "recipient": recipient,
        "scope": "all",
        "end": end,
        **fields,
    }
    return browser.post("/consents", data=data)


def test_the_grant_form_finds_organizations_and_doctors_by_name(
    env: PortalEnv, hospital: str, doctor_record: str
) -> None:
    browser, patient = signed_in_resident(env)
    page = browser.get(f"/consents/new?for={patient}&q=人民")
    assert page.status_code == 200
    assert f'value="{hospital}"' in page.text and "中卫市人民医院" in page.text
    doctors = browser.get(f"/consents/new?for={patient}&q=欧阳")
    assert f'value="{doctor_record}"' in doctors.text and "欧阳明" in doctors.text
    partial = browser.get(
        f"/consents/recipients?for={patient}&q=人民", headers={"HX-Request": "true"}
    )
    assert partial.status_code == 200 and "<html" not in partial.text
    assert f'value="{hospital}"' in partial.text
    plain = browser.get(f"/consents/recipients?for={patient}&q=人民")
    assert plain.status_code == 303 and plain.headers["location"].startswith("/consents/new?")
    nothing = browser.get(f"/consents/new?for={patient}&q=不存在的机构")
    assert "没有找到" in nothing.text


def test_grant_list_revoke(env: PortalEnv, hospital: str) -> None:
    browser, patient = signed_in_resident(env)
    empty = browser.get("/consents")
    assert "目前没有生效中的授权" in empty.text
    granted = grant(browser, patient, hospital, day(env, 30))
    assert granted.status_code == 303
    assert granted.headers["location"] == f"/consents?for={patient}&granted=1"
    listed = browser.get(granted.headers["location"])
    assert "授权成功" in listed.text
    in_force = listed.text.split("已撤销或已过期")[0]
    assert "中卫市人民医院" in in_force and "生效中" in in_force and "全部数据" in in_force
    (stored,) = consents_of(env, patient)
    assert stored["status"] == "active"
    revoked = browser.post(f"/consents/{stored['id']}/revoke", data={"csrf_token": csrf(listed)})
    assert revoked.status_code == 303
    (after,) = consents_of(env, patient)
    assert after["status"] == "inactive"
    assert after["meta"]["versionId"] == "2"
    page = browser.get(revoked.headers["location"])
    assert "授权已撤销" in page.text
    assert "中卫市人民医院" in page.text.split("已撤销或已过期")[1]
    assert "目前没有生效中的授权" in page.text


def test_the_stored_consent_has_the_documented_shape(env: PortalEnv, hospital: str) -> None:
    browser, patient = signed_in_resident(env)
    end = day(env, 365)
    answer = grant(
        browser,
        patient,
        hospital,
        end,
        scope="categories",
        category=["lab", "prescriptions"],
        sensitive=["HIV"],
    )
    assert answer.status_code == 303
    (consent,) = consents_of(env, patient)
    assert consent["scope"]["coding"][0]["code"] == "patient-privacy"
    assert consent["category"][0]["coding"][0]["code"] == "59284-0"
    assert consent["patient"] == {"reference": patient}
    assert consent["performer"] == [{"reference": patient}]
    provision = consent["provision"]
    assert provision["type"] == "permit"
    (actor,) = provision["actor"]
    assert actor["role"]["coding"] == [{"system": PARTICIPATION, "code": "IRCP"}]
    assert actor["reference"] == {"reference": hospital, "display": "中卫市人民医院"}
    classes = {c["code"] for c in provision["class"]}
    assert classes == {"Observation", "DiagnosticReport", "MedicationRequest", "MedicationDispense"}
    (deny,) = provision["provision"]
    assert deny["type"] == "deny"
    assert {label["code"] for label in deny["securityLabel"]} == SENSITIVE_LABELS - {"HIV"}
    assert all(label["system"] == ACT_CODE for label in deny["securityLabel"])
    # The last day runs to its end in Beijing time, stored in UTC.
    assert provision["period"]["end"] == f"{end}T15:59:59+00:00"
    terms = read_consent(consent)
    assert terms is not None
    assert terms.categories == {"lab", "prescriptions"} and terms.sensitive == {"HIV"}
    page = browser.get("/consents")
    assert "检验结果、处方" in page.text and "艾滋病" in page.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"recipient": ""}, "请选择被授权方"),
        ({"scope": "categories"}, "至少选择一个类别"),
        ({"scope": "categories", "category": ["lab", "genome"]}, "不在可选范围内"),
        ({"sensitive": ["XYZ"]}, "不在可选范围内"),
        ({"end": "today"}, "截止日期必须晚于今天"),
        ({"end": "2026-02-30"}, "日期格式不正确"),
        ({"end": "far"}, "授权期限最长为五年"),
        ({"recipient": "Organization/no-such-one"}, "未找到该机构或医生"),
        ({"recipient": "Patient/someone"}, "请选择被授权方"),
    ],
)
def test_an_invalid_form_is_shown_again_with_its_errors_and_nothing_is_written(
    env: PortalEnv, hospital: str, fields: dict[str, Any], message: str
) -> None:
    browser, patient = signed_in_resident(env)
    ends = {"today": day(env, 0), "far": day(env, 5 * 366)}
    values = {"recipient": hospital, "end": day(env, 30), **fields}
    values["end"] = ends.get(values["end"], values["end"])
    answer = grant(browser, patient, **values)
    assert answer.status_code == 422
    assert message in answer.text
    assert 'class="error-summary"' in answer.text
    assert consents_of(env, patient) == []


def test_errors_are_shown_in_english_when_chosen(env: PortalEnv, hospital: str) -> None:
    browser, patient = signed_in_resident(env)
    browser.cookies.set("lang", "en")
    answer = grant(browser, patient, hospital, day(env, 30), scope="categories")
    assert answer.status_code == 422
    assert "Choose all data, or at least one category." in answer.text
    assert '<html lang="en">' in answer.text


def test_a_guardian_grants_for_a_child_and_no_one_else(env: PortalEnv, hospital: str) -> None:
    parent = resident(env, "张", "伟")
    child = put(env, {"resourceType": "Patient", "name": [{"family": "张", "given": ["小明"]}]})
    env.accounts.link_guardian(parent.id, child)
    stranger = resident(env, "李", "娜").fhir_user
    browser = env.browser()
    login = browser.get(authorize(browser, "/consents"))
    asked = submit_login(browser, login, parent.username, password=PASSWORD)
    # The authorization server asks whom the portal acts for; the page lets them switch.
    assert asked.status_code == 200 and "选择居民" in asked.text
    chosen = submit_login(browser, asked, parent.username, patient=parent.fhir_user)
    assert follow_callback(browser, chosen).status_code == 303
    page = browser.get(f"/consents?for={child}")
    assert page.status_code == 200 and "张小明" in page.text
    answer = grant(browser, child, hospital, day(env, 10))
    assert answer.status_code == 303
    (consent,) = consents_of(env, child)
    assert consent["patient"] == {"reference": child}
    assert consent["performer"] == [{"reference": parent.fhir_user}]
    refused = grant(browser, stranger, hospital, day(env, 10))
    assert refused.status_code == 422 and "请选择授权的是谁的健康档案" in refused.text
    assert consents_of(env, stranger) == []
    assert browser.get(f"/consents?for={stranger}").status_code == 404


def test_another_resident_cannot_revoke_my_consent(env: PortalEnv, hospital: str) -> None:
    browser, patient = signed_in_resident(env)
    assert grant(browser, patient, hospital, day(env, 30)).status_code == 303
    (consent,) = consents_of(env, patient)
    other, _ = signed_in_resident(env)
    page = other.get("/consents")
    answer = other.post(f"/consents/{consent['id']}/revoke", data={"csrf_token": csrf(page)})
    assert answer.status_code == 404
    assert consents_of(env, patient)[0]["status"] == "active"
    assert "中卫市人民医院" not in page.text


def test_revoke_buttons_name_what_they_revoke(env: PortalEnv, hospital: str) -> None:
    browser, patient = signed_in_resident(env)
    grant(browser, patient, hospital, day(env, 30))
    page = browser.get("/consents").text
    assert re.search(r"撤销授权<span class=\"visually-hidden\"> 中卫市人民医院</span>", page)
