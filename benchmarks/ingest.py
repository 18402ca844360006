"""Ingest: the Synthea set (../shared/data/synthea-r4, 92,114 resources) loaded into a fresh
database with `cityhealth import` — hospital and practitioner bundles first, then the 120
patient bundles — on PostgreSQL (1 and 2 workers) and SQLite.

Each run prints resources/s, wall time, the CPU the import processes and PostgreSQL used, and
the RSS of the import processes sampled over the run (peak per quarter of the resources stored;
and a run on half the patient bundles with the same largest one), so that one sees whether
memory grows with the input. The
resource counts by type are checked against EXPECTED_COUNTS.json, and no `urn:uuid:` or
conditional reference may be left unresolved. When PostgreSQL misses the target, a further run
under py-spy shows where the import spends its time.

    .venv/bin/python benchmarks/ingest.py                  # about 5 minutes
    .venv/bin/python benchmarks/ingest.py --runs postgresql:2 --no-half --profile never
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from common import (
    PG_ADMIN,
    REPO,
    children,
    cpu_seconds,
    print_header,
    profile_summary,
    py_spy,
    rss_bytes,
    wait_for_quiet,
)

SHARED = Path(os.environ.get("CITYHEALTH_SHARED", REPO.parent / "shared"))
SYNTHEA = SHARED / "data" / "synthea-r4"
TARGET = 3000.0  # resources/s on PostgreSQL
MASTER_RESOURCES = 778  # in the hospital and practitioner bundles
#: Unresolved references a correct load leaves none of: `urn:uuid:` and the conditional
#: references of the patient bundles (to Organization, Location and Practitioner).
_UNRESOLVED = (
    '%"reference":"urn:uuid:%',
    '%"reference":"Organization?%',
    '%"reference":"Location?%',
    '%"reference":"Practitioner?%',
)


# -- a fresh database -------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_database(backend: str, admin_url: str) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database, dropped (or deleted) afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="cityhealth-ingest-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'cityhealth.db'}"
        return
    name = f"cityhealth_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + (
            f"/{name}"
        )
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@contextlib.contextmanager
def connect(url: str) -> Iterator[Any]:
    """A DB-API connection (psycopg or sqlite3) to a SQLAlchemy URL."""
    if url.startswith("sqlite:///"):
        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
    else:
        conn = psycopg.connect(_plain(url), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with connect(url) as conn:
        if url.startswith("sqlite:///"):
            sql = sql.replace("%s", "?")
        rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
        return rows


def migrate(url: str) -> None:
    """Create the schema before the clock starts: the import measures loading, not DDL."""
    env = {**os.environ, "CITYHEALTH_DATABASE_URL": url}
    command = [sys.executable, "-m", "cityhealth", "db", "upgrade"]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)


# -- sampling the import processes --------------------------------------------------------------
def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children(p)]
        found.extend(frontier)
    return found


@dataclass
class Sample:
    seconds: float
    resources: int  # stored so far (import journal)
    parent_rss: int
    workers_rss: int  # the pool's worker processes, summed


@dataclass
class Sampler:
    """RSS of the import processes and the journal's progress, every `interval` seconds, and
    the CPU of the PostgreSQL backends serving the database (their last reading each)."""

    pid: int
    url: str
    interval: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    backend_cpu: dict[int, float] = field(default_factory=dict)
    peak_worker: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Sampler:
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with connect(self.url) as conn:
            while not self._stop.wait(self.interval):
                # A sample lost to a busy database is no loss: the next one comes soon.
                with contextlib.suppress(psycopg.Error, sqlite3.Error):
                    self._sample(conn)

    def _sample(self, conn: Any) -> None:
        pids = tree(self.pid)
        workers = [p for p in pids[1:] if "spawn_main" in _cmdline(p)]
        worker_rss = [rss_bytes([p]) for p in workers]
        self.peak_worker = max([self.peak_worker, *worker_rss])
        (stored,) = conn.execute(
            "SELECT coalesce(sum(resources), 0) FROM import_journal"
        ).fetchone()
        self.samples.append(
            Sample(
                time.perf_counter() - self._started,
                int(stored),
                rss_bytes([self.pid]),
                sum(worker_rss),
            )
        )
        if isinstance(conn, psycopg.Connection):
            name = self.url.rsplit("/", 1)[1]
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchall()
            self.backend_cpu.update(cpu_seconds([int(pid) for (pid,) in rows]))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


# -- one run ----------------------------------------------------------------------------------
@dataclass
class Run:
    backend: str
    workers: int
    label: str  # "full" or "half"
    paths: list[Path]
    expected: Counter[str]
    wall: float = 0.0  # the command, start to exit
    seconds: float = 0.0  # the import itself, as reported (ANALYZE included)
    resources: int = 0
    failures: int = 0
    import_cpu: float = 0.0
    postgres_cpu: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    peak_parent: int = 0
    peak_worker: int = 0
    peak_total: int = 0
    counts_ok: bool = False
    count_problems: list[str] = field(default_factory=list)
    unresolved: int = -1
    busy_before: float = 0.0
    profile: str = ""

    @property
    def rate(self) -> float:
        return self.resources / self.seconds if self.seconds else 0.0

    @property
    def name(self) -> str:
        return f"{self.backend}, {self.workers} worker{'s' if self.workers > 1 else ''}"


def import_command(run: Run, report: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cityhealth",
        "import",
        "--quiet",
        "--workers",
        str(run.workers),
        "--report",
        str(report),
        *map(str, run.paths),
    ]


def execute(run: Run, args: argparse.Namespace, profile_to: Path | None = None) -> Run:
    run.busy_before = wait_for_quiet(args.quiet_busy, args.quiet_wait)
    with (
        fresh_database(run.backend, args.pg_admin) as url,
        tempfile.TemporaryDirectory(prefix="ingest-") as tmp,
    ):
        migrate(url)
        report = Path(tmp) / "report.json"
        command = import_command(run, report)
        if profile_to is not None:
            spy = py_spy()
            assert spy is not None
            command = [
                spy,
                "record",
                "--subprocesses",
                "--rate",
                "50",
                "--format",
                "raw",
                "--output",
                str(profile_to),
                "--",
                *command,
            ]
        env = {**os.environ, "CITYHEALTH_DATABASE_URL": url}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        with Sampler(process.pid, url) as sampler:
            out, err = process.communicate()
        run.wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        run.import_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        run.postgres_cpu = sum(sampler.backend_cpu.values())
        if process.returncode != 0 and not report.exists():
            raise RuntimeError(f"the import failed:\n{err.decode()[-2000:]}{out.decode()[-500:]}")
        result = orjson.loads(report.read_bytes())
        run.seconds, run.resources = result["seconds"], result["resources"]
        run.failures = result["failures"]
        run.samples = sampler.samples
        run.peak_parent = max((s.parent_rss for s in sampler.samples), default=0)
        run.peak_worker = sampler.peak_worker
        run.peak_total = max((s.parent_rss + s.workers_rss for s in sampler.samples), default=0)
        verify(run, url)
    if profile_to is not None:
        run.profile = profile_summary([profile_to], top=15)
    return run


def verify(run: Run, url: str) -> None:
    stored = Counter(
        {
            rtype: int(n)
            for rtype, n in query(
                url, "SELECT type, count(*) FROM resource WHERE NOT deleted GROUP BY type"
            )
        }
    )
    for rtype in sorted(set(stored) | set(run.expected)):
        if stored[rtype] != run.expected[rtype]:
            run.count_problems.append(f"{rtype}: {stored[rtype]} stored, {run.expected[rtype]}")
    run.counts_ok = not run.count_problems and run.resources == sum(run.expected.values())
    where = " OR ".join("body LIKE %s" for _ in _UNRESOLVED)
    (row,) = query(url, f"SELECT count(*) FROM resource WHERE {where}", _UNRESOLVED)
    run.unresolved = int(row[0])


# -- the data ---------------------------------------------------------------------------------
def expected_full() -> Counter[str]:
    expected = orjson.loads((SYNTHEA / "EXPECTED_COUNTS.json").read_bytes())
    return Counter(expected["resources_after_correct_load_by_type"])


def master_paths() -> list[Path]:
    expected = orjson.loads((SYNTHEA / "EXPECTED_COUNTS.json").read_bytes())
    return [SYNTHEA / name for name in expected["master_bundles"]]


def half_set(directory: Path) -> tuple[list[Path], Counter[str]]:
    """The master bundles and every second patient bundle by size, the largest included (it
    sets the peak), linked into `directory`; with their counts by type. With the same largest
    bundle and half the input, a memory peak that does not grow with the input stays the same."""
    masters = master_paths()
    patients = sorted(
        (f for f in SYNTHEA.glob("*.json.gz") if f not in masters),
        key=lambda f: f.stat().st_size,
        reverse=True,
    )
    counts: Counter[str] = Counter()
    for path in [*masters, *patients[::2]]:
        for entry in orjson.loads(gzip.decompress(path.read_bytes()))["entry"]:
            counts[entry["resource"]["resourceType"]] += 1
        if path not in masters:
            (directory / path.name).symlink_to(path)
    return [*masters, directory], counts


# -- output -----------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def quarters(run: Run) -> str:
    """Peak RSS (import process + workers) in each quarter of the resources stored."""
    total = max(run.resources, 1)
    peaks = [0, 0, 0, 0]
    for s in run.samples:
        quarter = min(3, s.resources * 4 // total)
        peaks[quarter] = max(peaks[quarter], s.parent_rss + s.workers_rss)
    return " / ".join(_mib(p) if p else "-" for p in peaks)


def phases(run: Run, masters: int) -> str:
    """When the master bundles were in, the rate of the patient bundles after them, and how
    long the last tenth of the resources took (a tail where workers wait for the largest
    bundles)."""
    samples = [s for s in run.samples if s.resources]
    if not samples or run.resources <= masters:
        return "-"
    master_done = next((s.seconds for s in samples if s.resources >= masters), samples[-1].seconds)
    end = next(s.seconds for s in samples if s.resources >= run.resources)
    tail = next(s.seconds for s in samples if s.resources >= run.resources * 0.9)
    rate = (run.resources - masters) / max(end - master_done, 1e-9)
    return (
        f"master bundles in {master_done:.1f} s after the start; patient bundles at "
        f"{rate:,.0f} resources/s; the last 10 % of the resources took {end - tail:.1f} s; "
        f"{run.wall - end:.1f} s from the last bundle to the exit (ANALYZE, shutdown)"
    )


def print_run(run: Run) -> None:
    cores = os.cpu_count() or 1
    print(f"## {run.name}, {run.label} set ({sum(run.expected.values()):,} resources)")
    print(f"machine busy before the run: {run.busy_before:.0%}")
    print(
        f"resources/s: {run.rate:,.0f}  ({run.resources:,} resources in {run.seconds:.1f} s; "
        f"command wall time {run.wall:.1f} s incl. start-up)"
    )
    print(
        f"CPU: import processes {run.import_cpu:.1f} s, PostgreSQL backends "
        f"{run.postgres_cpu:.1f} s, of {run.wall * cores:.0f} core-seconds"
    )
    print(
        f"peak RSS: import process {_mib(run.peak_parent)} MiB, largest worker "
        f"{_mib(run.peak_worker)} MiB, all together {_mib(run.peak_total)} MiB"
    )
    print(f"peak RSS by quarter of the resources stored (MiB): {quarters(run)}")
    print(f"timeline: {phases(run, MASTER_RESOURCES)}")
    ok = run.counts_ok and run.failures == 0 and run.unresolved == 0
    print(
        f"counts by type: {'as expected' if run.counts_ok else 'WRONG'}; failures: "
        f"{run.failures}; unresolved references: {run.unresolved} → {'OK' if ok else 'FAILED'}"
    )
    for problem in run.count_problems:
        print(f"  {problem} expected")
    if run.profile:
        print("py-spy (all import processes, 50 Hz):")
        print(run.profile)
    print()


def print_summary(runs: list[Run]) -> None:
    print("## summary")
    print(
        "| database | workers | set | resources | seconds | resources/s | peak RSS MiB "
        "(process / worker / all) | counts |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        ok = r.counts_ok and r.failures == 0 and r.unresolved == 0
        print(
            f"| {r.backend} | {r.workers} | {r.label} | {r.resources:,} | {r.seconds:.1f} | "
            f"{r.rate:,.0f} | {_mib(r.peak_parent)} / {_mib(r.peak_worker)} / "
            f"{_mib(r.peak_total)} | {'ok' if ok else 'WRONG'} |"
        )
    best = max((r.rate for r in runs if r.backend == "postgresql" and r.label == "full"), default=0)
    if best:
        verdict = "met" if best >= TARGET else "not met"
        print(f"\ntarget ≥ {TARGET:,.0f} resources/s on PostgreSQL: {verdict} (best {best:,.0f})")


# -- main -------------------------------------------------------------------------------------
def _runs(text: str) -> list[tuple[str, int]]:
    runs = []
    for item in text.split(","):
        backend, _, workers = item.strip().partition(":")
        if backend not in ("postgresql", "sqlite") or not workers.isdigit():
            raise argparse.ArgumentTypeError(f"'{item}' is not BACKEND:WORKERS")
        runs.append((backend, int(workers)))
    return runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=_runs,
        default="postgresql:1,postgresql:2,sqlite:1",
        help="BACKEND:WORKERS,… (default: %(default)s)",
    )
    parser.add_argument(
        "--no-half", action="store_true", help="skip the half-set runs (memory comparison)"
    )
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy run on PostgreSQL: when the target is missed (auto), always or never",
    )
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="PostgreSQL URL to create DBs")
    parser.add_argument("--quiet-busy", type=float, default=0.3, help="wait until CPU below")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="longest wait, seconds")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    print_header("Ingest: the Synthea set with `cityhealth import`", args.pg_admin)
    runs: list[Run] = []
    full_paths = [*master_paths(), SYNTHEA]
    with tempfile.TemporaryDirectory(prefix="ingest-half-") as tmp:
        half_paths, half_counts = half_set(Path(tmp))
        for backend, workers in args.runs:
            run = execute(Run(backend, workers, "full", full_paths, expected_full()), args)
            print_run(run)
            runs.append(run)
            if not args.no_half:
                half = execute(Run(backend, workers, "half", half_paths, half_counts), args)
                print_run(half)
                runs.append(half)
    pg = [r for r in runs if r.backend == "postgresql" and r.label == "full"]
    missed = bool(pg) and max(r.rate for r in pg) < TARGET
    if args.profile == "always" or (args.profile == "auto" and missed):
        if py_spy() is None:
            print("py-spy is not installed (.venv/bin/pip install py-spy): no profile\n")
        else:
            best = max(pg, key=lambda r: r.rate) if pg else None
            workers = best.workers if best else 2
            with tempfile.TemporaryDirectory(prefix="ingest-profile-") as tmp:
                run = Run("postgresql", workers, "full", full_paths, expected_full())
                print(
                    f"# profile: {run.name}, under py-spy (slower than the runs above; the "
                    "'import process' RSS is py-spy's)"
                )
                print_run(execute(run, args, Path(tmp) / "profile.txt"))
    print_summary(runs)
    return 0 if all(r.counts_ok and not r.failures and not r.unresolved for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
