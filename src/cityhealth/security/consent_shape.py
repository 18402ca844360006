"""A resident's consent (授权调阅) as an R4 `Consent`, defined once: the portal writes this
shape and the engine's access checks read it, through `consent_resource` and `read_consent`.

    {
      "resourceType": "Consent",
      "status": "active",                    # "inactive" once revoked: no longer in force
      "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "patient-privacy"}]},
      "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0",
                                "display": "Patient Consent"}]}],
      "patient": {"reference": "Patient/<whose records: the resident or their child>"},
      "dateTime": "<when it was granted, UTC>",
      "performer": [{"reference": "Patient/<the resident who granted it>"}],
      "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                 "code": "OPTIN"}]},   # nothing is shared beyond the provision
      "provision": {
        "type": "permit",
        "period": {"start": "<granted, UTC>", "end": "<last instant in force, UTC>"},
        "actor": [{"role": {"coding": [{"system":
                      "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                      "code": "IRCP"}]},
                   "reference": {"reference": "Organization/<id>" or "Practitioner/<id>",
                                 "display": "<its name>"}}],
        "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "<type>"}, ...],
        "code": [{"coding": [<category codings of one data category>]}, ...],
        "provision": [{"type": "deny", "securityLabel": [<sensitive labels not consented>]}]
      }
    }

Which data it covers:
- All data: the provision has neither `class` nor `code`.
- Data categories (`CATEGORIES`): `class` lists the resource types of the chosen categories;
  `code` holds, for each chosen category that shares a type with another (lab results and
  imaging both have Observation and DiagnosticReport), one CodeableConcept with its category
  codings. A resource is covered when its type is in `class` and, for a shared type
  (`SHARED_TYPES`), one of its `category` codings is in `code`.
- Sensitive data (`SENSITIVE`), labelled in a resource's `meta.security`, is never covered
  unless the resident named it: every sensitive label not named is listed in the one nested
  `deny` provision, whatever `class` and `code` say.
A consent is in force while its status is active and the moment lies within its period.
The root provision states its `type` (R4's text would leave it to `policyRule`), so that no
reader has to infer it. Searches can narrow candidates by the R4 parameters `patient`,
`actor`, `status` and `period` before `covers` decides on each resource.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cityhealth.fhir.datetimes import date_range
from cityhealth.security.schema import from_us, to_us

SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
LOINC = "http://loinc.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"
RECIPIENT_ROLE = "IRCP"  # information recipient
ACTIVE, INACTIVE = "active", "inactive"
RECIPIENT_TYPES = ("Organization", "Practitioner")


@dataclass(frozen=True)
class DataCategory:
    code: str
    name_zh: str
    name_en: str
    types: tuple[str, ...]
    codings: tuple[tuple[str, str], ...] = ()  # (system, code) of the resources' category


@dataclass(frozen=True)
class SensitiveCategory:
    label: str  # v3-ActCode sensitivity code, as found in meta.security
    name_zh: str
    name_en: str


CATEGORIES = (
    DataCategory(
        "lab",
        "检验结果",
        "Lab results",
        ("Observation", "DiagnosticReport"),
        ((OBSERVATION_CATEGORY, "laboratory"), (DIAGNOSTIC_SECTION, "LAB")),
    ),
    DataCategory(
        "imaging",
        "影像检查",
        "Imaging",
        ("ImagingStudy", "Observation", "DiagnosticReport"),
        ((OBSERVATION_CATEGORY, "imaging"), (DIAGNOSTIC_SECTION, "RAD")),
    ),
    DataCategory(
        "prescriptions", "处方", "Prescriptions", ("MedicationRequest", "MedicationDispense")
    ),
    DataCategory("encounters", "就诊记录", "Encounters", ("Encounter",)),
)
SENSITIVE = (
    SensitiveCategory("PSY", "精神卫生", "Mental health"),
    SensitiveCategory("HIV", "艾滋病", "HIV/AIDS"),
    SensitiveCategory("STD", "性传播疾病", "Sexually transmitted diseases"),
    SensitiveCategory("SEX", "生殖健康", "Reproductive health"),
)
CATEGORY_BY_CODE = {category.code: category for category in CATEGORIES}
SENSITIVE_LABELS = frozenset(category.label for category in SENSITIVE)
SHARED_TYPES = frozenset(
    name
    for category in CATEGORIES
    for name in category.types
    if sum(name in other.types for other in CATEGORIES) > 1
)


@dataclass(frozen=True)
class ConsentTerms:
    """What a consent says, in the terms of this module."""

    patient: str  # "Patient/…" whose records
    performer: str  # "Patient/…" who granted it
    recipient: str  # "Organization/…" or "Practitioner/…"
    recipient_name: str
    start: datetime
    end: datetime
    categories: frozenset[str] | None  # codes of CATEGORIES; None: all data
    sensitive: frozenset[str] = frozenset()  # labels of SENSITIVE the resident named
    status: str = ACTIVE
    granted: datetime | None = None

    def in_force(self, moment: datetime) -> bool:
        return self.status == ACTIVE and self.start <= moment <= self.end

    def covers(self, resource: dict[str, Any]) -> bool:
        """True when the consent's data includes `resource` (its period and status aside)."""
        labels = {
            label.get("code")
            for label in (resource.get("meta") or {}).get("security") or ()
            if label.get("system") == ACT_CODE
        }
        if labels & (SENSITIVE_LABELS - self.sensitive):
            return False
        if self.categories is None:
            return True
        chosen = [CATEGORY_BY_CODE[code] for code in self.categories]
        rtype = resource.get("resourceType")
        if not any(rtype in category.types for category in chosen):
            return False
        if rtype not in SHARED_TYPES:
            return True
        wanted = {coding for category in chosen for coding in category.codings}
        return any((c.get("system"), c.get("code")) in wanted for c in _codings(resource))


