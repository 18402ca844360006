"""The roles of CityHealth, defined once: names, the resource a person of the role stands for,
the organization rule, the most SMART scopes the role may be granted, and its duties.

The administrators follow 等保 level 3's separation of duties (三员分立): the platform
(system) administrator runs the platform, the security administrator manages accounts and roles
but cannot read the audit trail, the audit administrator reads the audit trail but manages
nothing; neither of the last two may see clinical data.

A token's scopes are what the client asked for, cut down to the role's maximum and then to the
client's allowed scopes (`limit_scopes`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cityhealth.security.scopes import Scope, parse_scope, parse_scopes

# Duties outside the clinical data, checked by the administration pages and commands.
RUN_PLATFORM = "run-platform"
MANAGE_ACCOUNTS = "manage-accounts"
READ_AUDIT = "read-audit"
MANAGE_INSTITUTION = "manage-institution"

# Whether a role's accounts act for an organization.
REQUIRED, OPTIONAL, NONE = "required", "optional", "none"

_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")  # a FHIR type and id


@dataclass(frozen=True)
class Kind:
    """A subdivision of a role, e.g. which regulator a regulator works for."""

    code: str
    name_zh: str
    name_en: str


@dataclass(frozen=True)
class Role:
    code: str
    name_zh: str
    name_en: str
    resource_type: str  # Patient, Practitioner; Device for system clients
    organization: str  # REQUIRED, OPTIONAL or NONE
    max_scopes: tuple[str, ...]
    kinds: tuple[Kind, ...] = ()  # when not empty, every account of the role names one
    duties: frozenset[str] = frozenset()

    def kind(self, code: str) -> Kind | None:
        return next((kind for kind in self.kinds if kind.code == code), None)

    @property
    def for_clients(self) -> bool:
        """Held by OAuth clients acting on their own, never by a person's account."""
        return self.resource_type == "Device"


_ROLES = (
    Role(
        "resident",
        "居民",
        "Resident",
        "Patient",
        NONE,
        (
            "patient/*.read",
            "patient/Consent.write",
            "launch/patient",
            "online_access",
            "offline_access",
        ),
    ),
    # Staff get no offline_access: their refresh tokens end with their session's idle limit.
    Role(
        "doctor",
        "医生",
        "Doctor",
        "Practitioner",
        REQUIRED,
        ("user/*.read", "user/*.write", "online_access"),
    ),
    Role(
        "nurse",
        "护士",
        "Nurse",
        "Practitioner",
        REQUIRED,
        ("user/*.read", "user/*.write", "online_access"),
    ),
    Role(
        "pharmacist",
        "药师",
        "Pharmacist",
        "Practitioner",
        REQUIRED,
        (
            "user/*.read",
            "user/MedicationRequest.u",
            "user/MedicationDispense.cu",
            "user/Task.u",
            "user/Communication.c",
            "online_access",
        ),
    ),
    Role(
        "institution_admin",
        "机构管理员",
        "Institution administrator",
        "Practitioner",
        REQUIRED,
        (
            "user/*.read",
            "user/Organization.write",
            "user/Location.write",
            "user/Practitioner.write",
            "user/PractitionerRole.write",
            "user/HealthcareService.write",
            "user/Schedule.write",
            "user/Slot.write",
            "user/Endpoint.write",
            "online_access",
        ),
        duties=frozenset({MANAGE_INSTITUTION}),
    ),
    Role(
        "regulator",
        "监管人员",
        "Regulator",
        "Practitioner",
        REQUIRED,
        ("user/*.read", "online_access"),
        kinds=(
            Kind("health_commission", "卫生健康委员会", "Health commission"),
            Kind("insurance_bureau", "医疗保障局", "Medical insurance bureau"),
            Kind("cdc", "疾病预防控制中心", "Center for disease control"),
        ),
    ),
    Role(
        "platform_admin",
        "系统管理员",
        "Platform administrator",
        "Practitioner",
        OPTIONAL,
        ("user/*.*", "online_access"),
        duties=frozenset({RUN_PLATFORM}),
    ),
    Role(
        "security_admin",
        "安全管理员",
        "Security administrator",
        "Practitioner",
        OPTIONAL,
        ("online_access",),
        duties=frozenset({MANAGE_ACCOUNTS}),
    ),
    Role(
        "audit_admin",
        "审计管理员",
        "Audit administrator",
        "Practitioner",
        OPTIONAL,
        ("user/AuditEvent.rs", "online_access"),
        duties=frozenset({READ_AUDIT}),
    ),
    Role("system", "接入系统", "System client", "Device", OPTIONAL, ("system/*.*",)),
)

