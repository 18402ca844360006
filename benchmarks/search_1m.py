"""Search at 100 k and 1 M resources: `cityhealth serve` over HTTP on the city data set of
city_data.py (re-identified copies of the Synthea set, Chinese names), on PostgreSQL and SQLite.

For each database the first copy (≈ 100 k resources) is loaded with `cityhealth import`, each
query is measured, then copies 2…N are added (≈ 1.0 M) and everything is measured again, so
that one sees how latency grows with the data. Every query runs over many distinct values
(patients, names), never one cached value, and every answer is checked. At the largest size
the SQL the engine emits for each query is run under EXPLAIN ANALYZE (PostgreSQL: both the
plan for the values and the generic plan a prepared statement may switch to; SQLite: EXPLAIN
QUERY PLAN) and a scan of a whole big table is flagged.

The data is loaded through the CLI (`cityhealth import`, in the engine, no token); the HTTP
searches carry the access token of a platform system client that the script registers and
signs in with client credentials. The platform's client, without an organization, sees the
whole city, which the checks of the answers expect: the data set belongs to no one hospital.

    .venv/bin/python benchmarks/search_1m.py                        # PostgreSQL and SQLite
    .venv/bin/python benchmarks/search_1m.py --backends postgresql --copies 1,10
    .venv/bin/python benchmarks/search_1m.py --database-url postgresql+psycopg://…/db
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import city_data
import orjson
import psycopg
from common import (
    PG_ADMIN,
    REPO,
    Server,
    cpu_delta,
    cpu_seconds,
    machine_cpu,
    print_header,
    wait_for_quiet,
)
from ingest import Sampler, connect, query
from psycopg import sql

from cityhealth.fhir.sharding import DISTRIBUTED_TABLES

TOKEN_TARGET_MS = 20.0
OTHER_TARGET_MS = 50.0
SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
HEART_RATE = "http://loinc.org|8867-4"
#: Tables a search must never scan whole: the store's big tables.
BIG_TABLES = tuple(sorted(DISTRIBUTED_TABLES))
_SEQ_SCAN = re.compile(rf"Seq Scan on ({'|'.join(BIG_TABLES)})\b")
_SQLITE_SCAN = re.compile(rf"\bSCAN ({'|'.join(BIG_TABLES)})\b(?! USING)")
#: What PGOPTIONS gives the comparison server: plans made with the values, every time.
CUSTOM_PLANS = "-c plan_cache_mode=force_custom_plan"
_PYFORMAT = re.compile(r"%\((\w+)\)s")
#: Statements of a search (the page and include rounds), not the driver's own queries.
_SEARCH_SQL = re.compile(r"^\s*SELECT\b.*\bresource AS\b", re.DOTALL)


# -- the queries ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    matches: int
    included: int
    problem: str = ""


Check = Callable[[dict[str, Any], Any], Answer]


@dataclass
class Query:
    name: str
    shape: str  # what one request looks like
    token: bool  # a token search (the tighter target)
    rtype: str
    params: list[list[tuple[str, str]]]  # one parameter list per request, many distinct values
    check: Check
    expect: list[Any]  # per request, what `check` compares with

    def path(self, i: int) -> str:
        return f"/fhir/{self.rtype}?{urlencode(self.params[i], quote_via=quote)}"


def _entries(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def one_patient(bundle: dict[str, Any], patient_id: Any) -> Answer:
    found = [e["resource"]["id"] for e in _entries(bundle, "match")]
    if found != [patient_id]:
        return Answer(len(found), 0, f"expected only Patient/{patient_id}, found {found[:3]}")
    return Answer(1, 0)


def some_match(bundle: dict[str, Any], _expect: Any) -> Answer:
    found = _entries(bundle, "match")
    return Answer(len(found), 0, "" if found else "no match")


def any_count(bundle: dict[str, Any], _expect: Any) -> Answer:
    return Answer(len(_entries(bundle, "match")), 0)


def _period_end(resource: dict[str, Any]) -> datetime:
    period = resource.get("period", {})
    return datetime.fromisoformat(period.get("end") or period["start"])


def newest_first(bundle: dict[str, Any], _expect: Any) -> Answer:
    """`_sort=-date` on a Period orders by its end, latest first (search.html#_sort)."""
    found = _entries(bundle, "match")
    ends = [_period_end(e["resource"]) for e in found]
    if not found:
        return Answer(0, 0, "no encounter")
    if ends != sorted(ends, reverse=True):
        return Answer(len(found), 0, "encounters are not newest first")
    return Answer(len(found), 0)


def with_included(rtype: str) -> Check:
    def check(bundle: dict[str, Any], _expect: Any) -> Answer:
        found = _entries(bundle, "match")
        included = _entries(bundle, "include")
        if not found:
            return Answer(0, 0, "no match")
        if not included or any(e["resource"]["resourceType"] != rtype for e in included):
            return Answer(len(found), len(included), f"no {rtype} included")
        return Answer(len(found), len(included))

    return check


@dataclass
class Values:
    """Search values taken from the loaded database."""

    patients: list[tuple[str, str]]  # (id, Synthea identifier) of sampled patients
    clinical: list[str]  # ids of patients with encounters (copies of the Synthea patients)
    medicated: list[str]  # ids of patients with a MedicationRequest that names a Medication
    names: list[tuple[str, str, str, str]]  # (family + given, family, pinyin, initials)
    frequent: list[tuple[str, int]]  # the most frequent full names (most first), patients each
    rare: list[tuple[str, int]]  # full names only one patient has
    frequent_family: list[tuple[str, int]]
    rare_family: list[tuple[str, int]]


def _ids(url: str, sql_text: str, params: tuple[Any, ...] = ()) -> list[str]:
    return [str(row[0]) for row in query(url, sql_text, params)]


def _json_text(url: str, path: str) -> str:
    """SQL for a text member of the resource body ('name,0,text'), on either database."""
    if url.startswith("sqlite"):
        steps = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path.split(","))
        return f"json_extract(body, '${steps}')"
    return f"body::jsonb #>> '{{{path}}}'"


