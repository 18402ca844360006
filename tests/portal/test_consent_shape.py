"""The Consent shape shared by the portal and the engine's access checks: valid R4, read back
exactly as written, and covering exactly the data the resident chose."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.validation import Validator
from cityhealth.security.consent_shape import (
    ACT_CODE,
    CATEGORY_BY_CODE,
    DIAGNOSTIC_SECTION,
    INACTIVE,
    OBSERVATION_CATEGORY,
    SENSITIVE_LABELS,
    ConsentTerms,
    consent_resource,
    read_consent,
)

START = datetime(2026, 12, 4, 6, 30, tzinfo=UTC)


def terms(
    categories: frozenset[str] | None = None, sensitive: frozenset[str] = frozenset()
) -> ConsentTerms:
    return ConsentTerms(
        patient="Patient/p1",
        performer="Patient/p1",
        recipient="Organization/h1",
        recipient_name="中卫市人民医院",
        start=START,
        end=START + timedelta(days=30),
        categories=categories,
        sensitive=sensitive,
        granted=START,
    )


def resource(rtype: str, category: tuple[str, str] | None = None, *labels: str) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": rtype}
    if category:
        body["category"] = [{"coding": [{"system": category[0], "code": category[1]}]}]
    if labels:
        body["meta"] = {"security": [{"system": ACT_CODE, "code": label} for label in labels]}
    return body


LAB_RESULT = resource("Observation", (OBSERVATION_CATEGORY, "laboratory"))
VITAL_SIGNS = resource("Observation", (OBSERVATION_CATEGORY, "vital-signs"))
IMAGING_REPORT = resource("DiagnosticReport", (DIAGNOSTIC_SECTION, "RAD"))
PRESCRIPTION = resource("MedicationRequest")
HIV_TEST = resource("Observation", (OBSERVATION_CATEGORY, "laboratory"), "HIV")


def test_the_resource_is_valid_r4(definitions: Definitions) -> None:
    validator = Validator(definitions)
    for chosen in (terms(), terms(frozenset({"lab", "imaging"}), frozenset({"PSY"}))):
        issues = validator.validate(consent_resource(chosen), "Consent")
        assert [i for i in issues if i.severity == "error"] == []


@given(
    categories=st.none() | st.frozensets(st.sampled_from(sorted(CATEGORY_BY_CODE)), min_size=1),
    sensitive=st.frozensets(st.sampled_from(sorted(SENSITIVE_LABELS))),
)
def test_what_is_written_is_read_back(
    categories: frozenset[str] | None, sensitive: frozenset[str]
) -> None:
    written = terms(categories, sensitive)
    read = read_consent(consent_resource(written))
    assert read is not None
    assert read.categories == categories and read.sensitive == sensitive
    assert read.recipient == written.recipient and read.patient == written.patient
    assert read.start == written.start
    assert read.end - written.end < timedelta(seconds=1)


def test_all_data_covers_everything_but_unnamed_sensitive_data() -> None:
    everything = terms()
    assert all(everything.covers(r) for r in (LAB_RESULT, VITAL_SIGNS, PRESCRIPTION))
    assert not everything.covers(HIV_TEST)
    assert terms(sensitive=frozenset({"HIV"})).covers(HIV_TEST)
    assert not terms(sensitive=frozenset({"PSY"})).covers(HIV_TEST)


def test_categories_cover_their_data_only() -> None:
    lab = terms(frozenset({"lab"}))
    assert lab.covers(LAB_RESULT)
    assert not lab.covers(VITAL_SIGNS)
    assert not lab.covers(IMAGING_REPORT)
    assert not lab.covers(PRESCRIPTION)
    assert not lab.covers(HIV_TEST)
    imaging = terms(frozenset({"imaging"}))
    assert imaging.covers(IMAGING_REPORT) and imaging.covers(resource("ImagingStudy"))
    assert not imaging.covers(LAB_RESULT)
    prescriptions = terms(frozenset({"prescriptions"}))
    assert prescriptions.covers(PRESCRIPTION) and not prescriptions.covers(LAB_RESULT)


def test_a_consent_is_in_force_within_its_period_while_active() -> None:
    consent = terms()
    assert consent.in_force(START) and consent.in_force(START + timedelta(days=30))
    assert not consent.in_force(START - timedelta(seconds=1))
    assert not consent.in_force(START + timedelta(days=30, seconds=1))
    body = consent_resource(consent)
    body["status"] = INACTIVE
    revoked = read_consent(body)
    assert revoked is not None and not revoked.in_force(START + timedelta(days=1))


def test_other_consents_grant_nothing() -> None:
    body = consent_resource(terms())
    body["provision"]["actor"][0]["role"]["coding"][0]["code"] = "PRCP"
    assert read_consent(body) is None
    assert read_consent({"resourceType": "Consent", "status": "active"}) is None


@pytest.mark.parametrize(
    "change",
    [
        {"categories": frozenset()},
        {"categories": frozenset({"genome"})},
        {"sensitive": frozenset({"XYZ"})},
        {"recipient": "Patient/p2"},
        {"end": START},
    ],
)
def test_impossible_terms_are_refused(change: dict[str, Any]) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError):
        consent_resource(replace(terms(), **change))