ROLES: Mapping[str, Role] = MappingProxyType({role.code: role for role in _ROLES})


def limit_scopes(requested: Iterable[str], maximum: Iterable[str]) -> tuple[str, ...]:
    """The part of `requested` that `maximum` covers, as scope strings.

    Resource scopes intersect by context, resource type (`*` covers every type) and
    interactions: `patient/*.*` within `patient/*.read patient/Consent.write` gives
    `patient/*.read patient/Consent.write`. A result keeps the v1 form (`read`, `write`, `*`)
    when it was asked for in that form and its interactions have one; otherwise v2 letters.
    Other scopes (`launch/patient`, `offline_access` …) pass only if `maximum` names them.
    Both sides must parse (`ValueError` otherwise).
    """
    texts = _texts(requested)
    wanted = parse_scopes(texts)
    limit = parse_scopes(_texts(maximum))
    granted: dict[tuple[str, str], set[str]] = {}
    v1: set[tuple[str, str]] = set()
    for text in texts:
        if text in wanted.other:
            continue
        asked = parse_scope(text)
        for allowed in limit.resource:
            narrowed = _intersect(asked, allowed)
            if narrowed is None:
                continue
            key = (narrowed.context, narrowed.resource_type)
            granted.setdefault(key, set()).update(narrowed.interactions)
            if text.rsplit(".", 1)[1] in _V1_WORDS:
                v1.add(key)
    result = [
        _format(Scope(context, resource_type, frozenset(letters)), (context, resource_type) in v1)
        for (context, resource_type), letters in granted.items()
        # `user/Patient.rs` adds nothing to `user/*.rs`.
        if resource_type == "*" or not letters <= granted.get((context, "*"), set())
    ]
    result += [text for text in wanted.other if text in limit.other]
    return tuple(dict.fromkeys(result))


_V1_WORDS = {"read": "rs", "write": "cud", "*": "cruds"}
_V1_BY_LETTERS = {frozenset(letters): word for word, letters in _V1_WORDS.items()}


def _texts(scopes: Iterable[str]) -> list[str]:
    return scopes.split() if isinstance(scopes, str) else list(scopes)


def _intersect(asked: Scope, allowed: Scope) -> Scope | None:
    if asked.context != allowed.context:
        return None
    if asked.resource_type == "*":
        resource_type = allowed.resource_type
    elif allowed.resource_type in ("*", asked.resource_type):
        resource_type = asked.resource_type
    else:
        return None
    letters = asked.interactions & allowed.interactions
    return Scope(asked.context, resource_type, letters) if letters else None


def _format(scope: Scope, as_v1: bool) -> str:
    word = _V1_BY_LETTERS.get(scope.interactions) if as_v1 else None
    return f"{scope.context}/{scope.resource_type}.{word}" if word else str(scope)


def is_reference(text: str, resource_type: str) -> bool:
    """True for a literal reference `resource_type/id` with a valid FHIR id."""
    match = _REFERENCE.fullmatch(text)
    return match is not None and match[1] == resource_type


def check_person(code: str, fhir_user: str, organization: str | None, kind: str | None) -> None:
    """`ValueError` unless a person's role, resource, organization and kind agree."""
    definition = ROLES.get(code)
    if definition is None or definition.for_clients:
        people = [known.code for known in _ROLES if not known.for_clients]
        raise ValueError(f"unknown role {code!r}; one of: {', '.join(people)}")
    if not is_reference(fhir_user, definition.resource_type):
        raise ValueError(f"a {code} stands for a {definition.resource_type}/<id>")
    if organization is not None and not is_reference(organization, "Organization"):
        raise ValueError(f"not an Organization reference: {organization!r}")
    if definition.organization == REQUIRED and organization is None:
        raise ValueError(f"a {code} acts for an organization")
    if definition.organization == NONE and organization is not None:
        raise ValueError(f"a {code} does not act for an organization")
    if definition.kinds and (kind is None or definition.kind(kind) is None):
        raise ValueError(
            f"a {code} needs a kind: one of {', '.join(k.code for k in definition.kinds)}"
        )
    if not definition.kinds and kind is not None:
        raise ValueError(f"a {code} has no kinds")