def _frequencies(url: str, path: str) -> list[tuple[str, int]]:
    """(value, patients) of a member of Patient bodies, least frequent first."""
    column = _json_text(url, path)
    rows = query(
        url,
        f"SELECT {column} AS v, count(*) FROM resource "
        "WHERE type = 'Patient' AND NOT deleted GROUP BY v",
    )
    return sorted(((str(v), int(n)) for v, n in rows if v), key=lambda x: (x[1], x[0]))


def pick_values(url: str, sample: int, rng: random.Random) -> Values:
    from cityhealth.fhir.chinese import pinyin_forms

    patients = query(
        url,
        "SELECT r.id, t.code FROM resource r JOIN idx_token t ON t.rid = r.rid "
        "WHERE r.type = 'Patient' AND NOT r.deleted AND t.rtype = 'Patient' "
        "AND t.param = 'identifier' AND t.system = %s ORDER BY r.rid",
        (SYNTHEA_SYSTEM,),
    )
    chosen = [
        (str(rid), str(code)) for rid, code in rng.sample(patients, min(sample, len(patients)))
    ]
    family, text = _json_text(url, "name,0,family"), _json_text(url, "name,0,text")
    marks = ", ".join("%s" for _ in chosen)
    rows = query(
        url,
        f"SELECT {family}, {text} FROM resource WHERE type = 'Patient' AND id IN ({marks})",
        tuple(rid for rid, _ in chosen),
    )
    names = []
    for surname, full in rows:
        pinyin, *initials = pinyin_forms(str(full), name_part="full")
        names.append((str(full), str(surname), pinyin, initials[0] if initials else pinyin))
    full_names = _frequencies(url, "name,0,text")
    families = _frequencies(url, "name,0,family")
    clinical = _ids(
        url,
        "SELECT DISTINCT target_id FROM idx_reference WHERE rtype = 'Encounter' "
        "AND param = 'patient'",
    )
    medicated = _ids(
        url,
        "SELECT DISTINCT p.target_id FROM idx_reference p JOIN idx_reference m "
        "ON m.rid = p.rid AND m.rtype = 'MedicationRequest' AND m.param = 'medication' "
        "WHERE p.rtype = 'MedicationRequest' AND p.param = 'patient'",
    )
    return Values(
        patients=chosen,
        clinical=sorted(clinical),
        medicated=sorted(medicated),
        names=names,
        frequent=full_names[::-1][:20],
        rare=[x for x in full_names if x[1] == 1][:sample],
        frequent_family=families[::-1][:3],
        rare_family=families[:5],
    )


