"""A city-sized data set for the benchmarks, made of re-identified copies of the Synthea set.

The Synthea set in ../shared/data/synthea-r4 (120 patient bundles, 91,336 resources, plus the
hospital and practitioner bundles) is copied K times. In every copy
- each `urn:uuid:` (fullUrl, resource id, reference, and identifier values holding one) is
  replaced by a UUID derived from (seed, copy, old UUID), so references still resolve within the
  copy, while the UUIDs of the master organizations and locations, which the patient bundles
  refer to by conditional reference (`Organization?identifier=…|<uuid>`), are kept: every copy
  points at the one master set, which is loaded once;
- the Patient gets a Chinese name (seeded: common Han and Hui surnames by frequency, 1–2
  character given names by gender; Synthea's name stays as a second HumanName with use
  `nickname`), a birth date moved by 1–10 days, and new identifier values (Synthea and record
  number UUIDs, and SSN, driver's licence and passport numbers from a serial number); the
  patient's name in reference displays and in the base64 clinical notes is replaced too;
- identifiers of other resources that hold no UUID get new digits (the Blue Button claim-group
  placeholder, the same in every claim, is kept);
- `lone_patients` more Patients (without clinical data) are made from the 120 Synthea patients
  in the same way, in transaction bundles of 1,000, so that patient searches meet a city's
  number of names and not only 120 per copy.
Addresses, phone numbers and clinical content stay Synthea's.

Output: `OUT/cNN/` per copy, each with its bundles (`.json.gz`) and a `manifest.json` (resource
counts by type) written last; a complete copy is reused. The same seed gives the same bytes.

    .venv/bin/python benchmarks/city_data.py --copies 10            # ≈ 1.0 M resources
    .venv/bin/cityhealth import MASTER_HOSPITAL MASTER_PRACTITIONER OUT/c01 … OUT/c10
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import os
import random
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CITYHEALTH_SHARED", REPO.parent / "shared"))
SYNTHEA = SHARED / "data" / "synthea-r4"
MASTER_FILES = (
    "hospitalInformation1625911868739.json.gz",
    "practitionerInformation1625911868739.json.gz",
)
#: Changes to what is generated must change this, so that stale copies are made again.
GENERATOR_VERSION = 1
LONE_PER_BUNDLE = 1000
DEFAULT_SEED = 2024
DEFAULT_LONE = 10_000
_NAMESPACE = uuid.UUID("5c0f3f7e-3b0a-4c52-9d55-6c1e1d2a9b10")
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_TEXT = re.compile(_UUID.pattern.decode())
_SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
_RECORD_SYSTEM = "http://hospital.smarthealthit.org"
_SSN = "http://hl7.org/fhir/sid/us-ssn"
_DRIVERS_LICENCE = "urn:oid:2.16.840.1.113883.4.3.25"
_PASSPORT = "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber"
_MAIDEN_NAME = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
#: Identifier systems whose value is a shared placeholder, not an identity.
_SHARED_VALUES = frozenset({"https://bluebutton.cms.gov/resources/identifier/claim-group"})
#: Leading characters kept when an identifier value gets new digits (an OID keeps its root).
_KEEP_PREFIX = {"urn:ietf:rfc:3986": len("urn:oid:1.2.840.99999999.")}

# -- Chinese names -------------------------------------------------------------------------------
#: Surnames with their share of the population in ‱ (rounded, after the 2020 census ranking);
#: Hui surnames (马 白 丁 海 沙 纳 哈 穆 回 锁 喇 虎) and surnames read differently in a name
#: (曾 单 解 仇 区 查 朴 乐 覃 盖 缪) and a few compound ones are included.
SURNAMES: dict[str, int] = {
    "王": 710, "李": 700, "张": 670, "刘": 540, "陈": 450, "杨": 310, "黄": 220, "赵": 210,
    "吴": 200, "周": 190, "徐": 130, "孙": 130, "马": 120, "朱": 120, "胡": 110, "郭": 110,
    "何": 100, "林": 100, "高": 100, "罗": 90, "郑": 80, "梁": 80, "谢": 70, "宋": 60,
    "唐": 60, "许": 60, "韩": 60, "冯": 60, "邓": 60, "曹": 50, "彭": 50, "曾": 50,
    "肖": 50, "田": 50, "董": 40, "袁": 40, "潘": 40, "于": 40, "蒋": 40, "蔡": 40,
    "余": 40, "杜": 40, "叶": 40, "程": 40, "苏": 30, "魏": 30, "吕": 30, "丁": 30,
    "任": 30, "沈": 30, "姚": 30, "卢": 30, "姜": 30, "崔": 30, "钟": 30, "谭": 30,
    "陆": 30, "汪": 30, "范": 30, "金": 30, "石": 30, "廖": 30, "贾": 30, "夏": 20,
    "韦": 20, "付": 20, "方": 20, "白": 20, "邹": 20, "孟": 20, "熊": 20, "秦": 20,
    "邱": 20, "江": 20, "尹": 20, "薛": 20, "闫": 20, "段": 20, "雷": 20, "侯": 20,
    "龙": 20, "史": 20, "陶": 20, "黎": 20, "贺": 20, "顾": 20, "毛": 20, "郝": 20,
    "龚": 20, "邵": 20, "万": 20, "钱": 20, "严": 20, "覃": 10, "武": 20, "戴": 20,
    "莫": 10, "孔": 10, "向": 10, "汤": 10, "单": 5, "解": 3, "仇": 2, "区": 2, "查": 2,
    "朴": 2, "乐": 2, "盖": 1, "缪": 2, "海": 2, "沙": 2, "纳": 1, "哈": 1, "穆": 2,
    "回": 1, "锁": 1, "喇": 1, "虎": 1, "欧阳": 5, "司马": 1, "诸葛": 1, "上官": 1,
    "尉迟": 1,
}  # fmt: skip
#: Characters of given names by frequency, most common first (伟 and 芳 lead as in the census).
GIVEN_MALE = (
    "伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波宇浩凯健俊帆帅"
    "旭宁龙林欢阳建国文志晨子博轩然睿泽宏海东亮峰成家天"
)
GIVEN_FEMALE = "芳娜敏静丽艳秀英玲婷雪慧颖洁琳晶燕霞红梅兰萍欣怡佳悦思雨涵梓琪萱诗雅淑倩璐瑶月彤"
#: Share of one-character given names; the rest have two.
SINGLE_GIVEN = 0.3


def _zipf(count: int) -> list[float]:
    return [1 / (rank + 1) for rank in range(count)]


_SURNAME_LIST = list(SURNAMES)
_SURNAME_WEIGHTS = list(SURNAMES.values())
_GIVEN = {
    "male": (GIVEN_MALE, _zipf(len(GIVEN_MALE))),
    "female": (GIVEN_FEMALE, _zipf(len(GIVEN_FEMALE))),
}


def chinese_name(rng: random.Random, gender: str | None) -> tuple[str, str]:
    """(family, given): a surname by frequency and a given name of one or two characters."""
    family = rng.choices(_SURNAME_LIST, _SURNAME_WEIGHTS)[0]
    chars, weights = _GIVEN.get(gender or "", _GIVEN["male" if rng.random() < 0.5 else "female"])
    first = rng.choices(chars, weights)[0]
    if rng.random() < SINGLE_GIVEN:
        return family, first
    second = first
    while second == first:
        second = rng.choices(chars, weights)[0]
    return family, first + second


# -- what a copy is made of ----------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """What to generate: `copies` copies (numbered from 1) of the patient bundles of `source`,
    each with `lone_patients` more Patients."""

    seed: int = DEFAULT_SEED
    copies: int = 10
    lone_patients: int = DEFAULT_LONE
    source: Path = SYNTHEA

    def patient_files(self) -> list[Path]:
        return sorted(f for f in self.source.glob("*.json.gz") if f.name not in MASTER_FILES)

    def manifest_key(self, copy: int) -> dict[str, Any]:
        return {
            "generator": GENERATOR_VERSION,
            "seed": self.seed,
            "copy": copy,
            "lone_patients": self.lone_patients,
            "bundles": [f.name for f in self.patient_files()],
        }


def master_paths(source: Path = SYNTHEA) -> list[Path]:
    return [source / name for name in MASTER_FILES]


def copy_dir(out: Path, copy: int) -> Path:
    return out / f"c{copy:02d}"


def import_paths(out: Path, copies: range, source: Path = SYNTHEA) -> list[Path]:
    """What to give `cityhealth import`, in order: the master bundles once (when the range
    starts at copy 1), then one directory per copy."""
    masters = master_paths(source) if copies.start <= 1 else []
    return [*masters, *(copy_dir(out, c) for c in copies)]


def read_manifest(out: Path, copy: int) -> dict[str, Any] | None:
    path = copy_dir(out, copy) / "manifest.json"
    if not path.exists():
        return None
    manifest: dict[str, Any] = orjson.loads(path.read_bytes())
    return manifest


def expected_counts(out: Path, copies: range, source: Path = SYNTHEA) -> Counter[str]:
    """Resources by type after importing `import_paths(out, copies)` into an empty store."""
    counts: Counter[str] = Counter()
    if copies.start <= 1:
        for path in master_paths(source):
            for entry in orjson.loads(gzip.decompress(path.read_bytes()))["entry"]:
                counts[entry["resource"]["resourceType"]] += 1
    for copy in copies:
        manifest = read_manifest(out, copy)
        if manifest is None:
            raise FileNotFoundError(f"copy {copy} has not been generated in {out}")
        counts.update(manifest["resources_by_type"])
    return counts


# -- one copy of one bundle ----------------------------------------------------------------------
@lru_cache(maxsize=4)
def master_uuids(source: Path) -> frozenset[bytes]:
    """UUIDs of the master bundles: patient bundles name organizations and locations by them."""
    found: set[bytes] = set()
    for path in master_paths(source):
        found.update(_UUID.findall(gzip.decompress(path.read_bytes())))
    return frozenset(found)


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def _new_digits(value: str, keep: int, key: int) -> str:
    """The value with every digit after `keep` characters drawn from `key`."""
    digits = str(key).zfill(20)
    out, used = list(value), 0
    for i in range(keep, len(out)):
        if out[i].isdigit():
            out[i] = digits[used % len(digits)]
            used += 1
    return "".join(out)


def _gzip(data: bytes) -> bytes:
    # mtime=0 and no file name: the same input gives the same bytes.
    return gzip.compress(data, compresslevel=1, mtime=0)


class Copier:
    """Makes copy `copy` of patient bundles; a serial number (the bundle's place, then 120 +
    the lone patient's) numbers each patient of the copy."""

    def __init__(self, spec: Spec, copy: int) -> None:
        self.spec, self.copy = spec, copy
        self.keep = master_uuids(spec.source)
        # Patients of earlier copies come first, so that serial numbers differ between copies.
        self.first_serial = (copy - 1) * (len(spec.patient_files()) + spec.lone_patients)
        self._uuids: dict[bytes, bytes] = {}

    def new_uuid(self, old: str | bytes) -> str:
        text = old.decode() if isinstance(old, bytes) else old
        return str(uuid.uuid5(_NAMESPACE, f"{self.spec.seed}/{self.copy}/{text}"))

    def _swap(self, match: re.Match[bytes]) -> bytes:
        old = match.group(0)
        if old in self.keep:
            return old
        new = self._uuids.get(old)
        if new is None:
            new = self._uuids[old] = self.new_uuid(old).encode()
        return new

    def bundle(self, raw: bytes, serial: int) -> tuple[dict[str, Any], Counter[str]]:
        """A re-identified copy of a Synthea patient bundle (given as JSON text), with its counts
        by type."""
        patient = orjson.loads(raw)["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient"
        rng = random.Random(f"{self.spec.seed}/{self.copy}/{patient['id']}")
        family, given = chinese_name(rng, patient.get("gender"))
        text = _UUID.sub(self._swap, raw)
        for old in _displays(patient):
            text = text.replace(orjson.dumps(old), orjson.dumps(family + given))
        bundle = orjson.loads(text)
        tokens = _name_tokens(patient)
        counts: Counter[str] = Counter()
        for entry in bundle["entry"]:
            resource = entry["resource"]
            rtype = resource["resourceType"]
            counts[rtype] += 1
            if rtype == "Patient":
                self._patient(resource, rng, family, given, serial)
            else:
                self._identifiers(resource)
            if rtype in ("DocumentReference", "DiagnosticReport"):
                _rename_notes(resource, tokens, family, given)
        return bundle, counts

    def lone_bundle(self, patients: list[dict[str, Any]], first: int, count: int) -> bytes:
        """A transaction of `count` Patients made from the Synthea patients, numbered from
        `first` within the copy's lone patients."""
        entries = []
        base = len(patients)
        for k in range(first, first + count):
            patient = orjson.loads(orjson.dumps(patients[k % base]))
            old_id = patient["id"]
            new_id = self.new_uuid(f"lone/{k}")
            patient["id"] = new_id
            for identifier in patient.get("identifier", []):
                if identifier.get("value") == old_id:
                    identifier["value"] = new_id
            rng = random.Random(f"{self.spec.seed}/{self.copy}/lone/{k}")
            family, given = chinese_name(rng, patient.get("gender"))
            self._patient(patient, rng, family, given, base + k)
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{new_id}",
                    "resource": patient,
                    "request": {"method": "POST", "url": "Patient"},
                }
            )
        return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})

    def _patient(
        self, patient: dict[str, Any], rng: random.Random, family: str, given: str, serial: int
    ) -> None:
        synthea = next((n for n in patient.get("name", []) if n.get("use") == "official"), None)
        names: list[dict[str, Any]] = [
            {"use": "official", "text": family + given, "family": family, "given": [given]}
        ]
        if synthea is not None:
            names.append({**synthea, "use": "nickname"})
        patient["name"] = names
        born = patient.get("birthDate")
        if isinstance(born, str) and len(born) == 10:
            shift = rng.randint(1, 10) * rng.choice((-1, 1))
            patient["birthDate"] = (date.fromisoformat(born) + timedelta(days=shift)).isoformat()
        number = self.first_serial + serial
        for identifier in patient.get("identifier", []):
            system = identifier.get("system")
            if system == _SSN:
                identifier["value"] = f"999-{number // 10_000 % 100:02d}-{number % 10_000:04d}"
            elif system == _DRIVERS_LICENCE:
                identifier["value"] = f"S9{number % 10_000_000:07d}"
            elif system == _PASSPORT:
                identifier["value"] = f"X{number % 100_000_000:08d}X"
        for extension in patient.get("extension", []):
            if extension.get("url") == _MAIDEN_NAME:
                mother_family, mother_given = chinese_name(rng, "female")
                extension["valueString"] = mother_family + mother_given

    def _identifiers(self, resource: dict[str, Any]) -> None:
        for identifier in resource.get("identifier", []):
            value, system = identifier.get("value"), identifier.get("system")
            if not isinstance(value, str) or system in _SHARED_VALUES:
                continue
            if _UUID_TEXT.search(value):
                continue  # already replaced with the copy's UUIDs
            key = _digest(self.spec.seed, self.copy, system, value)
            identifier["value"] = _new_digits(value, _KEEP_PREFIX.get(system or "", 0), key)


