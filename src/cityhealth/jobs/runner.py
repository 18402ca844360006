"""Background jobs kept in the `job` table, so they survive a restart and any process may run them.

A job is claimed in a short write transaction: `FOR UPDATE SKIP LOCKED` on PostgreSQL (several
processes poll the same table), the write lock on SQLite (BEGIN IMMEDIATE). While it runs, the
job's `updated_at` is its heartbeat and its claim token: a job whose heartbeat is older than the
stale limit was left by a dead process and is claimed again, from the start, so every kind of
job must be idempotent. A heartbeat that no longer matches tells the running job it was
cancelled (or claimed by someone else) and stops it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, delete, insert, or_, select, update

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir.clock import now_us
from cityhealth.fhir.schema import job

log = logging.getLogger("cityhealth.jobs")

ACCEPTED = "accepted"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})

_US = 1_000_000
_EXPIRY_BATCH = 100


class JobFailed(Exception):
    """A job cannot be done for a reason its owner should read (stored as the job's error)."""


class JobStopped(Exception):
    """The job must stop now: it was cancelled, claimed by another runner, or the runner stops."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "cancelled" | "lost" | "shutdown"


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    status: str
    request: dict[str, Any]
    progress: str | None
    result: dict[str, Any] | None
    error: str | None
    created_at: int  # epoch microseconds
    updated_at: int
    expires_at: int | None
    owner: str | None

    def expired(self, now: int) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class JobKind(Protocol):
    """What a runner needs from a kind of job."""

    kind: str

    def run(self, context: JobContext) -> dict[str, Any]:
        """Do the job from the start and return its result (stored as JSON)."""

    def discard(self, job_id: str) -> None:
        """Remove whatever the job left outside the database (files); idempotent."""

    def retention_us(self) -> int:
        """How long a finished job and its output are kept."""


@dataclass
class JobContext:
    """A claimed job as its kind sees it: what was asked, and a heartbeat to report progress."""

    id: str
    kind: str
    request: dict[str, Any]
    owner: str | None
    _runner: JobRunner = field(repr=False)
    _token: int = field(repr=False)
    _last_beat: float = field(default=0.0, repr=False)

    def progress(self, text: str, force: bool = False) -> None:
        """Record progress (at most once a second unless forced); raises JobStopped when the
        job was cancelled or taken over, or the runner is stopping."""
        if self._runner.stopping:
            raise JobStopped("shutdown")
        now = time.monotonic()
        if not force and now - self._last_beat < 1.0:
            return
        self._token = self._runner.heartbeat(self.id, self._token, text)
        self._last_beat = now

    @property
    def token(self) -> int:
        return self._token


class JobRunner:
    """Claims and runs the jobs of the kinds it knows; `start()` runs it on a daemon thread."""

    def __init__(
        self,
        db: Database,
        kinds: list[JobKind],
        poll_seconds: float = 2.0,
        stale_seconds: float = 300.0,
        expiry_every_seconds: float = 300.0,
    ) -> None:
        self.db = db
        self.kinds = {k.kind: k for k in kinds}
        self.poll_seconds = poll_seconds
        self.stale_us = int(stale_seconds * _US)
        self.expiry_every_seconds = expiry_every_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, db: Database, kinds: list[JobKind], settings: Settings) -> JobRunner:
        return cls(
            db,
            kinds,
            poll_seconds=float(getattr(settings, "jobs_poll_seconds", 2.0)),
            stale_seconds=float(getattr(settings, "jobs_stale_seconds", 300.0)),
        )

    # -- the job table ------------------------------------------------------------------------
    def submit(
        self, kind: str, request: dict[str, Any], owner: str | None, job_id: str | None = None
    ) -> str:
        if kind not in self.kinds:
            raise ValueError(f"no runner for jobs of kind '{kind}'")
        job_id = job_id or uuid.uuid4().hex
        now = now_us()
        with self.db.write() as conn:
            conn.execute(
                insert(job).values(
                    id=job_id,
                    kind=kind,
                    status=ACCEPTED,
                    request=orjson.dumps(request).decode(),
                    created_at=now,
                    updated_at=now,
                    owner=owner,
                )
            )
        self._wake.set()
        return job_id

    def get(self, job_id: str) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute(select(job).where(job.c.id == job_id)).first()
        if row is None:
            return None
        return Job(
            id=row.id,
            kind=row.kind,
            status=row.status,
            request=orjson.loads(row.request),
            progress=row.progress,
            result=orjson.loads(row.result) if row.result else None,
            error=row.error,
            created_at=row.created_at,
            updated_at=row.updated_at,
            expires_at=row.expires_at,
            owner=row.owner,
        )

    def cancel(self, job_id: str) -> bool:
        """Cancel a job in any state (a finished one: its output is no longer wanted) and
        remove its output; a running job notices at its next heartbeat. False if unknown."""
        now = now_us()
        with self.db.write() as conn:
            row = conn.execute(
                select(job.c.kind).where(job.c.id == job_id, job.c.status != CANCELLED)
            ).first()
            if row is None:
                return False
            conn.execute(
                update(job)
                .where(job.c.id == job_id)
                .values(status=CANCELLED, updated_at=now, expires_at=now)
            )
        kind = self.kinds.get(row.kind)
        if kind is not None:
            kind.discard(job_id)
        return True

    def heartbeat(self, job_id: str, token: int, progress: str) -> int:
        """Record progress of a claimed job; the new token, or JobStopped if the claim is gone."""
        now = now_us()
        with self.db.write() as conn:
            changed = conn.execute(
                update(job)
                .where(job.c.id == job_id, job.c.status == RUNNING, job.c.updated_at == token)
                .values(progress=progress, updated_at=now)
            ).rowcount
        if not changed:
            raise JobStopped(self._why_lost(job_id))
        return now

    def _why_lost(self, job_id: str) -> str:
        with self.db.read() as conn:
            status = conn.execute(select(job.c.status).where(job.c.id == job_id)).scalar()
        return "cancelled" if status in (None, CANCELLED) else "lost"

    def _claim(self) -> tuple[Job, int] | None:
        now = now_us()
        query = (
            select(job.c.id)
            .where(
                job.c.kind.in_(sorted(self.kinds)),
                or_(
                    job.c.status == ACCEPTED,
                    and_(job.c.status == RUNNING, job.c.updated_at < now - self.stale_us),
                ),
            )
            .order_by(job.c.created_at)
            .limit(1)
        )
        if self.db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        with self.db.write() as conn:
            job_id = conn.execute(query).scalar()
            if job_id is None:
                return None
            conn.execute(
                update(job)
                .where(job.c.id == job_id)
                .values(status=RUNNING, progress=None, error=None, updated_at=now)
            )
        claimed = self.get(job_id)
        return (claimed, now) if claimed is not None else None

    def _finish(self, job_id: str, token: int, **values: Any) -> bool:
        now = now_us()
        with self.db.write() as conn:
            return bool(
                conn.execute(
                    update(job)
                    .where(job.c.id == job_id, job.c.status == RUNNING, job.c.updated_at == token)
                    .values(updated_at=now, **values)
                ).rowcount
            )

    # -- running ------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_pending(self) -> int:
        """Run claimable jobs one after another until none is left; how many were run."""
        done = 0
        while not self.stopping and (claimed := self._claim()) is not None:
            self._execute(*claimed)
            done += 1
        return done

    def _execute(self, claimed: Job, token: int) -> None:
        kind = self.kinds[claimed.kind]
        context = JobContext(claimed.id, claimed.kind, claimed.request, claimed.owner, self, token)
        retention = kind.retention_us()
        try:
            result = kind.run(context)
        except JobStopped as stop:
            self._stopped(kind, context, stop.reason)
            return
        except JobFailed as error:
            kind.discard(claimed.id)
            outcome: dict[str, Any] = {"status": FAILED, "error": str(error)}
        except Exception:
            reason = self._why_lost(claimed.id)
            if reason == "cancelled":
                # Its output was removed under it (a cancel between two heartbeats).
                self._stopped(kind, context, reason)
                return
            log.exception("job %s (%s) failed", claimed.id, claimed.kind)
            kind.discard(claimed.id)
            outcome = {"status": FAILED, "error": f"The {claimed.kind} job failed; it was logged"}
        else:
            outcome = {"status": COMPLETED, "result": orjson.dumps(result).decode()}
        outcome["expires_at"] = now_us() + retention
        if not self._finish(claimed.id, context.token, progress=None, **outcome):
            self._stopped(kind, context, self._why_lost(claimed.id))

    def _stopped(self, kind: JobKind, context: JobContext, reason: str) -> None:
        # A job that does not complete leaves nothing behind, unless another runner owns it now.
        if reason == "lost":
            return
        kind.discard(context.id)
        if reason == "shutdown":
            # Back in the queue, so that the next start resumes it at once.
            self._finish(context.id, context.token, status=ACCEPTED, progress=None)

    def expire(self) -> int:
        """Delete finished jobs past their expiry, output first; how many were removed."""
        removed = 0
        while True:
            now = now_us()
            with self.db.read() as conn:
                rows = conn.execute(
                    select(job.c.id, job.c.kind)
                    .where(
                        job.c.kind.in_(sorted(self.kinds)),
                        job.c.status.in_(sorted(FINISHED)),
                        job.c.expires_at <= now,
                    )
                    .limit(_EXPIRY_BATCH)
                ).all()
            for row in rows:
                self.kinds[row.kind].discard(row.id)
                with self.db.write() as conn:
                    conn.execute(delete(job).where(job.c.id == row.id))
            removed += len(rows)
            if len(rows) < _EXPIRY_BATCH:
                return removed

    # -- the background thread ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cityhealth-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; a running job is put back in the queue for the next start."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        if not thread.is_alive():
            # Stopped for good: the runner may be started again, or driven by run_pending().
            self._stop.clear()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        next_expiry = 0.0
        while not self._stop.is_set():
            # Cleared before the pass, so that a job submitted during it wakes the next one.
            self._wake.clear()
            self._guarded(self.run_pending)
            if time.monotonic() >= next_expiry:
                self._guarded(self.expire)
                next_expiry = time.monotonic() + self.expiry_every_seconds
            self._wake.wait(self.poll_seconds)

    @staticmethod
    def _guarded(step: Callable[[], int]) -> None:
        try:
            step()
        except Exception:
            # The database may be briefly unavailable; the next poll tries again.
            log.exception("job runner pass failed")
