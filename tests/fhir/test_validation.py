"""Resource validation: each broken resource is rejected at the element that breaks it."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityhealth.fhir.definitions import Definitions, get_definitions
from cityhealth.fhir.validation import Issue, Validator
from cityhealth.fhir.validation_specs import SpecCompiler
from cityhealth.fhir.validation_terminology import ValueSetExpander

EXT = "http://example.org/fhir/StructureDefinition/note"
OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "weight"},
}


@pytest.fixture(scope="module")
def shared() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared"
    return Path(os.environ.get("CITYHEALTH_SHARED", default))


@pytest.fixture(scope="module")
def definitions() -> Definitions:
    return get_definitions()


@pytest.fixture(scope="module")
def validator(definitions: Definitions) -> Validator:
    return Validator(definitions)


def patient(**elements: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **elements}


def observation(**elements: Any) -> dict[str, Any]:
    return {**copy.deepcopy(OBSERVATION), **elements}


def errors(validator: Validator, resource: Any, expected_type: str | None = None) -> list[Issue]:
    return [i for i in validator.validate(resource, expected_type) if i.severity == "error"]


# Each case: the resource and the (code, expression) of every error it must get.
INVALID: dict[str, tuple[Any, set[tuple[str, str]]]] = {
    "unknown element": (patient(foo=1), {("structure", "Patient.foo")}),
    "unknown nested element": (
        patient(name=[{"family": "Li", "surname": "Li"}]),
        {("structure", "Patient.name[0].surname")},
    ),
    "resourceType inside a data type": (
        patient(name=[{"resourceType": "HumanName", "family": "Li"}]),
        {("structure", "Patient.name[0].resourceType")},
    ),
    "boolean as string": (patient(active="true"), {("structure", "Patient.active")}),
    "string as number": (patient(name=[{"family": 7}]), {("structure", "Patient.name[0].family")}),
    "decimal as string": (
        observation(valueQuantity={"value": "5.2", "unit": "kg"}),
        {("structure", "Observation.valueQuantity.value")},
    ),
    "integer as fraction": (
        observation(valueInteger=1.5),
        {("structure", "Observation.valueInteger")},
    ),
    "integer out of range": (
        observation(valueInteger=2**31),
        {("value", "Observation.valueInteger")},
    ),
    "negative unsignedInt": (
        patient(photo=[{"contentType": "image/png", "size": -1}]),
        {("value", "Patient.photo[0].size")},
    ),
    "zero positiveInt": (
        observation(
            valueSampledData={"origin": {"value": 0}, "period": 1, "dimensions": 0, "data": "1"}
        ),
        {("value", "Observation.valueSampledData.dimensions")},
    ),
    "month 13": (patient(birthDate="1970-13-01"), {("value", "Patient.birthDate")}),
    "slashes in a date": (patient(birthDate="1970/01/01"), {("value", "Patient.birthDate")}),
    "dateTime with time but no zone": (
        observation(effectiveDateTime="2020-01-01T10:00:00"),
        {("value", "Observation.effectiveDateTime")},
    ),
    "id with a space": (patient(id="bad id"), {("value", "Patient.id")}),
    "id longer than 64": (patient(id="a" * 65), {("value", "Patient.id")}),
    "code with a double space": (patient(gender="ma  le"), {("value", "Patient.gender")}),
    "base64 with a broken group": (
        patient(photo=[{"contentType": "image/png", "data": "AAAA " * 40 + "A"}]),
        {("value", "Patient.photo[0].data")},
    ),
    "missing status and code": (
        {"resourceType": "Observation"},
        {("required", "Observation.status"), ("required", "Observation.code")},
    ),
    "missing nested required element": (
        {"resourceType": "Questionnaire", "status": "draft", "item": [{"type": "string"}]},
        {("required", "Questionnaire.item[0].linkId")},
    ),
    "missing required element in recursive item": (
        {
            "resourceType": "Questionnaire",
            "status": "draft",
            "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "1.1"}]}],
        },
        {("required", "Questionnaire.item[0].item[0].type")},
    ),
    "array for a single primitive": (patient(gender=["male"]), {("structure", "Patient.gender")}),
    "array for a single object": (
        patient(maritalStatus=[{"text": "married"}]),
        {("structure", "Patient.maritalStatus")},
    ),
    "single object for an array": (
        patient(name={"family": "Li"}),
        {("structure", "Patient.name")},
    ),
    "single primitive for an array": (
        patient(name=[{"given": "Wei"}]),
        {("structure", "Patient.name[0].given")},
    ),
    "code not in the required value set": (
        patient(gender="bogus"),
        {("code-invalid", "Patient.gender")},
    ),
    "code in a data type outside its value set": (
        patient(telecom=[{"system": "pager-ish", "value": "1"}]),
        {("code-invalid", "Patient.telecom[0].system")},
    ),
    "CodeableConcept without a coding from the required value set": (
        {
            "resourceType": "Condition",
            "subject": {"reference": "Patient/1"},
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "gone",
                    }
                ]
            },
        },
        {("code-invalid", "Condition.clinicalStatus")},
    ),
    "choice type that does not exist": (
        observation(valueFoo="x"),
        {("structure", "Observation.valueFoo")},
    ),
    "choice type the element does not allow": (
        observation(valueReference={"reference": "Patient/1"}),
        {("structure", "Observation.valueReference")},
    ),
    "two types of one choice": (
        observation(valueString="a", valueBoolean=True),
        {("structure", "Observation.valueBoolean")},
    ),
    "empty string": (patient(name=[{"family": ""}]), {("value", "Patient.name[0].family")}),
    "empty array": (patient(name=[]), {("value", "Patient.name")}),
    "empty object": (patient(maritalStatus={}), {("value", "Patient.maritalStatus")}),
    "null value": (patient(gender=None), {("structure", "Patient.gender")}),
    "null in an array without extension": (
        patient(name=[{"given": ["Wei", None]}]),
        {("value", "Patient.name[0].given[1]")},
    ),
    "companion array of another length": (
        patient(name=[{"given": ["Wei", "Ming"], "_given": [None]}]),
        {("structure", "Patient.name[0].given")},
    ),
    "extension with value and nested extensions": (
        patient(
            extension=[
                {"url": EXT, "valueString": "a", "extension": [{"url": "b", "valueString": "c"}]}
            ]
        ),
        {("invariant", "Patient.extension[0]")},
    ),
    "extension with neither value nor nested extensions": (
        patient(extension=[{"url": EXT}]),
        {("invariant", "Patient.extension[0]")},
    ),
    "extension without url": (
        patient(modifierExtension=[{"valueString": "a"}]),
        {("required", "Patient.modifierExtension[0].url")},
    ),
    "primitive extension with an invalid extension": (
        patient(birthDate="1970-01-01", _birthDate={"extension": [{"valueBoolean": True}]}),
        {("required", "Patient.birthDate.extension[0].url")},
    ),
    "primitive extension that is not an object": (
        patient(birthDate="1970-01-01", _birthDate="x"),
        {("structure", "Patient.birthDate")},
    ),
    "primitive extension for a complex element": (
        patient(_maritalStatus={"extension": [{"url": EXT, "valueString": "a"}]}),
        {("structure", "Patient._maritalStatus")},
    ),
    "invalid contained resource": (
        patient(
            contained=[{"resourceType": "Observation", "id": "o1", "code": {"text": "x"}}],
            link=[{"other": {"reference": "#o1"}, "type": "seealso"}],
        ),
        {("required", "Patient.contained[0].status")},
    ),
    "contained resource without id": (
        patient(contained=[{"resourceType": "Organization", "name": "Clinic"}]),
        {("required", "Patient.contained[0]")},
    ),
    "contained resource never referenced": (
        patient(contained=[{"resourceType": "Organization", "id": "org", "name": "Clinic"}]),
        {("invariant", "Patient.contained[0]")},
    ),
    "contained resource with its own contained and a version": (
        patient(
            managingOrganization={"reference": "#org"},
            contained=[
                {
                    "resourceType": "Organization",
                    "id": "org",
                    "meta": {"versionId": "1"},
                    "contained": [{"resourceType": "Organization", "id": "o2"}],
                    "partOf": {"reference": "#o2"},
                }
            ],
        ),
        {
            ("invariant", "Patient.contained[0].contained"),
            ("invariant", "Patient.contained[0].meta.versionId"),
        },
    ),
    "unknown resource type inside a bundle": (
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": "Nope"}}],
        },
        {("not-supported", "Bundle.entry[0].resource")},
    ),
    "invalid resource inside a bundle": (
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": patient(gender="bogus")}],
        },
        {("code-invalid", "Bundle.entry[0].resource.gender")},
    ),
    "comparator in a SimpleQuantity": (
        observation(
            valueQuantity={"value": 5},
            referenceRange=[{"low": {"value": 1, "comparator": ">"}}],
        ),
        {("structure", "Observation.referenceRange[0].low.comparator")},
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_resource_is_rejected_at_the_element(validator: Validator, case: str) -> None:
    resource, expected = INVALID[case]
    issues = errors(validator, resource)
    assert {(i.code, i.expression) for i in issues} == expected, issues
    assert all(i.diagnostics for i in issues)


@pytest.mark.parametrize(
    ("resource", "expected_type", "expected"),
    [
        (patient(), "Observation", ("invalid", "Patient")),
        ({"resourceType": "Nope"}, None, ("not-supported", "Nope")),
        ({"resourceType": "Element"}, None, ("not-supported", "Element")),
        ({"resourceType": "DomainResource"}, None, ("not-supported", "DomainResource")),
        ({"id": "1"}, "Patient", ("required", "Patient")),
        ({"resourceType": 5}, None, ("required", "")),
        (["Patient"], None, ("structure", "")),
    ],
)
def test_resource_type_is_checked(
    validator: Validator, resource: Any, expected_type: str | None, expected: tuple[str, str]
) -> None:
    assert [(i.code, i.expression) for i in errors(validator, resource, expected_type)] == [
        expected
    ]


VALID: dict[str, Any] = {
    "minimal patient": patient(),
    "id with dashes and dots": patient(id="p-1.a"),
    "primitive extension without a value": patient(
        _birthDate={"extension": [{"url": EXT, "valueCode": "unknown"}]}
    ),
    "primitive with value and extension": patient(
        birthDate="1970-01", _birthDate={"id": "b", "extension": [{"url": EXT, "valueString": "x"}]}
    ),
    "aligned arrays with nulls": patient(
        name=[
            {
                "given": ["Wei", None, "Ming"],
                "_given": [None, {"extension": [{"url": EXT, "valueString": "x"}]}, None],
            }
        ]
    ),
    "extensions only for an array of primitives": patient(
        name=[{"_given": [{"extension": [{"url": EXT, "valueString": "x"}]}]}]
    ),
    "choice types": observation(
        valueQuantity={"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org"},
        effectiveDateTime="2020-01-01T10:00:00+08:00",
        _status={"extension": [{"url": EXT, "valueString": "x"}]},
    ),
    "nested extensions": patient(
        extension=[{"url": EXT, "extension": [{"url": "part", "valueInteger": -3}]}]
    ),
    "base64 with line breaks": patient(
        photo=[{"contentType": "image/png", "data": "iVBO\nRw0K GgoA\r\n"}]
    ),
    "referenced contained resource": patient(
        managingOrganization={"reference": "#org"},
        contained=[{"resourceType": "Organization", "id": "org", "name": "Clinic"}],
    ),
    "contained resource that refers to its container": patient(
        contained=[
            {
                "resourceType": "Observation",
                "id": "o1",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": "#"},
            }
        ]
    ),
    "comments tolerated": patient(fhir_comments=["a note"], gender="other"),
    "Chinese text with ideographic space": patient(name=[{"text": "王\u3000伟"}]),
    "decimal given as integer": observation(valueQuantity={"value": 72}),
    "code from a value set that cannot be expanded": {
        "resourceType": "MolecularSequence",
        "coordinateSystem": 0,
        "structureVariant": [
            {"variantType": {"coding": [{"system": "http://loinc.org", "code": "X"}]}}
        ],
    },
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_resource_is_accepted(validator: Validator, case: str) -> None:
    resource = VALID[case]
    assert errors(validator, resource, resource["resourceType"]) == []


def test_all_issues_are_reported_at_once(validator: Validator) -> None:
    resource = patient(foo=1, gender="bogus", birthDate="1970-13", name=[{"given": "Wei"}])
    assert {i.expression for i in errors(validator, resource)} == {
        "Patient.foo",
        "Patient.gender",
        "Patient.birthDate",
        "Patient.name[0].given",
    }


def test_deeply_nested_resource_is_rejected_not_crashed(validator: Validator) -> None:
    item: dict[str, Any] = {"linkId": "leaf", "type": "display"}
    for _ in range(2000):
        item = {"linkId": "group", "type": "group", "item": [item]}
    resource = {"resourceType": "Questionnaire", "status": "draft", "item": [item]}
    assert [i.code for i in errors(validator, resource, "Questionnaire")] == ["too-costly"]


def test_validation_does_not_change_the_resource(validator: Validator, shared: Path) -> None:
    path = shared / "data" / "fhir-r4-examples" / "Patient-example.json"
    resource = orjson.loads(path.read_bytes())
    before = copy.deepcopy(resource)
    assert errors(validator, resource) == []
    assert resource == before


def _expander(
    value_sets: list[dict[str, Any]], code_systems: list[dict[str, Any]]
) -> ValueSetExpander:
    definitions = Definitions(
        structures={},
        resource_types=frozenset(),
        search_params={},
        patient_compartment={},
        value_sets={v["url"]: v for v in value_sets},
        code_systems={c["url"]: c for c in code_systems},
    )
    return ValueSetExpander(definitions)


def test_value_set_expansion_follows_compose() -> None:
    cs = {
        "url": "urn:cs",
        "content": "complete",
        "concept": [
            {"code": "a", "concept": [{"code": "a1", "concept": [{"code": "a11"}]}]},
            {"code": "b"},
        ],
    }
    partial = {"url": "urn:partial", "content": "fragment", "concept": [{"code": "x"}]}

    def vs(
        url: str, *include: dict[str, Any], exclude: tuple[dict[str, Any], ...] = ()
    ) -> dict[str, Any]:
        return {"url": url, "compose": {"include": list(include), "exclude": list(exclude)}}

    expander = _expander(
        [
            vs("urn:all", {"system": "urn:cs"}),
            vs(
                "urn:isa",
                {
                    "system": "urn:cs",
                    "filter": [{"property": "concept", "op": "is-a", "value": "a"}],
                },
            ),
            vs(
                "urn:below",
                {
                    "system": "urn:cs",
                    "filter": [{"property": "concept", "op": "descendent-of", "value": "a"}],
                },
            ),
            vs("urn:listed", {"system": "urn:external", "concept": [{"code": "e"}]}),
            vs(
                "urn:import",
                {"valueSet": ["urn:listed|1.0"]},
                {"valueSet": ["urn:isa"]},
                exclude=({"system": "urn:cs", "concept": [{"code": "a1"}]},),
            ),
            # Within one include every condition holds: the value sets and the system intersect.
            vs("urn:both", {"valueSet": ["urn:all", "urn:below"]}),
            vs("urn:system-and-set", {"system": "urn:cs", "valueSet": ["urn:isa"]}),
            vs("urn:fragment", {"system": "urn:partial"}),
            vs(
                "urn:unknown-filter",
                {"system": "urn:cs", "filter": [{"property": "status", "op": "=", "value": "x"}]},
            ),
            vs("urn:imports-unknown", {"valueSet": ["urn:missing"]}),
        ],
        [cs, partial],
    )
    assert expander.expand("urn:all") == {("urn:cs", c) for c in ("a", "a1", "a11", "b")}
    assert expander.expand("urn:isa|4.0.1") == {("urn:cs", c) for c in ("a", "a1", "a11")}
    assert expander.expand("urn:below") == {("urn:cs", c) for c in ("a1", "a11")}
    assert expander.expand("urn:listed") == {("urn:external", "e")}
    assert expander.expand("urn:import") == {
        ("urn:external", "e"),
        ("urn:cs", "a"),
        ("urn:cs", "a11"),
    }
    assert expander.expand("urn:both") == {("urn:cs", "a1"), ("urn:cs", "a11")}
    assert expander.expand("urn:system-and-set") == {("urn:cs", c) for c in ("a", "a1", "a11")}
    for url in ("urn:fragment", "urn:unknown-filter", "urn:imports-unknown", "urn:missing"):
        assert expander.expand(url) is None


def _primitive_patterns(definitions: Definitions) -> list[tuple[str, str]]:
    """(type, R4 regex) of every primitive type that has one."""
    found = []
    for name, sd in definitions.structures.items():
        if sd["kind"] != "primitive-type":
            continue
        value = next(e for e in sd["snapshot"]["element"] if e["path"] == f"{name}.value")
        for ext in value["type"][0].get("extension", []):
            if ext["url"] == "http://hl7.org/fhir/StructureDefinition/regex":
                found.append((name, ext["valueString"]))
    return found


@pytest.fixture(scope="module")
def patterns(definitions: Definitions) -> list[tuple[str, str, re.Pattern[str]]]:
    """(type, R4 regex, compiled pattern the validator uses) per primitive type with a regex."""
    compiler = SpecCompiler(definitions)
    found = []
    for name, regex in _primitive_patterns(definitions):
        compiled = compiler.primitive(name).pattern
        if compiled is not None:
            found.append((name, regex, compiled))
    return found


def test_every_string_and_integer_primitive_has_a_pattern(
    patterns: list[tuple[str, str, re.Pattern[str]]],
) -> None:
    # decimal is checked as a JSON number: its source text is gone once parsed.
    assert {name for name, _, _ in patterns} == {
        "base64Binary",
        "boolean",
        "canonical",
        "code",
        "date",
        "dateTime",
        "id",
        "instant",
        "integer",
        "markdown",
        "oid",
        "positiveInt",
        "string",
        "time",
        "unsignedInt",
        "uri",
        "url",
        "uuid",
    }


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="0123456789aAzZ+-.:/=T \n\t", max_size=24))
def test_compiled_patterns_match_the_r4_regexes(
    patterns: list[tuple[str, str, re.Pattern[str]]], text: str
) -> None:
    """The backtracking-safe patterns accept exactly what the R4 regexes accept."""
    for name, regex, compiled in patterns:
        plain = re.fullmatch(regex, text, re.ASCII) is not None
        assert (compiled.fullmatch(text) is not None) == plain, (name, text)
