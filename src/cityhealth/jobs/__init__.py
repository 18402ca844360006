"""Background jobs in the database: claimed by any process, resumed after a restart."""

from cityhealth.jobs.runner import (
    ACCEPTED,
    CANCELLED,
    COMPLETED,
    FAILED,
    RUNNING,
    Job,
    JobContext,
    JobFailed,
    JobKind,
    JobRunner,
    JobStopped,
)

__all__ = [
    "ACCEPTED",
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "RUNNING",
    "Job",
    "JobContext",
    "JobFailed",
    "JobKind",
    "JobRunner",
    "JobStopped",
]
