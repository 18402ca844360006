"""De-identified records for regulators (去标识化, PIPL art. 73 and GB/T 37964): what remains
cannot name a person without further information kept apart.

Removed from every resource: the narrative (`text`, which repeats names) and the display text of
references (a patient's name beside `Patient/…`). Removed from a person (Patient, RelatedPerson,
Person): names, identifiers (ID card, insurance and record numbers), telecom, photo, contacts,
links, and the address but for its district, city, province and country; the birth date keeps
its year. Resource ids stay: they are pseudonyms that let a regulator count and link records.

Searches that would find a person by what was removed are refused (`IDENTIFYING_PARAMS`)."""

from __future__ import annotations

from typing import Any

from cityhealth.fhir import jsonio

PEOPLE = frozenset({"Patient", "RelatedPerson", "Person"})
_PERSONAL = ("name", "identifier", "telecom", "photo", "contact", "link")
_KEPT_ADDRESS = ("use", "type", "district", "city", "state", "country")
#: Search parameters on what de-identification removes, for any type.
IDENTIFYING_PARAMS = frozenset(
    {
        "name",
        "family",
        "given",
        "phonetic",
        "identifier",
        "telecom",
        "phone",
        "email",
        "address",
        "address-postalcode",
        "birthdate",
        "_text",
        "_content",
    }
)


def deidentify(body: str) -> str:
    resource = jsonio.loads(body)
    resource.pop("text", None)
    if resource.get("resourceType") in PEOPLE:
        for name in _PERSONAL:
            resource.pop(name, None)
        if isinstance(resource.get("birthDate"), str):
            resource["birthDate"] = resource["birthDate"][:4]
        if isinstance(resource.get("address"), list):
            resource["address"] = [
                {k: v for k, v in a.items() if k in _KEPT_ADDRESS}
                for a in resource["address"]
                if isinstance(a, dict)
            ]
    _drop_displays(resource)
    return jsonio.dumps(resource).decode()


def _drop_displays(value: Any) -> None:
    if isinstance(value, dict):
        if "reference" in value and isinstance(value.get("reference"), str):
            value.pop("display", None)
        for item in value.values():
            _drop_displays(item)
    elif isinstance(value, list):
        for item in value:
            _drop_displays(item)


def identifying(criterion: str) -> bool:
    """Whether a search criterion (`name`, `subject:Patient.family`, `_has:…:name` …) tests
    something de-identification removes."""
    last = criterion.split(":")[-1] if criterion.startswith("_has:") else criterion
    code = last.split(".")[-1].partition(":")[0]
    return code in IDENTIFYING_PARAMS
