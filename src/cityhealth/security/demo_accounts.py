"""One account for every role, on a few fictional people of Zhongwei (中卫), for trying the
platform: `cityhealth users demo` creates them and prints their passwords once.

The people and institutions are written through the FHIR engine like any other record; the
passwords are random and meet the password policy. Running it again creates only what is
missing (an existing account keeps its password, which is not shown again).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import date
from typing import Any

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.engine import FhirEngine
from cityhealth.security.accounts import Accounts
from cityhealth.security.clients import CONFIDENTIAL

ID_SYSTEM = "https://fhir.cityhealth.example/sid/demo"
ORGANIZATION_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
ORGANIZATIONS = {
    "hospital": ("中卫市人民医院", "prov"),
    "pharmacy": ("中卫市康民大药房", "other"),
    "commission": ("中卫市卫生健康委员会", "govt"),
    "platform": ("中卫市互联网医疗服务平台", "other"),
}


@dataclass(frozen=True)
class Person:
    username: str
    role: str
    name: str  # family name first, as written in Chinese
    resource_type: str  # Patient or Practitioner
    organization: str | None = None  # a key of ORGANIZATIONS
    role_kind: str | None = None
    birth_date: str | None = None
    gender: str = "unknown"


PEOPLE = (
    Person("resident", "resident", "马晓燕", "Patient", birth_date="1986-03-12", gender="female"),
    Person("doctor", "doctor", "李建国", "Practitioner", "hospital", gender="male"),
    Person("nurse", "nurse", "王丽", "Practitioner", "hospital", gender="female"),
    Person("pharmacist", "pharmacist", "张敏", "Practitioner", "pharmacy", gender="female"),
    Person("hospital-admin", "institution_admin", "赵强", "Practitioner", "hospital"),
    Person(
        "regulator", "regulator", "周平", "Practitioner", "commission", "health_commission", None
    ),
    Person("platform-admin", "platform_admin", "陈刚", "Practitioner", "platform"),
    Person("security-admin", "security_admin", "孙伟", "Practitioner", "platform"),
    Person("audit-admin", "audit_admin", "吴芳", "Practitioner", "platform"),
)
#: The resident's son, under 14: she acts for him as his guardian.
CHILD = Person("", "resident", "马小宇", "Patient", birth_date="2018-09-01", gender="male")
HIS_CLIENT = "demo-his"


@dataclass(frozen=True)
class DemoAccount:
    username: str
    role: str
    fhir_user: str
    organization: str | None
    secret: str | None  # None when the account already existed


def new_password() -> str:
    """Random, 18 characters, all four character classes."""
    return f"Zw-{secrets.token_hex(7)}9"


def create_demo_accounts(engine: FhirEngine, accounts: Accounts) -> list[DemoAccount]:
    """Create what is missing of the demo people, their accounts and a hospital system client."""
    orgs = {key: _ensure(engine, _organization(key)) for key in ORGANIZATIONS}
    made: list[DemoAccount] = []
    for person in PEOPLE:
        organization = orgs[person.organization] if person.organization else None
        fhir_user = _ensure(engine, _person(person, organization))
        existing = accounts.account_by_username(person.username)
        secret = None
        if existing is None:
            secret = new_password()
            account = accounts.create_account(
                person.username,
                secret,
                role=person.role,
                display_name=person.name,
                fhir_user=fhir_user,
                organization=organization,
                role_kind=person.role_kind,
            )
            if person.role == "resident":
                child = _ensure(engine, _person(CHILD, None))
                accounts.link_guardian(account.id, child)
        made.append(DemoAccount(person.username, person.role, fhir_user, organization, secret))
    secret = None
    if accounts.client(HIS_CLIENT) is None:
        _client, secret = accounts.create_client(
            HIS_CLIENT,
            name="中卫市人民医院 HIS",
            kind=CONFIDENTIAL,
            scopes="system/*.*",
            role="system",
            organization=orgs["hospital"],
        )
    made.append(DemoAccount(HIS_CLIENT, "system", f"Device/{HIS_CLIENT}", orgs["hospital"], secret))
    return made


def _ensure(engine: FhirEngine, resource: dict[str, Any]) -> str:
    """`Type/id` of the resource with this demo identifier, created if absent."""
    rtype = resource["resourceType"]
    value = resource["identifier"][0]["value"]
    outcome = engine.create(SYSTEM, rtype, resource, f"identifier={ID_SYSTEM}|{value}")
    return f"{rtype}/{outcome.write.stored.id}"


def _identifier(value: str) -> list[dict[str, str]]:
    return [{"system": ID_SYSTEM, "value": value}]


def _organization(key: str) -> dict[str, Any]:
    name, kind = ORGANIZATIONS[key]
    return {
        "resourceType": "Organization",
        "identifier": _identifier(f"org-{key}"),
        "active": True,
        "type": [{"coding": [{"system": ORGANIZATION_TYPE, "code": kind}]}],
        "name": name,
        "address": [{"city": "中卫市", "state": "宁夏回族自治区", "country": "CN"}],
    }


def _person(person: Person, organization: str | None) -> dict[str, Any]:
    family, given = person.name[0], person.name[1:]
    resource: dict[str, Any] = {
        "resourceType": person.resource_type,
        "identifier": _identifier(f"{person.resource_type.lower()}-{person.name}"),
        "active": True,
        "name": [{"use": "official", "text": person.name, "family": family, "given": [given]}],
        "gender": person.gender,
    }
    if person.birth_date:
        resource["birthDate"] = date.fromisoformat(person.birth_date).isoformat()
    if person.resource_type == "Patient" and organization:
        resource["managingOrganization"] = {"reference": organization}
    return resource