def _displays(patient: dict[str, Any]) -> list[str]:
    """How Synthea writes the patient's name in reference displays ("Mrs. Chi716 Cormier289")."""
    forms: dict[str, None] = {}
    for name in patient.get("name", []):
        given = name.get("given", [])
        family = [name["family"]] if name.get("family") else []
        prefix, suffix = name.get("prefix", []), name.get("suffix", [])
        for parts in (
            [*prefix, *given, *family, *suffix],
            [*prefix, *given, *family],
            [*given, *family],
        ):
            if parts:
                forms[" ".join(parts)] = None
    return sorted(forms, key=len, reverse=True)


def _name_tokens(patient: dict[str, Any]) -> dict[str, str]:
    """Given and family names of the patient (Synthea's are unique words such as 'Chi716'),
    mapped to 'given' or 'family'."""
    tokens: dict[str, str] = {}
    for name in patient.get("name", []):
        for part in name.get("given", []):
            tokens[part] = "given"
        if name.get("family"):
            tokens[name["family"]] = "family"
    return tokens


def _rename_notes(
    resource: dict[str, Any], tokens: dict[str, str], family: str, given: str
) -> None:
    """Replace the patient's name in base64 clinical notes (the note names them by given name)."""
    if not tokens:
        return
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    new = {"given": family + given, "family": family}
    attachments = [
        *(c.get("attachment", {}) for c in resource.get("content", [])),
        *resource.get("presentedForm", []),
    ]
    for attachment in attachments:
        data = attachment.get("data")
        if not isinstance(data, str):
            continue
        note = base64.b64decode(data).decode("utf-8")
        renamed = pattern.sub(lambda m: new[tokens[m.group(0)]], note)
        if renamed != note:
            attachment["data"] = base64.b64encode(renamed.encode("utf-8")).decode("ascii")


