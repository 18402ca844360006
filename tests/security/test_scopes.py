"""SMART on FHIR scopes: v1 and v2 syntax, refusal of malformed scopes, and what they allow."""

from __future__ import annotations

import pytest

from cityhealth.security.scopes import (
    INTERACTIONS,
    Scope,
    allows,
    contexts_allowing,
    parse_scope,
    parse_scopes,
)

ALL = frozenset("cruds")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("patient/*.read", Scope("patient", "*", frozenset("rs"))),
        ("user/Observation.write", Scope("user", "Observation", frozenset("cud"))),
        ("system/*.*", Scope("system", "*", ALL)),
        ("patient/Observation.rs", Scope("patient", "Observation", frozenset("rs"))),
        ("user/*.cruds", Scope("user", "*", ALL)),
        ("user/Patient.c", Scope("user", "Patient", frozenset("c"))),
        ("system/MedicationRequest.ud", Scope("system", "MedicationRequest", frozenset("ud"))),
        ("patient/Condition.s", Scope("patient", "Condition", frozenset("s"))),
    ],
)
def test_parse_resource_scopes(text: str, expected: Scope) -> None:
    assert parse_scope(text) == expected


def test_v1_and_v2_spellings_are_equal() -> None:
    assert parse_scope("patient/*.read") == parse_scope("patient/*.rs")
    assert parse_scope("user/Observation.write") == parse_scope("user/Observation.cud")
    assert parse_scope("system/*.*") == parse_scope("system/*.cruds")


def test_scope_prints_in_v2_syntax() -> None:
    scope = parse_scope("user/Observation.write")
    assert str(scope) == "user/Observation.cud"
    assert parse_scope(str(scope)) == scope
    assert str(parse_scope("patient/*.read")) == "patient/*.rs"


def test_parse_scopes_splits_resource_and_other_scopes() -> None:
    text = "openid fhirUser launch/patient patient/*.read offline_access user/Observation.rs"
    parsed = parse_scopes(text)
    assert parsed.resource == (
        Scope("patient", "*", frozenset("rs")),
        Scope("user", "Observation", frozenset("rs")),
    )
    assert parsed.other == ("openid", "fhirUser", "launch/patient", "offline_access")
    assert parse_scopes(text.split()) == parsed
    assert parse_scopes("online_access").other == ("online_access",)
    assert parse_scopes("") == parse_scopes([])


@pytest.mark.parametrize(
    "bad",
    [
        "patient/observation.read",  # resource types start with a capital
        "patient/Observation",
        "patient/Observation.",
        "patient/Observation.sr",  # v2 letters come in cruds order
        "patient/Observation.rr",
        "patient/Observation.rx",
        "patient/*.readwrite",
        "admin/*.read",
        "Patient/*.read",
        "patient/*.read/",
        "email",
        "launch/practitioner",
        "patient/Observation.rs?category=laboratory",
    ],
)
def test_malformed_scopes_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=r"malformed|granular") as single:
        parse_scope(bad)
    assert repr(bad) in str(single.value)
    with pytest.raises(ValueError) as among:
        parse_scopes(["openid", bad, "patient/*.read"])
    assert bad in str(among.value)


def test_every_malformed_scope_is_named() -> None:
    with pytest.raises(ValueError) as caught:
        parse_scopes("openid email patient/*.read admin/*.* user/Observation.x")
    message = str(caught.value)
    assert "email" in message and "admin/*.*" in message and "user/Observation.x" in message
    assert "openid" not in message and "patient/*.read" not in message


def test_granular_scopes_are_not_widened() -> None:
    with pytest.raises(ValueError, match="granular"):
        parse_scope("patient/Observation.rs?category=laboratory")


def scopes(text: str) -> tuple[Scope, ...]:
    return parse_scopes(text).resource


@pytest.mark.parametrize(
    ("granted", "resource_type", "interaction", "expected"),
    [
        ("patient/Observation.rs", "Observation", "read", True),
        ("patient/Observation.rs", "Observation", "search", True),
        ("patient/Observation.rs", "Observation", "vread", True),
        ("patient/Observation.rs", "Observation", "history", True),
        ("patient/Observation.rs", "Observation", "$everything", True),
        ("patient/Observation.rs", "Observation", "$export", True),
        ("patient/Observation.rs", "Observation", "create", False),
        ("patient/Observation.rs", "Observation", "update", False),
        ("patient/Observation.rs", "Observation", "delete", False),
        ("patient/Observation.rs", "Patient", "read", False),
        ("patient/Observation.r", "Observation", "search", False),
        ("patient/Observation.r", "Observation", "$everything", False),
        ("patient/Observation.s", "Observation", "read", False),
        ("user/*.write", "Patient", "create", True),
        ("user/*.write", "Patient", "update", True),
        ("user/*.write", "Patient", "patch", True),
        ("user/*.write", "Patient", "delete", True),
        ("user/*.write", "Patient", "read", False),
        ("user/*.write", "Patient", "search", False),
        ("user/Observation.c", "Observation", "update", False),
        ("system/*.*", "Claim", "delete", True),
        ("system/*.read", "Claim", "$export", True),
        ("openid fhirUser", "Patient", "read", False),
        ("", "Patient", "read", False),
        # Letters add up within one context...
        ("patient/*.r patient/Observation.s", "Observation", "$export", True),
        ("patient/*.r patient/Observation.s", "Patient", "$export", False),
        # ...but never across contexts, which limit the data differently.
        ("patient/*.r user/*.s", "Observation", "$export", False),
    ],
)
def test_allows(granted: str, resource_type: str, interaction: str, expected: bool) -> None:
    assert allows(scopes(granted), resource_type, interaction) is expected


def test_contexts_allowing_names_each_granting_context() -> None:
    granted = scopes("patient/*.read user/Observation.rs system/Patient.c")
    assert contexts_allowing(granted, "Observation", "read") == {"patient", "user"}
    assert contexts_allowing(granted, "Condition", "search") == {"patient"}
    assert contexts_allowing(granted, "Patient", "create") == {"system"}
    assert contexts_allowing(granted, "Patient", "delete") == frozenset()


def test_every_interaction_is_known_and_unknown_ones_are_refused() -> None:
    assert set(INTERACTIONS) == {
        "create",
        "read",
        "vread",
        "history",
        "update",
        "patch",
        "delete",
        "search",
        "$everything",
        "$export",
    }
    with pytest.raises(ValueError, match="unknown interaction"):
        allows(scopes("system/*.*"), "Patient", "purge")