def build_queries(values: Values, sample: int, rng: random.Random) -> list[Query]:
    def some(items: list[Any]) -> list[Any]:
        return rng.sample(items, min(sample, len(items)))

    clinical, medicated = some(values.clinical), some(values.medicated)
    names = values.names
    period = [("date", "ge2015-01-01"), ("date", "lt2020-01-01")]

    def named(name: str, shape: str, param: str, items: list[str]) -> Query:
        params = [[(param, v)] for v in items]
        return Query(name, shape, False, "Patient", params, some_match, items)

    return [
        Query(
            "identifier",
            f"Patient?identifier={SYNTHEA_SYSTEM}|<uuid>",
            True,
            "Patient",
            [[("identifier", f"{SYNTHEA_SYSTEM}|{code}")] for _, code in values.patients],
            one_patient,
            [rid for rid, _ in values.patients],
        ),
        named("name, Chinese", "Patient?name=张伟", "name", [n[0] for n in names]),
        named("family, Chinese", "Patient?family=曾", "family", [n[1] for n in names]),
        named("name, pinyin", "Patient?name=zhangwei", "name", [n[2] for n in names]),
        named("name, initials", "Patient?name=zw", "name", [n[3] for n in names]),
        named("name, frequent", "Patient?name=<most frequent>", "name", _cycle(values.frequent)),
        named("name, rare", "Patient?name=<one patient>", "name", [v for v, _ in values.rare]),
        named("family, frequent", "Patient?family=王", "family", _cycle(values.frequent_family)),
        named("family, rare", "Patient?family=喇", "family", _cycle(values.rare_family)),
        Query(
            "Observation code+date",
            f"Observation?patient=X&code={HEART_RATE}&date=ge2015-01-01&date=lt2020-01-01",
            False,
            "Observation",
            [[("patient", p), ("code", HEART_RATE), *period] for p in clinical],
            any_count,
            clinical,
        ),
        Query(
            "Encounter sorted",
            "Encounter?patient=X&_sort=-date",
            False,
            "Encounter",
            [[("patient", p), ("_sort", "-date")] for p in clinical],
            newest_first,
            clinical,
        ),
        Query(
            "_include practitioner",
            "Encounter?patient=X&_include=Encounter:practitioner",
            False,
            "Encounter",
            [[("patient", p), ("_include", "Encounter:practitioner")] for p in clinical],
            with_included("Practitioner"),
            clinical,
        ),
        Query(
            "_include medication",
            "MedicationRequest?patient=X&_include=MedicationRequest:medication",
            False,
            "MedicationRequest",
            [[("patient", p), ("_include", "MedicationRequest:medication")] for p in medicated],
            some_match,
            medicated,
        ),
    ]


def _cycle(items: list[tuple[str, int]]) -> list[str]:
    return [v for v, _ in items]


# -- the HTTP client ------------------------------------------------------------------------------
class Http:
    """HTTP/1.1 on one keep-alive connection, with as little client CPU as possible; every
    request carries the `authorization` header."""

    def __init__(self, port: int, authorization: str) -> None:
        self.port = port
        self._common = (
            "HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/fhir+json\r\n"
            f"Authorization: {authorization}\r\n\r\n"
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self._reader is not None
        head = f"GET {path} {self._common}"
        self._writer.write(head.encode())
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await self._reader.readexactly(length) if length else b""
        return int(lines[0].split(" ", 2)[1]), body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class Figures:
    query: Query
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    problems: list[str] = field(default_factory=list)
    matches: int = 0
    included: int = 0
    busy_before: float = 0.0  # share of the machine's CPU busy just before
    others: float = 0.0  # share of the machine's CPU used by other processes meanwhile

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, int(p * len(ordered) + 0.5) - 1))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def target(self) -> float:
        return TOKEN_TARGET_MS if self.query.token else OTHER_TARGET_MS

    @property
    def met(self) -> bool:
        return not self.errors and self.percentile(0.95) <= self.target


