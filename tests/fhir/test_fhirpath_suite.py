"""The official FHIRPath test suite (R4 copy) through `cityhealth.fhir.fhirpath.evaluate`.

Every test runs. A failure is excused only for tests that exercise what the search
indexer never evaluates (functions listed in UNUSED_FUNCTIONS, or tests named in
UNUSED_FEATURES); everything else must pass.
"""

from __future__ import annotations

import copy
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fhir_xml import load_resource

from cityhealth.fhir.fhirpath import evaluate

SHARED = Path(os.environ.get("CITYHEALTH_SHARED") or Path(__file__).resolve().parents[3] / "shared")
SUITE_DIR = SHARED / "data" / "fhir-test-cases" / "fhirpath"
SUITE_FILE = SUITE_DIR / "tests-fhir-r4.xml"

#: Functions no search parameter expression calls (the R4 expressions call only where,
#: resolve, as, exists, plus extension/ofType/first in profiles); a failing test that
#: calls one of them is an expected failure.
UNUSED_FUNCTIONS = {
    "toQuantity": "quantity conversion of strings; search reads Quantity elements",
    "toString": "string rendering of literals; search reads strings as stored",
    "subsetOf": "collection set comparison",
    "sort": "ordering (FHIRPath 2.1); search does not order in FHIRPath",
    "iif": "conditional expressions",
    "single": "singleton assertion",
    "indexOf": "string search with an empty argument",
    "startsWith": "prefix test; string prefix matching is done in SQL",
    "replace": "string rewriting",
    "replaceMatches": "regex rewriting",
    "matchesFull": "anchored regex (FHIRPath 2.1)",
    "escape": "HTML/JSON escaping (FHIRPath 2.1)",
    "unescape": "HTML/JSON unescaping (FHIRPath 2.1)",
    "conformsTo": "profile validation inside FHIRPath",
    "lowBoundary": "precision boundaries (FHIRPath 2.1)",
    "highBoundary": "precision boundaries (FHIRPath 2.1)",
    "comparable": "UCUM unit comparability",
    "precision": "precision of a value (FHIRPath 2.1)",
    "hasValue": "primitive value presence (FHIR extension function)",
    "round": "arithmetic",
    "abs": "arithmetic on quantities",
    "now": "clock-dependent date comparison",
}

