"""Search-index extraction against the official R4 examples and search parameters."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from cityhealth.fhir.datetimes import MAX_US, MIN_US, date_range
from cityhealth.fhir.definitions import (
    COMPARTMENT_FILE,
    EXTRA_TERMINOLOGY_FILES,
    RESOURCES_FILE,
    SEARCH_PARAMS_FILE,
    TYPES_FILE,
    VALUESETS_FILE,
    Definitions,
    SearchParam,
    load_from_dir,
)
from cityhealth.fhir.index_strings import MAX_FOLDED
from cityhealth.fhir.index_values import parse_reference
from cityhealth.fhir.indexing import Indexer, IndexRows
from cityhealth.fhir.numbers import number_range

SHARED = Path(os.environ.get("CITYHEALTH_SHARED") or Path(__file__).resolve().parents[3] / "shared")
EXAMPLES = SHARED / "data" / "fhir-r4-examples"
ROW_KINDS = ("token", "string", "date", "number", "quantity", "reference", "uri")


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> Definitions:
    """The R4 definitions, read from the shared copies laid out as the package names them."""
    package = tmp_path_factory.mktemp("r4-package")
    sources = {
        SEARCH_PARAMS_FILE: SHARED / "fhir-r4" / "search-parameters.json",
        RESOURCES_FILE: SHARED / "fhir-r4" / "profiles-resources.json",
        TYPES_FILE: SHARED / "fhir-r4" / "profiles-types.json",
        VALUESETS_FILE: SHARED / "fhir-r4" / "valuesets.json",
        COMPARTMENT_FILE: SHARED / "fhir-r4" / "compartmentdefinition-patient.json",
        **{name: EXAMPLES / name for name in EXTRA_TERMINOLOGY_FILES},
    }
    for name, source in sources.items():
        (package / name).symlink_to(source)
    return load_from_dir(package)


@pytest.fixture(scope="module")
def indexer(definitions: Definitions) -> Indexer:
    return Indexer(definitions)


def example(name: str) -> dict[str, Any]:
    resource: dict[str, Any] = orjson.loads((EXAMPLES / f"{name}.json").read_bytes())
    return resource


def of(rows: list[Any], code: str) -> list[Any]:
    return [row for row in rows if row[0] == code]


# --- official examples -------------------------------------------------------------------


def test_patient_example(indexer: Indexer) -> None:
    rows = indexer.index(example("Patient-example"))
    assert ("family", "chalmers", "Chalmers") in rows.string
    assert ("name", "chalmers", "Chalmers") in rows.string
    assert ("given", "jim", "Jim") in rows.string
    assert of(rows.date, "birthdate") == [("birthdate", *date_range("1974-12-25"))]
    assert of(rows.token, "gender") == [
        ("gender", "http://hl7.org/fhir/administrative-gender", "male", None)
    ]
    assert ("identifier", "urn:oid:1.2.36.146.595.217.0.1", "12345", None) in rows.token
    assert of(rows.reference, "organization") == [("organization", "Organization", "1", None)]
    assert ("active", None, "true", None) in rows.token
    assert ("deceased", None, "false", None) in rows.token
    assert ("phone", None, "(03) 5555 6473", None) in rows.token
    assert not of(rows.token, "email")  # the expression filters telecom by system
    assert ("address-city", "pleasantville", "PleasantVille") in rows.string
    assert ("address-use", "http://hl7.org/fhir/address-use", "home", None) in rows.token


def test_observation_example(indexer: Indexer) -> None:
    rows = indexer.index(example("Observation-example"))
    # display text is folded (case, width) so that :text matches regardless of case
    assert ("code", "http://loinc.org", "29463-7", "body weight") in rows.token
    assert of(rows.quantity, "value-quantity") == [
        ("value-quantity", "http://unitsofmeasure.org", "[lb_av]", "lbs", 185.0, 184.5, 185.5)
    ]
    assert of(rows.reference, "subject") == [("subject", "Patient", "example", None)]
    assert of(rows.reference, "patient") == [("patient", "Patient", "example", None)]
    assert of(rows.date, "date") == [("date", *date_range("2016-03-28"))]
    assert ("status", "http://hl7.org/fhir/observation-status", "final", None) in rows.token


def test_patient_parameter_keeps_only_patient_references(indexer: Indexer) -> None:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "subject": {"reference": "Group/herd"},
        "performer": [{"reference": "Patient/p1"}, {"reference": "Practitioner/d1"}],
    }
    rows = indexer.index(observation)
    assert of(rows.reference, "subject") == [("subject", "Group", "herd", None)]
    assert not of(rows.reference, "patient")
    assert set(of(rows.reference, "performer")) == {
        ("performer", "Patient", "p1", None),
        ("performer", "Practitioner", "d1", None),
    }
    assert ("code", None, None, "weight") in rows.token


def test_open_period_runs_to_the_end_of_time(indexer: Indexer) -> None:
    rows = indexer.index(example("Encounter-emerg"))
    start = date_range("2017-02-01T07:15:00+10:00")[0]
    assert of(rows.date, "date") == [("date", start, MAX_US)]
    assert ("location-period", start, date_range("2017-02-01T08:45:00+10:00")[1]) in rows.date


def test_period_without_start_begins_at_the_start_of_time(indexer: Indexer) -> None:
    rows = indexer.index(example("CarePlan-example"))
    assert of(rows.date, "date") == [("date", MIN_US, date_range("2017-06-01")[1])]


def test_money(indexer: Indexer) -> None:
    rows = indexer.index(example("Invoice-example"))
    assert of(rows.quantity, "totalnet") == [("totalnet", None, "EUR", None, 40.0, 39.5, 40.5)]


def test_decimal_precision(indexer: Indexer) -> None:
    rows = indexer.index(example("RiskAssessment-cardiac"))
    [(_, value, low, high)] = of(rows.number, "probability")
    assert value == 0.02
    assert low == pytest.approx(0.015) and high == pytest.approx(0.025)


def test_canonical_and_uri(indexer: Indexer) -> None:
    rows = indexer.index(example("ConceptMap-101"))
    assert ("url", "http://hl7.org/fhir/ConceptMap/101") in rows.uri
    assert ("source-uri", None, None, "http://hl7.org/fhir/ValueSet/address-use") in rows.reference
    # `as uri` also selects a canonical, which is a specialisation of uri.
    rows = indexer.index(example("ConceptMap-102"))
    assert (
        "source-uri",
        None,
        None,
        "http://terminology.hl7.org/ValueSet/v2-0487",
    ) in rows.reference


def test_meta_tag_security_profile_source(indexer: Indexer) -> None:
    rows = indexer.index(example("Condition-f202"))
    assert of(rows.token, "_security") == [
        ("_security", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "TBOO", "taboo")
    ]
    patient = {
        "resourceType": "Patient",
        "meta": {
            "tag": [{"system": "http://example.org/flags", "code": "vip", "display": "VIP"}],
            "profile": ["http://example.org/StructureDefinition/resident|2.1"],
            "security": [{"system": "http://example.org/sec", "code": "R"}],
            "source": "http://hospital.example/ehr#1",
        },
    }
    rows = indexer.index(patient)
    assert set(of(rows.uri, "_profile")) == {
        ("_profile", "http://example.org/StructureDefinition/resident|2.1"),
        ("_profile", "http://example.org/StructureDefinition/resident"),
    }
    assert of(rows.uri, "_source") == [("_source", "http://hospital.example/ehr#1")]
    assert of(rows.token, "_security") == [("_security", "http://example.org/sec", "R", None)]
    assert of(rows.token, "_tag") == [("_tag", "http://example.org/flags", "vip", "vip")]


def test_contained_references_are_not_indexed(indexer: Indexer) -> None:
    care_plan = example("CarePlan-example")
    assert care_plan["addresses"] == [{"reference": "#p1", "display": "obesity"}]
    rows = indexer.index(care_plan)
    assert not of(rows.reference, "condition")
    assert ("patient", "Patient", "example", None) in rows.reference


def test_bundle_first_entry_is_its_composition(indexer: Indexer) -> None:
    rows = indexer.index(example("Bundle-101"))
    assert of(rows.reference, "composition") == [("composition", "DiagnosticReport", "101", None)]


def test_choice_without_type_indexes_the_present_type(indexer: Indexer) -> None:
    rows = indexer.index(example("Condition-example"))
    assert of(rows.date, "onset-date") == [("onset-date", *date_range("2012-05-24"))]
    assert ("code", None, None, "burnt ear") in rows.token


def test_no_duplicate_rows(indexer: Indexer) -> None:
    rows = indexer.index(example("Observation-example"))
    for kind in ROW_KINDS:
        values = getattr(rows, kind)
        assert len(values) == len(set(values)), kind
    assert len(of(rows.token, "combo-code")) == 4  # code | component.code, once each


# --- values built for the case -----------------------------------------------------------


def test_chinese_name_has_pinyin_rows(indexer: Indexer) -> None:
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "张", "given": ["三"]}],
        "address": [{"city": "中卫市", "line": ["沙坡头区 A座3号"]}],
    }
    rows = indexer.index(patient)
    names = of(rows.string, "name")
    assert ("name", "张", "张") in names
    assert ("name", "三", "三") in names
    assert ("name", "zhangsan", None) in names
    assert ("name", "zs", None) in names
    assert ("name", "张三", None) in names
    assert ("family", "zhang", None) in rows.string
    assert ("address-city", "中卫市", "中卫市") in rows.string
    assert ("address-city", "zhongweishi", None) in rows.string
    assert ("address-city", "zws", None) in rows.string


def test_long_strings_are_capped_only_in_folded_form(indexer: Indexer) -> None:
    text = "Very long description " * 30
    rows = indexer.index({"resourceType": "Organization", "name": text})
    [(_, folded, exact)] = of(rows.string, "name")
    assert len(folded) == MAX_FOLDED
    assert exact == text


def test_reference_forms(indexer: Indexer) -> None:
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "basedOn": [
            {"reference": "ServiceRequest/sr1/_history/3"},
            {"reference": "https://other.example/fhir/ServiceRequest/sr2"},
            {"reference": "urn:uuid:5f1e6e0e-7d26-4c43-b3f2-3c1a2bdbe0a0"},
            {"identifier": {"system": "http://lab.example/orders", "value": "A-17"}},
        ],
        "subject": {
            "reference": "Patient/p1",
            "identifier": {"system": "http://id.example/resident", "value": "640502"},
        },
    }
    rows = indexer.index(observation)
    assert set(of(rows.reference, "based-on")) == {
        ("based-on", "ServiceRequest", "sr1", None),
        (
            "based-on",
            "ServiceRequest",
            "sr2",
            "https://other.example/fhir/ServiceRequest/sr2",
        ),
        ("based-on", None, None, "urn:uuid:5f1e6e0e-7d26-4c43-b3f2-3c1a2bdbe0a0"),
    }
    assert ("based-on:identifier", "http://lab.example/orders", "A-17", None) in rows.token
    assert (
        "patient:identifier",
        "http://id.example/resident",
        "640502",
        None,
    ) in rows.token


def test_parse_reference() -> None:
    types = frozenset({"Patient", "Organization"})
    assert parse_reference("Patient/1", types) == ("Patient", "1", None)
    assert parse_reference("Patient/1/_history/2", types) == ("Patient", "1", None)
    assert parse_reference("http://h/fhir/Patient/1/_history/2", types) == (
        "Patient",
        "1",
        "http://h/fhir/Patient/1",
    )
    assert parse_reference("#contained", types) is None
    assert parse_reference("urn:oid:1.2.3", types) == (None, None, "urn:oid:1.2.3")
    assert parse_reference("Unknown/1", types) == (None, None, "Unknown/1")


def test_deceased(indexer: Indexer) -> None:
    for deceased, expected in [
        ({"deceasedDateTime": "2015-02-14"}, "true"),
        ({"deceasedBoolean": True}, "true"),
        ({"deceasedBoolean": False}, "false"),
        ({}, "false"),
    ]:
        rows = indexer.index({"resourceType": "Patient", **deceased})
        assert of(rows.token, "deceased") == [("deceased", None, expected, None)]


def test_range_and_age(indexer: Indexer) -> None:
    ucum = "http://unitsofmeasure.org"
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/p1"},
        "onsetRange": {"low": {"value": 40, "unit": "a", "system": ucum, "code": "a"}},
        "abatementAge": {"value": 52.5, "unit": "a", "system": ucum, "code": "a"},
    }
    rows = indexer.index(condition)
    assert of(rows.quantity, "onset-age") == [("onset-age", ucum, "a", "a", 40.0, 40.0, math.inf)]
    assert of(rows.quantity, "abatement-age") == [
        ("abatement-age", ucum, "a", "a", 52.5, 52.45, 52.55)
    ]


def test_timing_events_and_bounds(indexer: Indexer) -> None:
    care_plan = {
        "resourceType": "CarePlan",
        "status": "active",
        "intent": "plan",
        "subject": {"reference": "Patient/p1"},
        "activity": [
            {
                "detail": {
                    "status": "scheduled",
                    "scheduledTiming": {
                        "event": ["2024-03-01T08:00:00+08:00"],
                        "repeat": {"boundsPeriod": {"start": "2024-03-01", "end": "2024-03-31"}},
                    },
                }
            }
        ],
    }
    rows = indexer.index(care_plan)
    assert set(of(rows.date, "activity-date")) == {
        ("activity-date", *date_range("2024-03-01T08:00:00+08:00")),
        ("activity-date", date_range("2024-03-01")[0], date_range("2024-03-31")[1]),
    }


def test_unparsable_dates_are_skipped(indexer: Indexer) -> None:
    rows = indexer.index({"resourceType": "Patient", "birthDate": "1974-02-30"})
    assert not of(rows.date, "birthdate")


def test_unknown_resource_type_has_no_rows(indexer: Indexer) -> None:
    rows = indexer.index({"resourceType": "NotAType", "id": "x"})
    assert rows == IndexRows()


def test_number_range() -> None:
    assert number_range(100) == (100.0, 99.5, 100.5)
    assert number_range(100.0) == pytest.approx((100.0, 99.95, 100.05))
    assert number_range("100.00") == pytest.approx((100.0, 99.995, 100.005))
    assert number_range(1.5e-07) == pytest.approx((1.5e-07, 1.45e-07, 1.55e-07))
    for bad in ("abc", "nan", "inf", True):
        with pytest.raises(ValueError):
            number_range(bad)


# --- compilation and fallback ------------------------------------------------------------


def test_every_parameter_expression_compiles(indexer: Indexer) -> None:
    assert indexer.compiled > 2000
    assert indexer.fallbacks == []


def test_unsupported_expressions_fall_back_to_fhirpath(definitions: Definitions) -> None:
    official = SearchParam(
        code="official-family",
        type="string",
        resource_type="Patient",
        url="http://example.org/SearchParameter/official-family",
        expression="Patient.name.where(use = 'official' or use = 'usual').family",
    )
    params = dict(definitions.search_params)
    params["Patient"] = {**params["Patient"], official.code: official}
    indexer = Indexer(dataclasses.replace(definitions, search_params=params))
    assert indexer.fallbacks == [("Patient", official.code, official.expression)]
    rows = indexer.index(example("Patient-example"))
    assert of(rows.string, "official-family") == [("official-family", "chalmers", "Chalmers")]


# --- every official resource -------------------------------------------------------------


def test_every_example_and_search_parameter_indexes(indexer: Indexer) -> None:
    produced: Counter[str] = Counter()
    resources = [orjson.loads(path.read_bytes()) for path in sorted(EXAMPLES.glob("*.json"))]
    assert len(resources) == 862
    bundle = orjson.loads((SHARED / "fhir-r4" / "search-parameters.json").read_bytes())
    resources += [entry["resource"] for entry in bundle["entry"]]
    for resource in resources:
        rows = indexer.index(resource)
        for kind in ROW_KINDS:
            produced[kind] += len(getattr(rows, kind))
    assert all(produced[kind] > 0 for kind in ROW_KINDS), produced
    sp_rows = indexer.index(bundle["entry"][0]["resource"])
    assert of(sp_rows.uri, "url")