def consent_resource(terms: ConsentTerms) -> dict[str, Any]:
    """The Consent resource of `terms` (without id)."""
    unknown = set(terms.categories or ()) - CATEGORY_BY_CODE.keys()
    if unknown or terms.categories == frozenset():
        raise ValueError(f"data categories must be some of {sorted(CATEGORY_BY_CODE)}")
    if terms.sensitive - SENSITIVE_LABELS:
        raise ValueError(f"sensitive labels must be some of {sorted(SENSITIVE_LABELS)}")
    if terms.recipient.partition("/")[0] not in RECIPIENT_TYPES:
        raise ValueError("a consent is given to an Organization or a Practitioner")
    if not terms.start < terms.end:
        raise ValueError("a consent's period must end after it starts")
    provision: dict[str, Any] = {
        "type": "permit",
        "period": {"start": _instant(terms.start), "end": _instant(terms.end)},
        "actor": [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": RECIPIENT_ROLE}]},
                "reference": {"reference": terms.recipient, "display": terms.recipient_name},
            }
        ],
    }
    if terms.categories is not None:
        chosen = [c for c in CATEGORIES if c.code in terms.categories]
        types = dict.fromkeys(name for category in chosen for name in category.types)
        provision["class"] = [{"system": RESOURCE_TYPES, "code": name} for name in types]
        codes = [_concept(category.codings) for category in chosen if category.codings]
        if codes:
            provision["code"] = codes
    denied = [c.label for c in SENSITIVE if c.label not in terms.sensitive]
    if denied:
        labels = [{"system": ACT_CODE, "code": label} for label in denied]
        provision["provision"] = [{"type": "deny", "securityLabel": labels}]
    return {
        "resourceType": "Consent",
        "status": terms.status,
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [
            {"coding": [{"system": LOINC, "code": "59284-0", "display": "Patient Consent"}]}
        ],
        "patient": {"reference": terms.patient},
        "dateTime": _instant(terms.granted or terms.start),
        "performer": [{"reference": terms.performer}],
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTIN"}]},
        "provision": provision,
    }


def read_consent(body: dict[str, Any]) -> ConsentTerms | None:
    """The terms of a consent of this shape; None for any other Consent, which grants nothing."""
    try:
        provision = body["provision"]
        (actor,) = provision["actor"]
        if provision.get("type") != "permit" or not _has(actor["role"], PARTICIPATION, "IRCP"):
            return None
        if not _has(body["scope"], SCOPE, "patient-privacy"):
            return None
        period = provision["period"]
        # date_range is half-open: the period ends one microsecond before its upper bound.
        start, end = date_range(period["start"])[0], date_range(period["end"])[1] - 1
        recipient = actor["reference"]
        denied = {
            label["code"]
            for rule in provision.get("provision") or ()
            if rule.get("type") == "deny"
            for label in rule.get("securityLabel") or ()
            if label.get("system") == ACT_CODE
        }
        return ConsentTerms(
            patient=body["patient"]["reference"],
            performer=body["performer"][0]["reference"],
            recipient=recipient["reference"],
            recipient_name=recipient.get("display", ""),
            start=from_us(start),
            end=from_us(end),
            categories=_categories(provision),
            sensitive=SENSITIVE_LABELS - denied,
            status=body["status"],
            granted=from_us(date_range(body["dateTime"])[0]) if "dateTime" in body else None,
        )
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _categories(provision: dict[str, Any]) -> frozenset[str] | None:
    classes = {
        c.get("code") for c in provision.get("class") or () if c.get("system") == RESOURCE_TYPES
    }
    if not classes and not provision.get("code"):
        return None
    codes = {coding for concept in provision.get("code") or () for coding in _pairs(concept)}
    chosen = frozenset(
        category.code
        for category in CATEGORIES
        if set(category.types) <= classes and set(category.codings) <= codes
    )
    if not chosen:
        raise ValueError("the provision names no known data category")
    return chosen


def _codings(resource: dict[str, Any]) -> Iterable[dict[str, Any]]:
    concepts = resource.get("category") or ()
    for concept in [concepts] if isinstance(concepts, dict) else concepts:
        yield from concept.get("coding") or ()


def _pairs(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c.get("system"), c.get("code")) for c in concept.get("coding") or ()}


def _has(concept: dict[str, Any], system: str, code: str) -> bool:
    return (system, code) in _pairs(concept)


def _concept(codings: Iterable[tuple[str, str]]) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code} for system, code in codings]}


def _instant(moment: datetime) -> str:
    return from_us(to_us(moment)).isoformat(timespec="seconds")
