"""Every official R4 resource (862 example files and the 2,807 entries of the four definition
bundles) is accepted and round-trips: store → read → equal apart from meta, on both databases.

Two examples break R4 itself and must be rejected, naming the element: `Questionnaire-qs1`
(items without linkId) and `ImplementationGuide-fhir` (the package manifest, without the
required name and status).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import FhirError

BUNDLES = (
    "search-parameters.json",
    "profiles-resources.json",
    "profiles-types.json",
    "valuesets.json",
)
INVALID = {
    "Questionnaire-qs1.json": "Questionnaire.item[0].item[0].linkId",
    "ImplementationGuide-fhir.json": "ImplementationGuide.name",
}


def official_resources(shared: Path) -> list[tuple[str, dict[str, Any]]]:
    found = [
        (path.name, orjson.loads(path.read_bytes()))
        for path in sorted((shared / "data" / "fhir-r4-examples").glob("*.json"))
    ]
    for name in BUNDLES:
        bundle = orjson.loads((shared / "fhir-r4" / name).read_bytes())
        found += [(f"{name}#{i}", e["resource"]) for i, e in enumerate(bundle["entry"])]
    return found


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    copy = dict(resource)
    meta = {k: v for k, v in copy.pop("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        copy["meta"] = meta
    return copy


def test_every_official_resource_round_trips(engine: FhirEngine, shared: Path) -> None:
    resources = official_resources(shared)
    assert len(resources) == 862 + 2807
    failures, rejected = [], {}
    for name, original in resources:
        rtype = original["resourceType"]
        try:
            if "id" in original:
                stored = engine.update(SYSTEM, rtype, original["id"], dict(original)).stored
            else:
                stored = engine.repository.create(SYSTEM, dict(original), rtype).stored
        except FhirError as error:
            rejected[name] = [e for issue in error.issues for e in issue.expression]
            continue
        read = engine.repository.read(SYSTEM, rtype, stored.id)
        assert read.body is not None
        back = without_server_meta(orjson.loads(read.body))
        expected = without_server_meta(original)
        expected.setdefault("id", stored.id)
        if back != expected:
            failures.append(name)
    assert failures == []
    assert set(rejected) == set(INVALID), rejected
    for name, expression in INVALID.items():
        assert expression in rejected[name]
    assert len(resources) - len(rejected) == 3667
