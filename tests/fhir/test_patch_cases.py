"""The official patch test cases (JSON Patch, FHIRPath Patch R4 and R5) and the edge cases
the server relies on: errors name the failing path, inputs are never modified."""

from __future__ import annotations

import copy
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from fhir_xml import resource_from_element

from cityhealth.fhir.patch import PatchError, apply_fhir_patch, apply_json_patch

SHARED = Path(os.environ.get("CITYHEALTH_SHARED") or Path(__file__).resolve().parents[3] / "shared")
PATCH_DIR = SHARED / "data" / "fhir-test-cases" / "patch"

JSON_CASES: list[dict[str, Any]] = json.loads((PATCH_DIR / "json-patch-tests.json").read_text())


def _fhir_cases(path: Path, prefix: str) -> list[Any]:
    cases = []
    for case in ET.parse(path).getroot().iter("case"):

        def resource(tag: str, case: ET.Element = case) -> dict[str, Any] | None:
            holder = case.find(tag)
            return None if holder is None else resource_from_element(holder[0])

        error = case.find("error")
        cases.append(
            pytest.param(
                resource("input"),
                resource("diff"),
                resource("output"),
                None if error is None else error.get("msg"),
                id=prefix + case.get("name", ""),
            )
        )
    return cases


FHIR_CASES = _fhir_cases(PATCH_DIR / "fhir-patch-tests.xml", "r4-") + _fhir_cases(
    PATCH_DIR / "r5" / "fhir-patch-tests.xml", "r5-"
)


@pytest.mark.parametrize("case", JSON_CASES, ids=[c["comment"] for c in JSON_CASES])
def test_json_patch_case(case: dict[str, Any]) -> None:
    before = copy.deepcopy(case["doc"])
    if "error" in case:
        with pytest.raises(PatchError):
            apply_json_patch(case["doc"], case["patch"])
    else:
        assert apply_json_patch(case["doc"], case["patch"]) == case["expected"]
    assert case["doc"] == before


@pytest.mark.parametrize(("resource", "patch", "expected", "error"), FHIR_CASES)
def test_fhir_patch_case(
    resource: dict[str, Any], patch: dict[str, Any], expected: dict[str, Any] | None, error: str
) -> None:
    before = copy.deepcopy(resource)
    if error is not None:
        with pytest.raises(PatchError) as raised:
            apply_fhir_patch(resource, patch)
        assert str(raised.value) == error
    else:
        assert apply_fhir_patch(resource, patch) == expected
    assert resource == before


def test_case_counts() -> None:
    assert len(JSON_CASES) == 16
    assert sum(1 for case in FHIR_CASES if case.id.startswith("r4-")) == 33
    assert sum(1 for case in FHIR_CASES if case.id.startswith("r5-")) == 34


def test_json_patch_error_names_the_failing_path() -> None:
    patient = {"resourceType": "Patient", "active": True}
    with pytest.raises(PatchError) as raised:
        apply_json_patch(
            patient,
            [
                {"op": "replace", "path": "/active", "value": False},
                {"op": "remove", "path": "/birthDate"},
            ],
        )
    assert raised.value.expression == "/birthDate"
    assert "'remove' at '/birthDate'" in str(raised.value)
    assert patient["active"] is True
    with pytest.raises(PatchError):
        apply_json_patch(patient, {"op": "remove", "path": "/active"})


def _operation(kind: str, path: str, **parts: Any) -> dict[str, Any]:
    """One FHIRPath Patch operation; `parts` maps a part name to (value[x] name, value)."""
    part = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
    part += [{"name": name, key: value} for name, (key, value) in parts.items()]
    return {"name": "operation", "part": part}


def _patch(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(operations)}


OBSERVATION = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"text": "weight"},
    "valueString": "heavy",
    "component": [
        {"code": {"text": "a"}, "valueString": "1"},
        {"code": {"text": "b"}, "valueString": "2"},
    ],
}


def test_replace_choice_element_renames_it_with_the_new_type() -> None:
    quantity = {"value": 72.5, "unit": "kg"}
    result = apply_fhir_patch(
        OBSERVATION,
        _patch(_operation("replace", "Observation.value", value=("valueQuantity", quantity))),
    )
    assert "valueString" not in result
    assert result["valueQuantity"] == quantity
    assert OBSERVATION["valueString"] == "heavy"


def test_where_selects_the_element_to_change() -> None:
    path = "Observation.component.where(code.text = 'b').value"
    result = apply_fhir_patch(
        OBSERVATION, _patch(_operation("replace", path, value=("valueString", "3")))
    )
    assert [c["valueString"] for c in result["component"]] == ["1", "3"]


