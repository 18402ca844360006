"""`cityhealth import PATH…`: load transaction/batch Bundle files and NDJSON files into the store.

Paths are taken in the order given and each one completes before the next starts, so master
data (e.g. Synthea's hospital and practitioner bundles) named first is in place when later
files refer to it; the files of one path (a directory's, in name order) may run in parallel
among themselves. Each Bundle file and each NDJSON chunk is one transaction that also writes
its journal row, so a re-run — or a run after a kill — skips what is done (`force` redoes it).

On PostgreSQL the units run in a pool of worker processes, each with its own engine; SQLite
has a single writer, so it imports in the calling process.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.progress import Task as RichTask
from rich.text import Text
from sqlalchemy import text

from cityhealth.config import Settings, get_settings
from cityhealth.db import Database
from cityhealth.fhir.definitions import Definitions, get_definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.import_sources import NDJSON, Chunk, SourceFile, chunks, expand
from cityhealth.fhir.import_units import BundleTask, UnitResult, one_line, run_unit
from cityhealth.fhir.packages import PackageError
from cityhealth.fhir.schema import (
    INDEX_TABLES,
    care_link,
    compartment,
    resource,
    resource_history,
)

Progress = Callable[[int], None]
_STATISTICS_TABLES = [
    table.name
    for table in (resource, resource_history, compartment, care_link, *INDEX_TABLES.values())
]


@dataclass
class FileReport:
    path: str
    resources: int = 0
    bundles: int = 0
    skipped: int = 0  # bundles or chunks the journal says are done
    failures: list[dict[str, Any]] = field(default_factory=list)
    chunks: int = 0  # NDJSON chunks stored
    notes: list[str] = field(default_factory=list)
    _skipped_lines: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def add(self, unit: UnitResult) -> None:
        self.resources += unit.resources
        self.bundles += unit.bundles
        self.chunks += unit.chunks
        self.skipped += unit.skipped
        self.failures.extend(unit.failures)
        self.notes.extend(unit.notes)
        if unit.skipped_lines:
            self._skipped_lines.append(unit.skipped_lines)

    def close(self) -> None:
        """Turn the skipped NDJSON chunks into notes of merged line ranges."""
        merged: list[list[int]] = []
        for first, last in sorted(self._skipped_lines):
            if merged and merged[-1][1] + 1 == first:
                merged[-1][1] = last
            else:
                merged.append([first, last])
        self.notes.extend(f"lines {first}-{last} already imported" for first, last in merged)
        self._skipped_lines.clear()

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "resources": self.resources,
            "bundles": self.bundles,
            "chunks": self.chunks,
            "skipped": self.skipped,
            "failures": self.failures,
            "notes": self.notes,
        }

    def summary(self) -> str:
        done = [f"{self.resources:,} resources"]
        if self.bundles:
            done.append(f"{self.bundles} bundle{'s' if self.bundles > 1 else ''}")
        if self.chunks:
            done.append(f"{self.chunks} chunk{'s' if self.chunks > 1 else ''}")
        if self.skipped:
            done.append(f"{self.skipped} skipped as already imported")
        if self.failures:
            done.append(f"{len(self.failures)} failed")
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.path}: {', '.join(done)}{notes}"


@dataclass
class ImportReport:
    files: list[FileReport]
    resources: int
    seconds: float
    workers: int
    database: str

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [failure for f in self.files for failure in f.failures]

    @property
    def skipped(self) -> int:
        return sum(f.skipped for f in self.files)

    @property
    def resources_per_second(self) -> float:
        return self.resources / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "resources": self.resources,
            "skipped": self.skipped,
            "failures": len(self.failures),
            "seconds": round(self.seconds, 3),
            "resources_per_second": round(self.resources_per_second, 1),
            "workers": self.workers,
            "database": self.database,
            "files": [f.as_json() for f in self.files],
        }


def default_workers(db: Database) -> int:
    """One per CPU on PostgreSQL; one on SQLite, which has a single writer."""
    return 1 if db.is_sqlite else os.cpu_count() or 1


def run_import(
    engine: FhirEngine,
    paths: list[Path],
    *,
    force: bool = False,
    workers: int = 1,
    progress: Progress | None = None,
) -> ImportReport:
    """Import `paths` in order; `progress` is called after each bundle or chunk with the number
    of resources it stored (an exception it raises stops the import, as a kill would)."""
    started = time.perf_counter()
    workers = 1 if engine.db.is_sqlite else max(1, workers)
    reports: list[FileReport] = []
    with _UnitRunner(engine, workers, force) as submit:
        for group in expand(paths):
            by_path = {}
            for source in group:
                report = FileReport(source.label)
                if source.problem:
                    report.failures.append(
                        {"where": source.label, "status": 400, "diagnostics": source.problem}
                    )
                by_path[source.label] = report
                reports.append(report)

            def finished(unit: UnitResult, by_path: dict[str, FileReport] = by_path) -> None:
                by_path[unit.path].add(unit)
                if progress is not None:
                    progress(unit.resources)

            # In flight: one unit inline (reported as soon as it commits), two per process.
            _run_all(submit, _tasks(group), 1 if workers == 1 else 2 * workers, finished)
    for report in reports:
        report.close()
    total = sum(r.resources for r in reports)
    if total:
        _refresh_statistics(engine.db)
    return ImportReport(reports, total, time.perf_counter() - started, workers, engine.db.dialect)


# -- scheduling -------------------------------------------------------------------------------
Task = BundleTask | Chunk
Submit = Callable[[Task], "Future[UnitResult]"]


def _tasks(group: list[SourceFile]) -> Iterator[Task]:
    """The units of a group's files; NDJSON chunks are read only as they are submitted."""
    for source in group:
        if source.problem:
            continue
        if source.kind == NDJSON:
            yield from chunks(source.path)
        else:
            yield BundleTask(source.label, source.walked)


