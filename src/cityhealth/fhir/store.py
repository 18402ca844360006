"""Row-level writes of the FHIR store: current row, history row, index rows, compartment.

The repository decides what to write; this module only knows the tables. Every function runs
inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, and_, delete, insert, select, text, update

from cityhealth.fhir.clock import instant
from cityhealth.fhir.indexing import IndexRows
from cityhealth.fhir.schema import (
    INDEX_TABLES,
    compartment,
    resource,
    resource_history,
)

_INDEX_COLUMNS = {
    "token": ("system", "code", "text"),
    "string": ("value", "exact"),
    "date": ("low", "high"),
    "number": ("value", "low", "high"),
    "quantity": ("system", "code", "unit", "value", "low", "high"),
    "reference": ("target_type", "target_id", "url"),
    "uri": ("value",),
    "composite": (
        "system",
        "code",
        "v_system",
        "v_code",
        "v_value",
        "v_low",
        "v_high",
        "v_date_low",
        "v_date_high",
        "v_text",
    ),
}


@dataclass(frozen=True)
class Stored:
    """One stored version of a resource."""

    rid: int
    type: str
    id: str
    version: int
    last_updated: int  # microseconds since the epoch
    deleted: bool
    body: str | None  # JSON text as served (None for a delete)
    method: str = "PUT"

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def last_updated_instant(self) -> str:
        return instant(self.last_updated)


def current(conn: Connection, rtype: str, rid_id: str, *, lock: bool = False) -> Stored | None:
    query = select(resource).where(and_(resource.c.type == rtype, resource.c.id == rid_id))
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        return None
    return Stored(row.rid, row.type, row.id, row.version, row.last_updated, row.deleted, row.body)


def version(conn: Connection, rtype: str, rid_id: str, vid: int) -> Stored | None:
    h = resource_history
    row = conn.execute(
        select(h).where(and_(h.c.type == rtype, h.c.id == rid_id, h.c.version == vid))
    ).first()
    if row is None:
        return None
    return Stored(
        row.rid, row.type, row.id, row.version, row.last_updated, row.deleted, row.body, row.method
    )


#: From this many rows on, PostgreSQL gets them through COPY rather than INSERT.
COPY_THRESHOLD = 50


def _copy(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: Iterable[tuple[Any, ...]]
) -> None:
    """Bulk-load rows with PostgreSQL's COPY, inside the caller's transaction."""
    dbapi: Any = conn.connection.dbapi_connection  # a psycopg connection on PostgreSQL
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    with dbapi.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _bulk(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    if not rows:
        return
    if conn.dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        _copy(conn, table, columns, rows)
    else:
        conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])


def insert_new(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert current rows (type, id, version, last_updated, body); their rids, in order."""
    if not rows:
        return []
    if conn.dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        # Take the ids from the sequence first, so that the rows can go through COPY.
        rids = list(
            conn.execute(
                text("SELECT nextval('resource_rid_seq') FROM generate_series(1, :n)"),
                {"n": len(rows)},
            ).scalars()
        )
        columns = ("rid", "deleted", *rows[0])
        values = [(rid, False, *row.values()) for rid, row in zip(rids, rows, strict=True)]
        _bulk(conn, resource, columns, values)
        return [int(rid) for rid in rids]
    result = conn.execute(
        insert(resource).returning(resource.c.rid, sort_by_parameter_order=True),
        [{**row, "deleted": False} for row in rows],
    )
    return [int(rid) for rid in result.scalars()]


def replace_current(
    conn: Connection, rid: int, version_id: int, last_updated: int, body: str | None
) -> None:
    conn.execute(
        update(resource)
        .where(resource.c.rid == rid)
        .values(version=version_id, last_updated=last_updated, deleted=body is None, body=body)
    )


_HISTORY_COLUMNS = ("rid", "version", "type", "id", "last_updated", "method", "deleted", "body")


def add_history(conn: Connection, versions: list[Stored]) -> None:
    rows = [
        (v.rid, v.version, v.type, v.id, v.last_updated, v.method, v.deleted, v.body)
        for v in versions
    ]
    _bulk(conn, resource_history, _HISTORY_COLUMNS, rows)


def clear_index(conn: Connection, rid: int) -> None:
    for table in INDEX_TABLES.values():
        conn.execute(delete(table).where(table.c.rid == rid))
    conn.execute(delete(compartment).where(compartment.c.rid == rid))


def write_index(conn: Connection, entries: list[tuple[int, str, IndexRows, set[str]]]) -> None:
    """Index rows and compartment membership of (rid, type, rows, patient ids) entries, one
    statement per table for the whole batch."""
    for kind, table in INDEX_TABLES.items():
        batch = [(rid, rtype, *v) for rid, rtype, rows, _ in entries for v in getattr(rows, kind)]
        _bulk(conn, table, ("rid", "rtype", "param", *_INDEX_COLUMNS[kind]), batch)
    members = [(rid, p) for rid, _, _, patients in entries for p in patients]
    _bulk(conn, compartment, ("rid", "patient_id"), members)