# -- generating copies ---------------------------------------------------------------------------
def _copy_bundle(spec: Spec, copy: int, path: Path, serial: int, out: Path) -> Counter[str]:
    bundle, counts = Copier(spec, copy).bundle(gzip.decompress(path.read_bytes()), serial)
    patient_id = bundle["entry"][0]["resource"]["id"]
    (out / f"{patient_id}.json.gz").write_bytes(_gzip(orjson.dumps(bundle)))
    return counts


@lru_cache(maxsize=1)
def _synthea_patients(spec: Spec) -> list[dict[str, Any]]:
    return [
        orjson.loads(gzip.decompress(f.read_bytes()))["entry"][0]["resource"]
        for f in spec.patient_files()
    ]


def _lone_bundles(spec: Spec, copy: int, first: int, out: Path) -> Counter[str]:
    patients = _synthea_patients(spec)
    count = min(LONE_PER_BUNDLE, spec.lone_patients - first)
    data = Copier(spec, copy).lone_bundle(patients, first, count)
    (out / f"patients-{first // LONE_PER_BUNDLE:04d}.json.gz").write_bytes(_gzip(data))
    return Counter({"Patient": count})


def _call(task: Callable[[], Counter[str]]) -> Counter[str]:
    return task()


def _run(tasks: list[Callable[[], Counter[str]]], workers: int) -> Counter[str]:
    """Run the tasks (one per output file), in a pool of processes unless `workers` is 1."""
    counts: Counter[str] = Counter()
    if workers == 1:
        for task in tasks:
            counts.update(task())
        return counts
    with ProcessPoolExecutor(workers) as pool:
        for result in pool.map(_call, tasks):
            counts.update(result)
    return counts


