"""Sign-ins through the authorization endpoint leave their AuditEvent, refused ones too, with
the reason the person is not told."""

from __future__ import annotations

from typing import Any

import orjson
from portal_helpers import PortalEnv, authorize, resident, sign_in, submit_login, unique

from cityhealth.fhir.access import SYSTEM

LOGIN = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110122"}


def logins(env: PortalEnv, who: str) -> list[dict[str, Any]]:
    params = [("agent", who), ("_sort", "-date"), ("subtype", LOGIN["code"])]
    request = env.engine.parse_search("AuditEvent", params)
    return [orjson.loads(hit.body) for hit in env.engine.search(SYSTEM, request).matches]


def reason(event: dict[str, Any]) -> str:
    return str(event["entity"][0]["description"])


def test_a_sign_in_and_a_refused_one_are_recorded(env: PortalEnv) -> None:
    account = resident(env)
    browser = env.browser()
    form = browser.get(authorize(browser, "/"))
    refused = submit_login(browser, form, account.username, password="Wrong-password-1")
    assert refused.status_code == 200
    sign_in(env.browser(), account.username)
    ok, failed = logins(env, account.fhir_user)[:2]
    assert (ok["outcome"], reason(ok)) == ("0", "ok")
    assert (failed["outcome"], reason(failed)) == ("4", "bad_password")
    assert ok["subtype"] == [LOGIN]
    assert ok["agent"][0]["who"] == {"reference": account.fhir_user}


def test_a_sign_in_with_an_unknown_name_is_recorded_under_that_name(env: PortalEnv) -> None:
    name = unique("nobody")
    browser = env.browser()
    form = browser.get(authorize(browser, "/"))
    submit_login(browser, form, name, password="Whatever-2026")
    request = env.engine.parse_search("AuditEvent", [("subtype", LOGIN["code"]), ("outcome", "4")])
    events = [orjson.loads(hit.body) for hit in env.engine.search(SYSTEM, request).matches]
    mine = [e for e in events if e["agent"][0]["who"] == {"display": name}]
    assert len(mine) == 1 and reason(mine[0]) == "unknown_user"
