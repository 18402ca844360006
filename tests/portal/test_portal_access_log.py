"""The page "who accessed my record" (谁看过我的档案): AuditEvents about the resident, newest
first, paged, in Beijing time; nothing about anyone else; an empty state before any access."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from portal_helpers import PortalEnv, put, resident, sign_in

from cityhealth.fhir.access import SYSTEM
from cityhealth.portal.access_log import PAGE_SIZE, access_line

TERMINOLOGY = "http://terminology.hl7.org/CodeSystem"
T0 = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)  # 10:00 in Beijing


def audit_event(
    patient: str,
    recorded: datetime,
    *,
    who: str = "王建国",
    organization: str = "中卫市人民医院",
    outcome: str = "0",
    purpose: str = "TREAT",
) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "type": {
            "system": f"{TERMINOLOGY}/audit-event-type",
            "code": "rest",
        },
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
        "action": "R",
        "recorded": recorded.isoformat(),
        "outcome": outcome,
        "purposeOfEvent": [
            {
                "coding": [
                    {
                        "system": f"{TERMINOLOGY}/v3-ActReason",
                        "code": purpose,
                    }
                ]
            }
        ],
        "agent": [
            {
                "role": [{"coding": [{"system": "urn:cityhealth:role", "code": "doctor"}]}],
                "who": {"reference": "Practitioner/d1", "display": who},
                "requestor": True,
            },
            {
                "who": {"reference": "Organization/h1", "display": organization},
                "requestor": False,
            },
        ],
        "source": {"observer": {"reference": "Device/platform"}},
        "entity": [{"what": {"reference": patient, "display": "健康档案"}}],
    }


def test_the_empty_state_says_no_one_has_looked(env: PortalEnv) -> None:
    person = resident(env)
    browser = env.browser()
    sign_in(browser, person.username)
    page = browser.get("/access-log")
    assert page.status_code == 200
    assert "谁看过我的档案" in page.text and "暂无调阅记录" in page.text


def test_accesses_are_listed_newest_first_a_page_at_a_time(env: PortalEnv) -> None:
    person = resident(env)
    other = resident(env)
    for minutes in range(PAGE_SIZE + 5):
        event = audit_event(person.fhir_user, T0 + timedelta(minutes=minutes))
        env.engine.create(SYSTEM, "AuditEvent", event)
    denied = audit_event(
        person.fhir_user, T0 + timedelta(hours=2), who="赵护士", outcome="8", purpose="ETREAT"
    )
    env.engine.create(SYSTEM, "AuditEvent", denied)
    env.engine.create(SYSTEM, "AuditEvent", audit_event(other.fhir_user, T0, who="不相干的人"))
    put(env, {"resourceType": "Organization", "name": "无关机构"})
    browser = env.browser()
    sign_in(browser, person.username)
    first = browser.get("/access-log")
    assert first.status_code == 200
    times = re.findall(r'<time datetime="([^"]+)"', first.text)
    assert len(times) == PAGE_SIZE
    assert times == sorted(times, reverse=True)
    newest = first.text.split('<li class="card">')[1]
    # 04:00 UTC is 12:00 in Beijing.
    assert "2026年11月30日 12:00:00" in newest
    assert "赵护士" in newest and "急诊救治" in newest and "失败或被拒绝" in newest
    second_line = first.text.split('<li class="card">')[2]
    assert "王建国" in second_line and "医生" in second_line and "中卫市人民医院" in second_line
    assert "查看了" in second_line and "诊疗" in second_line and "成功" in second_line
    assert "不相干的人" not in first.text
    older = re.search(r'href="(/access-log\?[^"]+)" rel="next"', first.text)
    assert older is not None
    second = browser.get(older.group(1).replace("&amp;", "&"))
    assert second.status_code == 200
    rest = re.findall(r'<time datetime="([^"]+)"', second.text)
    assert len(rest) == 6 and rest[0] < times[-1]
    assert "2026年11月30日 10:00:00" in second.text  # the oldest, at T0


def test_a_damaged_page_link_starts_again_from_the_newest(env: PortalEnv) -> None:
    person = resident(env)
    env.engine.create(SYSTEM, "AuditEvent", audit_event(person.fhir_user, T0))
    browser = env.browser()
    sign_in(browser, person.username)
    page = browser.get("/access-log?page=not-a-cursor")
    assert page.status_code == 200 and "王建国" in page.text


def test_lines_are_read_leniently_from_other_shapes() -> None:
    line = access_line(
        {
            "resourceType": "AuditEvent",
            "recorded": "2026-12-01T00:00:00Z",
            "action": "E",
            "agent": [
                {
                    "name": "系统管理员",
                    "requestor": False,
                    "type": {"text": "运维"},
                    "purposeOfUse": [{"text": "系统维护"}],
                }
            ],
            "source": {"observer": {"reference": "Organization/cdc", "display": "市疾控中心"}},
            "entity": [{"what": {"reference": "Observation/1"}}],
            "outcome": "4",
        }
    )
    assert line.who == "系统管理员" and line.role == "运维"
    assert line.organization == "市疾控中心" and line.purpose == "系统维护"
    assert line.what == "检查检验结果" and not line.succeeded
    assert line.when == datetime(2026, 12, 1, tzinfo=UTC)