_STRICT = (
    "strict-mode semantic check against the model; search expressions are the valid official ones"
)
_SYSTEM_TYPE = "System type test of a literal; search tests FHIR types of resource content only"
_DATE_EQUALITY = "date/time equality across precisions and zones; search compares dates in SQL"
_DATE_ARITHMETIC = "date arithmetic with calendar durations"
_QUANTITY = "Quantity arithmetic and comparison with UCUM conversion"
_EQUIVALENCE = "`~` equivalence of collections"
_PRECEDENCE = "precedence of unparenthesised `is` (every official `as`/`is` is in parentheses)"
#: Failing tests of features the indexer never evaluates, by test name.
UNUSED_FEATURES = {
    "testComment8": "an unterminated comment must be a syntax error; search expressions are valid",
    "testSimpleFail": _STRICT,
    "testSimpleWithWrongContext": _STRICT,
    "testPolymorphismB": _STRICT,
    "testPolymorphismAsB": _STRICT,
    "testDollarOrderNotAllowed": _STRICT,
    "testPolymorphicsB": _STRICT,
    "testLiteralDateYear": _SYSTEM_TYPE,
    "testLiteralDateMonth": _SYSTEM_TYPE,
    "testLiteralDateDay": _SYSTEM_TYPE,
    "testLiteralDateTimeYear": _SYSTEM_TYPE,
    "testLiteralDateTimeMonth": _SYSTEM_TYPE,
    "testLiteralDateTimeDay": _SYSTEM_TYPE,
    "testDecimalLiteralIsDecimal": _SYSTEM_TYPE,
    "testLiteralTimeUTC": "a zoned time literal must be rejected; search has no time literals",
    "testLiteralTimeTimezoneOffset": "a time literal with a zone must be rejected",
    "testDateNotEqualTimezoneOffsetBefore": _DATE_EQUALITY,
    "testDateNotEqualTimezoneOffsetAfter": _DATE_EQUALITY,
    "testDateNotEqualUTC": _DATE_EQUALITY,
    "testEquality23": _DATE_EQUALITY,
    "testNEquality17": _DATE_EQUALITY,
    "testNotInvalid": "not() of several items must raise; search applies it to singletons",
    "testQuantity7": _QUANTITY,
    "testQuantity8": _QUANTITY,
    "testQuantity9": _QUANTITY,
    "testQuantity10": _QUANTITY,
    "testQuantity11": _QUANTITY,
    "testLessThan22": _QUANTITY,
    "testLessOrEqual22": _QUANTITY,
    "testGreatorOrEqual22": _QUANTITY,
    "testGreaterThan22": _QUANTITY,
    "testEquivalent21": _EQUIVALENCE,
    "testEquivalent23-2": _EQUIVALENCE,
    "testNotEquivalent21": _EQUIVALENCE,
    **{f"testPlusDate{n}": _DATE_ARITHMETIC for n in (3, 4, 5, 6, 7, 8, 18, 19, 20, 21, 22)},
    "testMinus5": _DATE_ARITHMETIC,
    "testPrecedence3": _PRECEDENCE,
    "testPrecedence4": _PRECEDENCE,
    "from-zulip-1": "`and` with a non-Boolean operand",
    "testFHIRPathAsFunction11": "`as string` on a code; search casts choice elements, exact types",
    "testFHIRPathAsFunction16": "`ofType(string)` on a code; search casts choice elements",
    "testFHIRPathAsFunction23": "an unknown type name must raise; search names real types",
    "testFHIRPathAsFunction24": "an unknown type name must raise; search names real types",
}


@dataclass(frozen=True)
class SuiteCase:
    name: str
    inputfile: str | None
    expression: str
    invalid: str | None
    predicate: bool
    ordered: bool
    outputs: tuple[tuple[str | None, str], ...]


def _read_suite() -> list[SuiteCase]:
    cases = []
    seen: Counter[str] = Counter()
    for test in ET.parse(SUITE_FILE).getroot().iter("test"):
        expression = test.find("expression")
        assert expression is not None
        name = test.get("name", "unnamed")
        seen[name] += 1
        cases.append(
            SuiteCase(
                # The suite reuses a name once (testEquivalent23); ids must stay unique.
                name=name if seen[name] == 1 else f"{name}-{seen[name]}",
                inputfile=test.get("inputfile"),
                expression=expression.text or "",
                invalid=expression.get("invalid"),
                predicate=test.get("predicate") == "true",
                ordered=test.get("ordered") != "false",
                outputs=tuple((o.get("type"), o.text or "") for o in test.iter("output")),
            )
        )
    return cases


CASES = _read_suite()


@cache
def _input(filename: str) -> dict[str, Any]:
    return load_resource(SUITE_DIR / filename)


def _as_text(value: Any) -> str:
    return str(value)


def _matches(actual: Any, kind: str | None, expected: str) -> bool:
    if kind == "boolean":
        return isinstance(actual, bool) and str(actual).lower() == expected
    if kind == "integer":
        return type(actual) is int and actual == int(expected)
    if kind == "decimal":
        try:
            return not isinstance(actual, bool) and Decimal(str(actual)) == Decimal(expected)
        except InvalidOperation:
            return False
    if kind in ("date", "dateTime", "time"):
        return "@" + str(actual) == expected or "@T" + str(actual) == expected
    return str(actual) == expected