async def measure(
    q: Query, port: int, authorization: str, connections: int, warmup: float, seconds: float
) -> Figures:
    """Closed loop: `connections` clients, each sending the next value as soon as an answer is
    in; answers before the timed window only warm up."""
    figures = Figures(q)
    counter = iter(range(1 << 62))
    start = time.perf_counter() + warmup
    end = start + seconds

    async def client() -> None:
        http = Http(port, authorization)
        try:
            while (now := time.perf_counter()) < end:
                i = next(counter) % len(q.params)
                status, body = await http.get(q.path(i))
                done = time.perf_counter()
                answer = (
                    q.check(orjson.loads(body), q.expect[i])
                    if status == 200
                    else Answer(0, 0, f"HTTP {status}: {body[:200]!r}")
                )
                if now < start:
                    continue
                figures.latencies.append(done - now)
                figures.matches += answer.matches
                figures.included += answer.included
                if answer.problem:
                    figures.errors += 1
                    if len(figures.problems) < 3:
                        figures.problems.append(f"{q.path(i)}: {answer.problem}")
        finally:
            await http.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    figures.seconds = seconds
    return figures


def backend_pids(url: str) -> list[int]:
    """PostgreSQL backends serving the database (none on SQLite)."""
    if url.startswith("sqlite"):
        return []
    sql_text = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    return [int(pid) for (pid,) in query(url, sql_text)]


def measure_quietly(q: Query, server: Server, args: argparse.Namespace) -> Figures:
    """Measure once the machine is quiet, and note how much CPU other processes took: the
    machine's busy time less that of the client, the server and its database backends."""
    busy = wait_for_quiet(args.quiet_busy, args.quiet_wait)
    ours = [os.getpid(), *server.worker_pids, *backend_pids(server.url)]
    before, (busy0, total0) = cpu_seconds(ours), machine_cpu()
    figures = asyncio.run(
        measure(q, server.port, server.authorization, args.connections, args.warmup, args.seconds)
    )
    busy1, total1 = machine_cpu()
    used = cpu_delta(before, cpu_seconds([*ours, *backend_pids(server.url)]))
    figures.busy_before = busy
    figures.others = max(busy1 - busy0 - used, 0.0) / max(total1 - total0, 1e-9)
    return figures


# -- loading --------------------------------------------------------------------------------------
@dataclass
class Load:
    resources: int
    seconds: float
    skipped: int
    failures: int
    counts_ok: bool
    count_problems: list[str]
    analyzed: str
    peak_rss: int  # the import processes together
    peak_worker_rss: int


def load(url: str, paths: list[Path], workers: int, expected: dict[str, int]) -> Load:
    env = {**os.environ, "CITYHEALTH_DATABASE_URL": url}
    with tempfile.TemporaryDirectory(prefix="search-1m-") as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "cityhealth",
            "import",
            "--quiet",
            "--workers",
            str(workers),
            "--report",
            str(report),
            *map(str, paths),
        ]
        print(f"$ {' '.join(command[1:4])} --workers {workers} {' '.join(p.name for p in paths)}")
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        with Sampler(process.pid, url) as sampler:
            _, err = process.communicate()
        if not report.exists():
            raise RuntimeError(f"the import failed:\n{err.decode()[-2000:]}")
        result = orjson.loads(report.read_bytes())
    # The audit trail of the benchmark's own sign-in and searches is no part of the data set.
    counted = (
        "SELECT type, count(*) FROM resource WHERE NOT deleted AND type <> 'AuditEvent' "
        "GROUP BY type"
    )
    stored = {str(t): int(n) for t, n in query(url, counted)}
    problems = [
        f"{t}: {stored.get(t, 0)} stored, {expected.get(t, 0)} expected"
        for t in sorted(set(stored) | set(expected))
        if stored.get(t, 0) != expected.get(t, 0)
    ]
    return Load(
        result["resources"],
        result["seconds"],
        result["skipped"],
        result["failures"],
        not problems,
        problems,
        analyzed(url),
        max((s.parent_rss + s.workers_rss for s in sampler.samples), default=0),
        sampler.peak_worker,
    )


