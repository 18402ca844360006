"""Every official R4 example and definition resource passes validation (the known-bad ones fail)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from cityhealth.fhir.definitions import get_definitions
from cityhealth.fhir.validation import Issue, Validator

DEFINITION_BUNDLES = ("search-parameters", "profiles-resources", "profiles-types", "valuesets")

#: Examples that break R4 itself: every error they get is a missing 1..1 element matching the
#: pattern. ImplementationGuide-fhir is the package's own build manifest, written without the
#: name and status that ImplementationGuide requires.
INVALID_EXAMPLES = {
    "Questionnaire-qs1.json": r"Questionnaire(\.item\[\d+\])+\.linkId",
    "ImplementationGuide-fhir.json": r"ImplementationGuide\.(name|status)",
}


@pytest.fixture(scope="module")
def shared() -> Path:
    default = Path(__file__).resolve().parents[2].parent / "shared"
    return Path(os.environ.get("CITYHEALTH_SHARED", default))


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(get_definitions())


def _errors(validator: Validator, resource: Any) -> list[Issue]:
    return [i for i in validator.validate(resource) if i.severity == "error"]


def _report(failures: dict[str, list[Issue]]) -> str:
    lines = [f"{len(failures)} resources rejected:"]
    for name, issues in sorted(failures.items())[:40]:
        lines += [f"  {name}: {i.expression}: {i.diagnostics}" for i in issues[:3]]
    return "\n".join(lines)


def test_every_example_is_valid(shared: Path, validator: Validator) -> None:
    files = sorted((shared / "data" / "fhir-r4-examples").glob("*.json"))
    assert len(files) == 862
    failures = {}
    for path in files:
        if path.name in INVALID_EXAMPLES:
            continue
        issues = _errors(validator, orjson.loads(path.read_bytes()))
        if issues:
            failures[path.name] = issues
    assert not failures, _report(failures)


@pytest.mark.parametrize(("name", "pattern"), sorted(INVALID_EXAMPLES.items()))
def test_examples_that_break_r4_are_rejected(
    shared: Path, validator: Validator, name: str, pattern: str
) -> None:
    path = shared / "data" / "fhir-r4-examples" / name
    issues = _errors(validator, orjson.loads(path.read_bytes()))
    assert issues
    for issue in issues:
        assert issue.code == "required"
        assert re.fullmatch(pattern, issue.expression), issue


@pytest.mark.parametrize("bundle", DEFINITION_BUNDLES)
def test_every_definition_resource_is_valid(
    shared: Path, validator: Validator, bundle: str
) -> None:
    entries = orjson.loads((shared / "fhir-r4" / f"{bundle}.json").read_bytes())["entry"]
    failures = {}
    for entry in entries:
        resource = entry["resource"]
        issues = _errors(validator, resource)
        if issues:
            failures[f"{resource['resourceType']}/{resource['id']}"] = issues
    assert entries
    assert not failures, _report(failures)


def test_definition_bundles_are_valid_as_bundles(shared: Path, validator: Validator) -> None:
    bundle = orjson.loads((shared / "fhir-r4" / "profiles-types.json").read_bytes())
    assert _errors(validator, bundle) == []