def _run_all(
    submit: Submit, tasks: Iterator[Task], limit: int, finished: Callable[[UnitResult], None]
) -> None:
    """Keep at most `limit` units in flight and hand each result over as it completes."""
    pending: set[Future[UnitResult]] = set()
    for task in tasks:
        pending.add(submit(task))
        if len(pending) >= limit:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(future.result())
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            finished(future.result())


class _UnitRunner:
    """Runs units in this process (one worker) or in a pool of processes with their own
    engines; leaving it cancels what has not started."""

    def __init__(self, engine: FhirEngine, workers: int, force: bool) -> None:
        self.engine, self.workers, self.force = engine, workers, force
        self.pool: Executor | None = None

    def __enter__(self) -> Submit:
        if self.workers == 1:
            return self._inline
        url = self.engine.db.url.render_as_string(hide_password=False)
        self.pool = ProcessPoolExecutor(
            self.workers,
            # A fresh interpreter per worker: forking would copy open connections and threads.
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(url, self.engine.definitions, self.engine.settings),
        )
        pool = self.pool
        return lambda task: pool.submit(_run_in_worker, task, self.force)

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _inline(self, task: Task) -> Future[UnitResult]:
        future: Future[UnitResult] = Future()
        future.set_result(run_unit(self.engine, task, self.force))
        return future


_worker_engines: list[FhirEngine] = []


def _start_worker(url: str, definitions: Definitions, settings: Settings) -> None:
    _worker_engines.append(FhirEngine(Database(url, pool_size=1), definitions, settings))


def _run_in_worker(task: Task, force: bool) -> UnitResult:
    return run_unit(_worker_engines[0], task, force)


def _refresh_statistics(db: Database) -> None:
    """Fresh planner statistics after a bulk load, so searches stay index-bound. PostgreSQL
    also vacuums: rows loaded by COPY are not marked all-visible until then, and searches pick
    their page from covering indexes by index-only scans."""
    if db.is_postgres:
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM (ANALYZE) {', '.join(_STATISTICS_TABLES)}"))
    else:
        with db.write() as conn:
            conn.execute(text("ANALYZE"))


# -- command line -----------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add the `import` command to the CLI."""
    app.command("import")(import_command)


def import_command(
    paths: list[Path] = typer.Argument(
        ...,
        help="Bundle (.json, .json.gz) and NDJSON (.ndjson, .ndjson.gz) files and directories "
        "of them, imported in this order; a directory's files in name order.",
    ),
    force: bool = typer.Option(False, "--force", help="Re-import what was imported before."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        help="Parallel processes on PostgreSQL (default: one per CPU); SQLite always uses 1.",
    ),
    report: Path | None = typer.Option(None, "--report", help="Write the report as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import FHIR Bundles and NDJSON; what a previous run finished is skipped."""
    # Imported here: pool workers load this module and need no migrations.
    from cityhealth.migrate import upgrade

    settings = get_settings()
    try:
        definitions = get_definitions()
        upgrade(settings.database_url)
    except PackageError as error:
        _fail(str(error))
    except Exception as error:  # one clear line instead of a traceback
        _fail(f"cannot prepare the database: {one_line(error)}")
    db = Database(settings.database_url)
    engine = FhirEngine(db, definitions, settings)
    console = Console(stderr=True)
    try:
        with _progress_bar(console, not quiet and console.is_terminal) as progress:
            result = run_import(
                engine,
                paths,
                force=force,
                workers=workers or default_workers(db),
                progress=progress,
            )
    except KeyboardInterrupt:
        _fail("interrupted; what was committed is journaled: run the same command to resume", 130)
    except Exception as error:  # e.g. the database went away: one line, not a traceback
        _fail(f"import stopped: {type(error).__name__}: {one_line(error)}")
    finally:
        db.dispose()
    _print_report(result)
    if report is not None:
        try:
            report.write_bytes(orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2))
        except OSError as error:
            _fail(f"cannot write the report: {error}")
    if result.failures:
        raise typer.Exit(1)


def _print_report(result: ImportReport) -> None:
    for file in result.files:
        typer.echo(file.summary())
    for failure in result.failures:
        typer.secho(
            f"failed: {failure['where']}: {failure['status']} {failure['diagnostics']}",
            fg=typer.colors.RED,
            err=True,
        )
    typer.echo(
        f"{result.resources:,} resources from {len(result.files)} files in "
        f"{result.seconds:.1f} s ({result.resources_per_second:,.0f} resources/s, "
        f"{result.workers} worker{'s' if result.workers > 1 else ''}, {result.database}); "
        f"{result.skipped} skipped as already imported, {len(result.failures)} failed"
    )


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class _RateColumn(ProgressColumn):
    def render(self, task: RichTask) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{task.completed:,.0f} resources  {rate:,.0f} resources/s")


@contextmanager
def _progress_bar(console: Console, show: bool) -> Iterator[Progress | None]:
    if not show:
        yield None
        return
    with RichProgress(
        SpinnerColumn(),
        TextColumn("importing"),
        BarColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("import", total=None)
        yield lambda resources: bar.advance(task, resources)