def _same(actual: list[Any], case: SuiteCase) -> bool:
    if len(actual) != len(case.outputs):
        return False
    if case.ordered:
        return all(_matches(a, k, e) for a, (k, e) in zip(actual, case.outputs, strict=True))
    remaining = list(case.outputs)
    for value in actual:
        match = next((o for o in remaining if _matches(value, *o)), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


def run_case(case: SuiteCase) -> str | None:
    """None when the engine gives the expected answer, else what went wrong."""
    resource = copy.deepcopy(_input(case.inputfile)) if case.inputfile else {}
    try:
        result = evaluate(resource, case.expression)
    except Exception as error:
        return None if case.invalid else f"raised {type(error).__name__}: {error}"
    if case.invalid:
        return f"expected a {case.invalid} error, got {result!r}"
    if case.predicate:
        result = [bool(result)]
    if _same(result, case):
        return None
    return f"got {result!r}, expected {list(case.outputs)!r}"


_STRING_LITERAL = re.compile(r"'(?:\\.|[^'\\])*'")
_FUNCTION_CALL = re.compile(r"([A-Za-z]\w*)\s*\(")


def _functions(expression: str) -> set[str]:
    return set(_FUNCTION_CALL.findall(_STRING_LITERAL.sub("''", expression)))


def excuse(case: SuiteCase) -> str | None:
    """Why a failure of this test does not concern the indexer (None: it must pass)."""
    if case.name in UNUSED_FEATURES:
        return UNUSED_FEATURES[case.name]
    unused = sorted(_functions(case.expression) & UNUSED_FUNCTIONS.keys())
    return "; ".join(f"{name}(): {UNUSED_FUNCTIONS[name]}" for name in unused) or None


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_fhirpath_case(case: SuiteCase) -> None:
    problem = run_case(case)
    if problem is not None:
        reason = excuse(case)
        if reason is not None:
            pytest.xfail(f"{reason} ({problem})")
    assert problem is None, f"{case.expression.strip()}: {problem}"


def test_fhirpath_suite_pass_rate(capsys: pytest.CaptureFixture[str]) -> None:
    problems = {case.name: run_case(case) for case in CASES}
    failed = [case for case in CASES if problems[case.name] is not None]
    excused = [case for case in failed if excuse(case) is not None]
    passed = len(CASES) - len(failed)
    with capsys.disabled():
        print(
            f"\nFHIRPath suite: {passed} passed / {len(CASES)} total "
            f"({len(excused)} skipped by name)"
        )
    assert len(CASES) == 935  # 937 <test> elements, two of them commented out
    assert [case.name for case in failed if case not in excused] == []
    # Every entry of the skip lists must still excuse a failure, so the lists only shrink.
    failing_names = {case.name for case in failed}
    assert sorted(UNUSED_FEATURES.keys() - failing_names) == []
    used = set().union(*(_functions(case.expression) for case in excused))
    assert sorted(UNUSED_FUNCTIONS.keys() - used) == []


OBSERVATION = {
    "resourceType": "Observation",
    "contained": [{"resourceType": "Device", "id": "d1"}],
    "subject": {"reference": "Patient/p1"},
    "performer": [
        {"reference": "http://example.org/fhir/Practitioner/7/_history/2"},
        {"reference": "#d1"},
        {"display": "no reference"},
    ],
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Observation.subject.where(resolve() is Patient).reference", ["Patient/p1"]),
        ("Observation.subject.where(resolve() is Group)", []),
        (
            "Observation.performer.where(resolve() is Practitioner).reference",
            ["http://example.org/fhir/Practitioner/7/_history/2"],
        ),
        ("Observation.performer.resolve().ofType(Device).id", ["d1"]),
        ("Observation.performer.resolve().count()", [2]),
        ("%resource.contained.id", ["d1"]),
    ],
)
def test_resolve_types_references_by_their_target(expression: str, expected: list[Any]) -> None:
    assert evaluate(OBSERVATION, expression) == expected


def test_variables_are_passed_to_the_expression() -> None:
    assert evaluate(OBSERVATION, "%limit + 1", {"limit": 2}) == [3]
