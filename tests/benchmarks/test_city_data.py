"""The city data set of benchmarks/city_data.py: re-identified copies of Synthea patient bundles
are the same for the same seed, carry no id, identifier or name of the original, still
reference within themselves and the master bundles, and load with the counts they announce."""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import re
import sys
from collections import Counter
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import func, select

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.bulk_import import run_import
from cityhealth.fhir.chinese import has_han
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.schema import resource

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UNRESOLVED = re.compile(r'"reference":"(urn:uuid:|[A-Z][A-Za-z]+\?)')
BUNDLES, LONE = 3, 5


def _load_city_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("city_data", BENCHMARKS / "city_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["city_data"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


city_data = _load_city_data()


def read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gzip.decompress(path.read_bytes()))
    return data


def copied(out: Path, copy: int, lone: bool) -> list[Path]:
    """The bundles of a copy: made from Synthea patient bundles, or of lone patients."""
    paths = sorted(city_data.copy_dir(out, copy).glob("*.json.gz"))
    return [p for p in paths if p.name.startswith("patients-") == lone]


@pytest.fixture(scope="module")
def source(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The master bundles and the three smallest patient bundles, so that the tests stay quick."""
    synthea = shared / "data" / "synthea-r4"
    folder = tmp_path_factory.mktemp("synthea-small")
    patients = sorted(
        (f for f in synthea.glob("*.json.gz") if f.name not in city_data.MASTER_FILES),
        key=lambda f: f.stat().st_size,
    )
    for path in [*(synthea / name for name in city_data.MASTER_FILES), *patients[:BUNDLES]]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def spec(source: Path) -> Any:
    return city_data.Spec(seed=7, copies=2, lone_patients=LONE, source=source)


@pytest.fixture(scope="module")
def generated(spec: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("city")
    city_data.generate(spec, out, workers=1)
    return out


def originals(spec: Any) -> list[dict[str, Any]]:
    return [read(path) for path in spec.patient_files()]


def test_the_same_seed_gives_the_same_files(spec: Any, generated: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    city_data.generate(spec, again, workers=1)
    first = sorted(p.relative_to(generated) for p in generated.rglob("*.json.gz"))
    second = sorted(p.relative_to(again) for p in again.rglob("*.json.gz"))
    assert first == second and len(first) == 2 * (BUNDLES + 1)
    assert all((generated / p).read_bytes() == (again / p).read_bytes() for p in first)
    other = city_data.Spec(seed=8, copies=1, lone_patients=LONE, source=spec.source)
    city_data.generate(other, tmp_path / "other", workers=1)
    assert {p.name for p in (tmp_path / "other" / "c01").glob("*.json.gz")} != {
        p.name for p in (generated / "c01").glob("*.json.gz")
    }


def test_copies_get_new_ids_and_identifiers_and_keep_their_references(
    spec: Any, generated: Path
) -> None:
    masters = {
        u
        for path in city_data.master_paths(spec.source)
        for u in UUID.findall(gzip.decompress(path.read_bytes()).decode())
    }
    old_uuids: set[str] = set()
    old_identifiers: set[tuple[str, str]] = set()
    old_conditional: Counter[str] = Counter()
    for bundle in originals(spec):
        text = json.dumps(bundle)
        old_uuids |= set(UUID.findall(text)) - masters
        old_conditional.update(re.findall(r'"reference": "([A-Z][A-Za-z]+\?[^"]+)"', text))
        for entry in bundle["entry"]:
            for identifier in entry["resource"].get("identifier", []):
                old_identifiers.add((identifier["system"], identifier["value"]))
    placeholders = {i for i in old_identifiers if i[0].endswith("claim-group")}
    seen_identifiers: Counter[tuple[str, str]] = Counter()
    for copy in (1, 2):
        conditional: Counter[str] = Counter()
        for path in sorted(city_data.copy_dir(generated, copy).glob("*.json.gz")):
            bundle = read(path)
            text = json.dumps(bundle)
            assert not set(UUID.findall(text)) & old_uuids
            full_urls = {e["fullUrl"] for e in bundle["entry"]}
            references = re.findall(r'"reference": "([^"]+)"', text)
            assert path.name.startswith("patients-") or "urn:uuid:" in "".join(references)
            assert all(r in full_urls for r in references if r.startswith("urn:uuid:"))
            conditional.update(r for r in references if "?" in r)
            for entry in bundle["entry"]:
                for identifier in entry["resource"].get("identifier", []):
                    key = (identifier["system"], identifier["value"])
                    seen_identifiers[key] += 1
                    assert key not in old_identifiers - placeholders
        # Each copy points at the master bundles exactly as the original does.
        assert conditional == old_conditional
    repeated = [k for k, n in seen_identifiers.items() if n > 1 and k not in placeholders]
    assert repeated == []


def test_patients_get_chinese_names_and_shifted_birth_dates(spec: Any, generated: Path) -> None:
    by_family = {
        b["entry"][0]["resource"]["name"][0]["family"]: b["entry"][0]["resource"]
        for b in originals(spec)
    }
    lone = [e["resource"] for p in copied(generated, 1, lone=True) for e in read(p)["entry"]]
    assert len(lone) == LONE
    bundles = [read(p) for p in copied(generated, 1, lone=False)]
    assert len(bundles) == BUNDLES
    for patient in [*lone, *(b["entry"][0]["resource"] for b in bundles)]:
        official, nickname = patient["name"]
        assert official["use"] == "official" and has_han(official["text"])
        assert official["family"] in city_data.SURNAMES
        assert 1 <= len(official["given"][0]) <= 2
        assert official["text"] == official["family"] + official["given"][0]
        assert nickname["use"] == "nickname" and nickname["family"] in by_family
    for bundle in bundles:
        patient = bundle["entry"][0]["resource"]
        original = by_family[patient["name"][1]["family"]]
        born = date.fromisoformat(patient["birthDate"])
        assert 1 <= abs((born - date.fromisoformat(original["birthDate"])).days) <= 10
        # The old name survives only as the nickname: displays and notes use the new one.
        rest = json.dumps(bundle["entry"][1:], ensure_ascii=False)
        assert all(name["family"] not in rest for name in original["name"])
        assert patient["name"][0]["text"] in rest
        attachments = [
            *(c["attachment"] for e in bundle["entry"] for c in e["resource"].get("content", [])),
            *(a for e in bundle["entry"] for a in e["resource"].get("presentedForm", [])),
        ]
        notes = [base64.b64decode(a["data"]).decode() for a in attachments if "data" in a]
        assert notes
        assert all(original["name"][0]["given"][0] not in note for note in notes)


def _counts(engine: FhirEngine) -> Counter[str]:
    query = (
        select(resource.c.type, func.count())
        .where(resource.c.deleted.is_(False))
        .group_by(resource.c.type)
    )
    with engine.db.read() as conn:
        return Counter({rtype: n for rtype, n in conn.execute(query)})


@pytest.mark.slow
def test_a_copy_loads_with_its_references_resolved(
    engine: FhirEngine, spec: Any, generated: Path
) -> None:
    before = _counts(engine)
    report = run_import(engine, city_data.import_paths(generated, range(1, 2), spec.source))
    assert report.failures == []
    expected = city_data.expected_counts(generated, range(1, 2), spec.source)
    assert _counts(engine) - before == expected
    assert report.resources == sum(expected.values())
    with engine.db.read() as conn:
        bodies = conn.scalars(select(resource.c.body).where(resource.c.deleted.is_(False)))
        assert [b for b in bodies if UNRESOLVED.search(b)] == []
    bundle = read(copied(generated, 1, lone=False)[0])
    patient = bundle["entry"][0]["resource"]
    identifier = next(i for i in patient["identifier"] if i["system"].endswith("synthea"))
    found = engine.search(
        SYSTEM,
        engine.parse_search(
            "Patient", [("identifier", f"{identifier['system']}|{identifier['value']}")]
        ),
    ).matches
    assert len(found) == 1
    by_name = engine.search(
        SYSTEM, engine.parse_search("Patient", [("name", patient["name"][0]["text"])])
    ).matches
    assert found[0].id in {hit.id for hit in by_name}
    observations = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    request = engine.parse_search("Observation", [("patient", found[0].id), ("_count", "1000")])
    assert len(engine.search(SYSTEM, request).matches) == observations
