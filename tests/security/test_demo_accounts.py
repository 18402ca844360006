"""`cityhealth users demo`: one working account per role, made once."""

from __future__ import annotations

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.engine import FhirEngine
from cityhealth.security.accounts import Accounts
from cityhealth.security.demo_accounts import HIS_CLIENT, create_demo_accounts
from cityhealth.security.roles import ROLES


def _count(engine: FhirEngine, rtype: str) -> int:
    query = engine.parse_search(rtype, [("_summary", "count")], False)
    total = engine.search(SYSTEM, query, None).total
    assert total is not None
    return total


def test_every_role_gets_an_account_that_signs_in(engine: FhirEngine) -> None:
    accounts = Accounts(engine.db)
    made = create_demo_accounts(engine, accounts)
    assert {m.role for m in made} == set(ROLES)
    for item in made:
        assert item.secret is not None
        if item.username == HIS_CLIENT:
            assert accounts.authenticate_client(HIS_CLIENT, item.secret) is not None
            continue
        result = accounts.authenticate(item.username, item.secret)
        assert result.ok, (item.username, result)
        account = accounts.account_by_username(item.username)
        assert account is not None and account.fhir_user == item.fhir_user
        assert engine.repository.read(SYSTEM, *item.fhir_user.split("/")).id
    resident = accounts.account_by_username("resident")
    assert resident is not None
    assert len(accounts.patients(resident.id)) == 2  # herself and her son, as his guardian

    people = {t: _count(engine, t) for t in ("Patient", "Practitioner", "Organization")}
    again = create_demo_accounts(engine, accounts)
    assert all(item.secret is None for item in again)  # nothing shown twice
    assert {t: _count(engine, t) for t in people} == people  # nothing created twice