def test_first_and_index_select_one_element() -> None:
    patch = _patch(
        _operation("delete", "Observation.component.first().code"),
        _operation("replace", "Observation.component[1].code.text", value=("valueString", "B")),
    )
    result = apply_fhir_patch(OBSERVATION, patch)
    assert result["component"] == [
        {"valueString": "1"},
        {"code": {"text": "B"}, "valueString": "2"},
    ]


def test_several_matches_are_refused_and_named() -> None:
    path = "Observation.component.code"
    with pytest.raises(PatchError) as raised:
        apply_fhir_patch(
            OBSERVATION, _patch(_operation("replace", path, value=("valueString", "x")))
        )
    assert raised.value.expression == path
    with pytest.raises(PatchError):
        apply_fhir_patch(OBSERVATION, _patch(_operation("delete", path)))


def test_delete_of_nothing_is_a_no_op_but_replace_of_nothing_fails() -> None:
    assert (
        apply_fhir_patch(OBSERVATION, _patch(_operation("delete", "Observation.issued")))
        == OBSERVATION
    )
    with pytest.raises(PatchError, match=re.escape("No content found at Observation.issued")):
        apply_fhir_patch(
            OBSERVATION,
            _patch(_operation("replace", "Observation.issued", value=("valueInstant", "x"))),
        )


def test_add_choice_and_refuse_a_second_value() -> None:
    patient = {"resourceType": "Patient"}
    added = apply_fhir_patch(
        patient,
        _patch(
            _operation(
                "add", "Patient", name=("valueString", "deceased"), value=("valueBoolean", True)
            )
        ),
    )
    assert added == {"resourceType": "Patient", "deceasedBoolean": True}
    again = _operation(
        "add", "Patient", name=("valueString", "deceased"), value=("valueDateTime", "2020-01-01")
    )
    with pytest.raises(PatchError, match="already has 'deceasedBoolean'"):
        apply_fhir_patch(added, _patch(again))


def test_unknown_elements_and_operations_are_refused() -> None:
    with pytest.raises(PatchError, match="no element 'colour'"):
        apply_fhir_patch(OBSERVATION, _patch(_operation("delete", "Observation.colour")))
    with pytest.raises(PatchError, match="Unknown FHIRPath Patch operation type 'copy'"):
        apply_fhir_patch(OBSERVATION, _patch(_operation("copy", "Observation.status")))
    with pytest.raises(PatchError, match="Unsupported path segment"):
        apply_fhir_patch(OBSERVATION, _patch(_operation("delete", "Observation.component.tail()")))


def test_list_indexes_are_checked() -> None:
    insert = _operation(
        "insert",
        "Observation.component",
        index=("valueInteger", 3),
        value=("part", [{"name": "valueString", "valueString": "x"}]),
    )
    with pytest.raises(PatchError, match=re.escape("index 3 is outside 0..2")):
        apply_fhir_patch(OBSERVATION, _patch(insert))
    move = _operation(
        "move", "Observation.component", source=("valueInteger", 2), destination=("valueInteger", 0)
    )
    with pytest.raises(PatchError, match=re.escape("source 2 is outside 0..1")):
        apply_fhir_patch(OBSERVATION, _patch(move))


def test_deleting_a_repeated_primitive_keeps_its_extensions_aligned() -> None:
    extension = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    patient = {
        "resourceType": "Patient",
        "name": [{"given": ["Ann", "Bea", "Cy"], "_given": [None, None, extension]}],
    }
    result = apply_fhir_patch(patient, _patch(_operation("delete", "Patient.name.given[1]")))
    assert result["name"] == [{"given": ["Ann", "Cy"], "_given": [None, extension]}]


@pytest.mark.parametrize(
    "parameters",
    [
        {"resourceType": "Patient"},
        {"resourceType": "Parameters", "parameter": ["add"]},
        {"resourceType": "Parameters", "parameter": [{"name": "op", "part": []}]},
        _patch({"name": "operation", "part": [{"name": "type", "valueCode": "delete"}]}),
        _patch(_operation("delete", "Observation.component.where(code.text = )")),
        _patch(
            _operation("add", "Observation", name=("valueInteger", 1), value=("valueString", "x"))
        ),
    ],
    ids=[
        "not-parameters",
        "parameter-not-object",
        "not-operation",
        "no-path",
        "bad-where",
        "bad-name",
    ],
)
def test_malformed_fhir_patches_raise_patch_error(parameters: dict[str, Any]) -> None:
    with pytest.raises(PatchError):
        apply_fhir_patch(OBSERVATION, parameters)