def generate(
    spec: Spec, out: Path, workers: int = 0, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Make the copies that are missing (or were made differently); return all manifests.
    `workers`: processes (0: one per CPU; 1: in this process)."""
    manifests = []
    for copy in range(1, spec.copies + 1):
        key = spec.manifest_key(copy)
        manifest = read_manifest(out, copy)
        if manifest is not None and {k: manifest.get(k) for k in key} == key:
            manifests.append(manifest)
            continue
        started = time.perf_counter()
        directory = copy_dir(out, copy)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.iterdir():
            stale.unlink()
        tasks: list[Callable[[], Counter[str]]] = [
            partial(_copy_bundle, spec, copy, path, serial, directory)
            for serial, path in enumerate(spec.patient_files())
        ]
        tasks += [
            partial(_lone_bundles, spec, copy, first, directory)
            for first in range(0, spec.lone_patients, LONE_PER_BUNDLE)
        ]
        counts = _run(tasks, workers or os.cpu_count() or 1)
        manifest = {
            **key,
            "resources": sum(counts.values()),
            "resources_by_type": dict(counts.most_common()),
        }
        # Written last: a copy without its manifest is incomplete and is made again.
        temporary = directory / "manifest.json.tmp"
        temporary.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        temporary.rename(directory / "manifest.json")
        manifests.append(manifest)
        if log is not None:
            log(
                f"copy {copy}: {manifest['resources']:,} resources in "
                f"{time.perf_counter() - started:.1f} s → {directory}"
            )
    return manifests


def default_out(seed: int, lone_patients: int) -> Path:
    return REPO / "var" / "bench" / f"city-s{seed}-l{lone_patients}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="copies of the Synthea set")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--lone-patients",
        type=int,
        default=DEFAULT_LONE,
        help="Patients without clinical data added to each copy",
    )
    parser.add_argument("--out", type=Path, help="default: var/bench/city-s<seed>-l<lone>")
    parser.add_argument("--workers", type=int, default=0, help="processes [default: CPUs]")
    args = parser.parse_args(argv)
    spec = Spec(seed=args.seed, copies=args.copies, lone_patients=args.lone_patients)
    out = args.out or default_out(spec.seed, spec.lone_patients)
    generate(spec, out, args.workers, log=print)
    copies = range(1, spec.copies + 1)
    print(f"{sum(expected_counts(out, copies).values()):,} resources, master bundles included")
    print("import with:", Path(sys.executable).with_name("cityhealth"), "import", end=" ")
    print(*import_paths(out, copies))


if __name__ == "__main__":
    main()