def analyzed(url: str) -> str:
    """Whether the planner statistics are fresh: PostgreSQL's last ANALYZE of the big tables."""
    if url.startswith("sqlite"):
        rows = query(url, "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
        return "sqlite_stat1 present" if rows[0][0] else "no sqlite_stat1: never analyzed"
    rows = query(
        url,
        "SELECT relname, last_analyze FROM pg_stat_user_tables WHERE relname = ANY(%s)",
        (list(BIG_TABLES),),
    )
    missing = sorted(str(name) for name, when in rows if when is None)
    if missing:
        return f"NOT analyzed: {', '.join(missing)}"
    oldest = min(when for _, when in rows)
    return f"all big tables analyzed (oldest {oldest:%H:%M:%S} UTC)"


def database_size(url: str) -> int:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return int(query(url, "SELECT pg_database_size(current_database())")[0][0])


# -- plans ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    query: str
    statement: int  # 1: the page; 2…: include rounds
    value: str
    text: str
    generic: str
    seq_scans: list[str]
    ms: float
    generic_ms: float = 0.0

    @property
    def generic_slow(self) -> bool:
        """The generic plan is much slower than the plan made for the values."""
        return self.generic_ms > max(5 * self.ms, self.ms + 5)


@contextmanager
def in_process_engine(url: str) -> Iterator[tuple[Any, list[tuple[str, Any]]]]:
    """The engine in this process, and the (SQL, parameters) it sends, as they are sent."""
    from sqlalchemy import event

    from cityhealth.config import Settings
    from cityhealth.db import Database
    from cityhealth.fhir.definitions import get_definitions
    from cityhealth.fhir.engine import FhirEngine

    db = Database(url, pool_size=1)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        sent.append((statement, params))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        yield FhirEngine(db, get_definitions(), Settings(database_url=url)), sent
    finally:
        db.dispose()


def explain(url: str, queries: list[Query], values_per_query: int) -> list[Plan]:
    """EXPLAIN ANALYZE of each statement a search sends, for its first values."""
    from cityhealth.fhir.access import SYSTEM

    plans = []
    with in_process_engine(url) as (engine, sent), connect(url) as raw:
        if isinstance(raw, psycopg.Connection):
            raw.prepare_threshold = None  # plans are asked for explicitly below
        for q in queries:
            for i in range(min(values_per_query, len(q.params))):
                sent.clear()
                request = engine.parse_search(q.rtype, q.params[i])
                engine.search(SYSTEM, request, "http://bench/fhir")
                statements = [(s, p) for s, p in sent if _SEARCH_SQL.search(s)]
                value = "&".join(f"{k}={v}" for k, v in q.params[i])
                for n, (statement, params) in enumerate(statements, 1):
                    plans.append(_plan(raw, q.name, n, value, statement, params))
    return plans


def _plan(raw: Any, name: str, n: int, value: str, statement: str, params: Any) -> Plan:
    if isinstance(raw, psycopg.Connection):
        rows = raw.execute(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", params).fetchall()
        text = "\n".join(str(r[0]) for r in rows)
        generic = _generic_plan(raw, statement, params)
        scans = sorted(set(_SEQ_SCAN.findall(text)) | set(_SEQ_SCAN.findall(generic)))
        return Plan(name, n, value, text, generic, scans, _ms(text), _ms(generic))
    rows = raw.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
    text = "\n".join(str(r[-1]) for r in rows)
    started = time.perf_counter()
    raw.execute(statement, params).fetchall()
    ms = (time.perf_counter() - started) * 1000
    return Plan(name, n, value, text, "", sorted(set(_SQLITE_SCAN.findall(text))), ms)


def _ms(plan: str) -> float:
    match = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return float(match.group(1)) if match else 0.0


def _generic_plan(raw: psycopg.Connection, statement: str, params: dict[str, Any]) -> str:
    """The plan PostgreSQL uses once a prepared statement goes generic (psycopg prepares a
    statement after 5 executions; the server may then plan it without the values)."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    prepared = _PYFORMAT.sub(number, statement).replace("%%", "%")
    raw.execute("SET plan_cache_mode = force_generic_plan")
    try:
        raw.execute(f"PREPARE bench_generic AS {prepared}")
        literals = sql.SQL(", ").join(sql.Literal(params[name]) for name in order)
        execute = sql.SQL("EXPLAIN (ANALYZE) EXECUTE bench_generic ({})").format(literals)
        rows = raw.execute(execute).fetchall()
    finally:
        raw.execute("DEALLOCATE bench_generic")
        raw.execute("RESET plan_cache_mode")
    return "\n".join(str(r[0]) for r in rows)


_KEY_NODE = re.compile(
    r"(Index Only Scan|Index Scan|Bitmap Index Scan|Bitmap Heap Scan|Seq Scan|Nested Loop|"
    r"Hash Join|Merge Join|Hash Semi Join|Sort|Limit|Unique|HashAggregate)[^(]*\(cost=[^)]*\) "
    r"\(actual[^)]*\)"
)


def key_lines(text: str, limit: int = 12) -> list[str]:
    """The plan's nodes with estimated and actual rows, trimmed of costs."""
    lines = []
    for line in text.splitlines():
        if _KEY_NODE.search(line) or line.lstrip().startswith(("Index Cond", "Execution Time")):
            line = re.sub(r"\(cost=[^)]*\) ", "", line.rstrip())
            lines.append(re.sub(r"\(actual time=[\d.]+\.\.([\d.]+) ", r"(actual \1 ms ", line))
    return lines[:limit]


# -- output ---------------------------------------------------------------------------------------
def print_figures(label: str, figures: list[Figures]) -> None:
    print(f"### {label}")
    print(
        "| query | example | matches/page | requests/s | p50 ms | p95 ms | p99 ms | errors | "
        "target p95 | | others' CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        n = max(len(f.latencies), 1)
        included = f" (+{f.included / n:.1f} incl.)" if f.included else ""
        print(
            f"| {f.query.name} | `{f.query.shape}` | {f.matches / n:.1f}{included} | "
            f"{f.rps:,.0f} | {f.percentile(0.5):.1f} | {f.percentile(0.95):.1f} | "
            f"{f.percentile(0.99):.1f} | {f.errors} | ≤ {f.target:.0f} ms | "
            f"{'met' if f.met else 'NOT MET'} | {f.others:.0%} |"
        )
    for f in figures:
        for problem in f.problems:
            print(f"  problem: {problem}")
    met = all(f.met for f in figures)
    print(
        f"\ntarget p95 ≤ {TOKEN_TARGET_MS:.0f} ms (token searches) / ≤ {OTHER_TARGET_MS:.0f} ms "
        f"(the rest): {'met' if met else 'not met'}\n"
    )


def print_growth(backend: str, sizes: list[tuple[int, list[Figures]]]) -> None:
    if len(sizes) < 2:
        return
    (small, before), (large, after) = sizes[0], sizes[-1]
    print(f"### {backend}: growth {small:,} → {large:,} resources (p95, ms)")
    print("| query | small | large | ratio |")
    print("|---|---|---|---|")
    for a, b in zip(before, after, strict=True):
        p_a, p_b = a.percentile(0.95), b.percentile(0.95)
        print(f"| {a.query.name} | {p_a:.1f} | {p_b:.1f} | {p_b / p_a if p_a else 0:.2f} |")
    print()


def print_plans(plans: list[Plan], out: Path) -> None:
    print("### plans (EXPLAIN ANALYZE of the SQL the engine sends; all plans in " + str(out) + ")")
    for p in plans:
        flag = f"SEQ SCAN on {', '.join(p.seq_scans)}" if p.seq_scans else "index-bound"
        if p.generic:
            marker = " — GENERIC PLAN SLOW" if p.generic_slow else ""
            flag += f"; generic plan {p.generic_ms:.2f} ms{marker}"
        print(f"- {p.query}, statement {p.statement}, `{p.value}`: {p.ms:.2f} ms, {flag}")
        for line in key_lines(p.text) if p.generic else p.text.splitlines()[:8]:
            print(f"      {line}")
        if p.generic:
            generic = key_lines(p.generic, 6)
            print("    generic plan: " + ("; ".join(g.strip() for g in generic[:3]) or "-"))
    bad = [p for p in plans if p.seq_scans]
    print(f"\nplans with a whole-table scan of a big table: {len(bad)} of {len(plans)}")
    if any(p.generic for p in plans):
        slow = [plan for plan in plans if plan.generic_slow]
        names = "".join(f"; {x.query} ({x.ms:.1f} → {x.generic_ms:.1f} ms)" for x in slow)
        print(f"generic plans much slower than the plan for the values: {len(slow)}{names}")
    print()
    with out.open("w") as f:
        for p in plans:
            f.write(f"== {p.query}, statement {p.statement}: {p.value}\n{p.text}\n")
            if p.generic:
                f.write(f"-- generic plan:\n{p.generic}\n")
            f.write("\n")


# -- one database ---------------------------------------------------------------------------------
class LoadedServer(Server):
    """`cityhealth serve` on a database given by URL, which is kept afterwards."""

    def __init__(self, url: str, workers: int) -> None:
        backend = "sqlite" if url.startswith("sqlite") else "postgresql"
        super().__init__(backend, workers)
        self.url = url
        self.database = (
            url.removeprefix("sqlite:///") if backend == "sqlite" else url.rsplit("/")[-1]
        )

    def __enter__(self) -> LoadedServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="cityhealth-bench-")
        self._start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.database = ""  # so that Server.__exit__ stops the server and drops nothing
        super().__exit__(*exc)


def sign_in_platform(server: Server) -> None:
    """A platform system client (no organization: it sees the whole city), registered anew
    each time, so that a kept database (`--database-url`) can be measured again."""
    server.sign_in(f"bench-platform-{uuid.uuid4().hex[:8]}", None)


def sqlite_too_slow(out: Path, loaded: int, copies: int, rate: float, limit: float) -> bool:
    """Whether loading SQLite up to `copies` would take `limit` minutes or more at `rate`."""
    remaining = sum(m["resources"] for m in city_data_manifests(out, loaded, copies))
    minutes = remaining / rate / 60 if rate else float("inf")
    if minutes < limit:
        return False
    print(
        f"SQLite: loading {remaining:,} more resources would take about {minutes:.0f} min at "
        f"{rate:,.0f} resources/s (≥ {limit:.0f}): skipped\n"
    )
    return True


def load_stage(url: str, out: Path, loaded: int, copies: int, workers: int) -> tuple[int, float]:
    """Import copies loaded+1…copies; the store's size and the import's resources/s."""
    expected = city_data.expected_counts(out, range(1, copies + 1))
    result = load(
        url, city_data.import_paths(out, range(loaded + 1, copies + 1)), workers, expected
    )
    total = sum(expected.values())
    rate = result.resources / result.seconds if result.resources else 0.0
    print(
        f"loaded {result.resources:,} resources in {result.seconds:.1f} s ({rate:,.0f} "
        f"resources/s, {workers} worker(s); peak RSS {result.peak_rss / 2**20:,.0f} MiB, largest "
        f"worker {result.peak_worker_rss / 2**20:,.0f} MiB); {result.skipped} units already "
        f"there; {result.failures} failures; store: {total:,} resources, counts "
        f"{'as expected' if result.counts_ok else 'WRONG'}; {result.analyzed}; "
        f"database {database_size(url) / 2**30:.2f} GiB"
    )
    for problem in result.count_problems[:10]:
        print(f"  {problem}")
    return total, rate


def queries_for(url: str, args: argparse.Namespace) -> list[Query]:
    rng = random.Random(args.seed)
    values = pick_values(url, args.values, rng)

    def listed(items: list[tuple[str, int]]) -> str:
        return ", ".join(f"{v} ({n})" for v, n in items)

    print(
        f"values: {len(values.patients)} patients sampled for the Patient searches, "
        f"{len(values.clinical)} patients with encounters; frequent names "
        f"{listed(values.frequent[:3])}; rare names {listed(values.rare[:3])}; surnames "
        f"{listed(values.frequent_family)} / {listed(values.rare_family[:3])}\n"
    )
    return build_queries(values, args.values, rng)


def compare_custom_plans(
    url: str, queries: list[Query], auto: list[Figures], args: argparse.Namespace
) -> None:
    """The same queries on a second server whose connections always plan with the values
    (PGOPTIONS), against the default, where a search goes unprepared (planned with its values
    too) and the engine's fixed statements by key are prepared (generic plans)."""
    previous = os.environ.get("PGOPTIONS")
    os.environ["PGOPTIONS"] = CUSTOM_PLANS
    try:
        with LoadedServer(url, args.serve_workers) as custom:
            sign_in_platform(custom)
            figures = [measure_quietly(q, custom, args) for q in queries]
    finally:
        if previous is None:
            os.environ.pop("PGOPTIONS")
        else:
            os.environ["PGOPTIONS"] = previous
    print_figures(f"postgresql, same data, server with PGOPTIONS='{CUSTOM_PLANS}'", figures)
    print("| query | p50 ms default | p50 ms custom plans | p95 ms default | p95 ms custom plans |")
    print("|---|---|---|---|---|")
    for a, c in zip(auto, figures, strict=True):
        print(
            f"| {a.query.name} | {a.percentile(0.5):.1f} | {c.percentile(0.5):.1f} | "
            f"{a.percentile(0.95):.1f} | {c.percentile(0.95):.1f} |"
        )
    print()


def run_backend(backend: str, args: argparse.Namespace, out: Path) -> None:
    load_workers = 1 if backend == "sqlite" else args.pg_load_workers
    server: Server = (
        LoadedServer(args.database_url, args.serve_workers)
        if args.database_url
        else Server(backend, args.serve_workers, args.pg_admin)
    )
    sizes: list[tuple[int, list[Figures]]] = []
    with server:
        url = server.url
        sign_in_platform(server)
        print(f"## {backend}: database {server.database}, {args.serve_workers} server workers\n")
        loaded, rate = 0, 0.0
        for copies in args.copies:
            if (
                backend == "sqlite"
                and loaded
                and not args.sqlite_1m
                and sqlite_too_slow(out, loaded, copies, rate, args.sqlite_max_minutes)
            ):
                break
            total, rate = load_stage(url, out, loaded, copies, load_workers)
            loaded = copies
            queries = queries_for(url, args)
            figures = [measure_quietly(q, server, args) for q in queries]
            label = f"{backend}, {total:,} resources, {args.connections} connections"
            print_figures(label, figures)
            sizes.append((total, figures))
            largest = copies == args.copies[-1]
            if largest or backend == "sqlite":
                stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
                plans_out = REPO / "var" / "bench" / f"plans-{backend}-{total}-{stamp}.txt"
                plans_out.parent.mkdir(parents=True, exist_ok=True)
                print_plans(explain(url, queries, args.explain_values), plans_out)
            if largest and backend == "postgresql" and not args.no_plan_comparison:
                compare_custom_plans(url, queries, figures, args)
        print_growth(backend, sizes)
        if args.keep and backend == "postgresql" and not args.database_url:
            server.database = ""  # kept: the URL below serves for --database-url
            print(f"kept: --database-url {url}\n")


def city_data_manifests(out: Path, after: int, upto: int) -> list[dict[str, Any]]:
    return [m for c in range(after + 1, upto + 1) if (m := city_data.read_manifest(out, c))]


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument(
        "--copies",
        type=_ints,
        default="1,10",
        help="sizes to measure, in copies of the Synthea set (1 ≈ 100 k resources)",
    )
    parser.add_argument("--seed", type=int, default=city_data.DEFAULT_SEED)
    parser.add_argument("--lone-patients", type=int, default=city_data.DEFAULT_LONE)
    parser.add_argument("--data", type=Path, help="city data directory [var/bench/city-…]")
    parser.add_argument("--pg-load-workers", type=int, default=2)
    parser.add_argument("--serve-workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="per query and size")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--values", type=int, default=1000, help="distinct values per query")
    parser.add_argument("--explain-values", type=int, default=1, help="plans per query")
    parser.add_argument("--sqlite-1m", action="store_true", help="load SQLite to 1 M anyway")
    parser.add_argument(
        "--sqlite-max-minutes", type=float, default=20.0, help="skip a longer SQLite load"
    )
    parser.add_argument("--database-url", help="measure (and add to) this database; kept")
    parser.add_argument(
        "--no-plan-comparison",
        action="store_true",
        help="skip measuring PostgreSQL at the largest size again with custom plans only",
    )
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL database")
    parser.add_argument("--pg-admin", default=PG_ADMIN)
    parser.add_argument("--quiet-busy", type=float, default=0.3)
    parser.add_argument("--quiet-wait", type=float, default=60.0)
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    if args.database_url:
        args.backends = ["sqlite" if args.database_url.startswith("sqlite") else "postgresql"]
    return args


def main() -> int:
    args = parse_args()
    print_header("Search at 100 k and 1 M resources over HTTP", args.pg_admin)
    out = args.data or city_data.default_out(args.seed, args.lone_patients)
    spec = city_data.Spec(seed=args.seed, copies=max(args.copies), lone_patients=args.lone_patients)
    started = time.perf_counter()
    city_data.generate(spec, out, log=print)
    print(
        f"data: {out}, {max(args.copies)} copies (seed {args.seed}, {args.lone_patients:,} "
        f"lone patients per copy), ready in {time.perf_counter() - started:.0f} s\n"
    )
    for backend in args.backends:
        run_backend(backend, args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
