"""The form that grants a consent: what the resident chose, checked whole before anything is
written. Errors are catalog message ids keyed by the field they belong to."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date

from cityhealth.portal.i18n import N_
from cityhealth.security.consent_shape import CATEGORY_BY_CODE, RECIPIENT_TYPES, SENSITIVE_LABELS
from cityhealth.security.roles import is_reference

#: The longest a consent may run: a resident renews it rather than forgetting it for good.
MAX_YEARS = 5
ALL, SOME = "all", "categories"

PATIENT_REQUIRED = N_("Choose whose records this consent is for.")
RECIPIENT_REQUIRED = N_("Choose who may see the records: search, then pick one.")
SCOPE_REQUIRED = N_("Choose all data, or at least one category.")
UNKNOWN_CHOICE = N_("This choice is not on the list.")
END_REQUIRED = N_("Give the last day of the consent.")
END_INVALID = N_("This is not a valid date.")
END_PAST = N_("The last day must be after today.")
END_TOO_FAR = N_("A consent may run for at most five years.")


@dataclass(frozen=True)
class ConsentChoice:
    patient: str  # "Patient/…" whose records
    recipient: str  # "Organization/…" or "Practitioner/…"
    categories: frozenset[str] | None  # None: all data
    sensitive: frozenset[str]  # sensitive labels included explicitly
    end: date  # the last day in force (Asia/Shanghai)


def read_consent_form(
    form: Mapping[str, list[str]], patients: Collection[str], today: date
) -> tuple[ConsentChoice | None, dict[str, str]]:
    """The choice, or the errors of each field (never both)."""

    def one(name: str) -> str:
        return (form.get(name) or [""])[0].strip()

    errors: dict[str, str] = {}
    patient = one("for")
    if patient not in patients:
        errors["for"] = PATIENT_REQUIRED
    recipient = one("recipient")
    if not any(is_reference(recipient, rtype) for rtype in RECIPIENT_TYPES):
        errors["recipient"] = RECIPIENT_REQUIRED
    categories: frozenset[str] | None = None
    scope = one("scope")
    if scope == SOME:
        categories = frozenset(form.get("category") or ())
        if not categories:
            errors["scope"] = SCOPE_REQUIRED
        elif not categories <= CATEGORY_BY_CODE.keys():
            errors["scope"] = UNKNOWN_CHOICE
    elif scope != ALL:
        errors["scope"] = SCOPE_REQUIRED
    sensitive = frozenset(form.get("sensitive") or ())
    if not sensitive <= SENSITIVE_LABELS:
        errors["sensitive"] = UNKNOWN_CHOICE
    end = _end(one("end"), today, errors)
    if errors or end is None:
        return None, errors
    return ConsentChoice(patient, recipient, categories, sensitive, end), {}


def _end(text: str, today: date, errors: dict[str, str]) -> date | None:
    if not text:
        errors["end"] = END_REQUIRED
        return None
    try:
        end = date.fromisoformat(text)
    except ValueError:
        errors["end"] = END_INVALID
        return None
    if end <= today:
        errors["end"] = END_PAST
    elif end > _years_later(today, MAX_YEARS):
        errors["end"] = END_TOO_FAR
    return end


def _years_later(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)
