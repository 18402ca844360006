"""The import journal: one row per finished Bundle file or NDJSON chunk, keyed by checksum and
written in the same transaction as the data, so that a re-run — or a run after a kill — skips
exactly what was stored."""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from cityhealth.fhir.clock import now_us
from cityhealth.fhir.schema import import_journal


class AlreadyImported(Exception):
    """Another transaction journaled the same checksum first."""


def is_done(conn: Connection, checksum: str) -> bool:
    query = select(import_journal.c.checksum).where(import_journal.c.checksum == checksum)
    return conn.execute(query).first() is not None


def claim(conn: Connection, checksum: str, source: str, force: bool) -> None:
    """Write the journal row before the data: a concurrent import of the same content then
    waits on the primary key and gives up instead of storing it twice."""
    if force:
        conn.execute(delete(import_journal).where(import_journal.c.checksum == checksum))
    try:
        conn.execute(
            insert(import_journal).values(
                checksum=checksum, source=source, resources=0, finished_at=now_us()
            )
        )
    except IntegrityError:
        raise AlreadyImported(source) from None


def finish(conn: Connection, checksum: str, resources: int) -> None:
    conn.execute(
        update(import_journal)
        .where(import_journal.c.checksum == checksum)
        .values(resources=resources, finished_at=now_us())
    )
