"""Row-level writes of the FHIR store: current row, history row, index rows, compartment.

The repository decides what to write; this module only knows the tables. Every function runs
inside the caller's transaction. Every statement that touches one resource's rows names its
`shard` as well as its `rid`, so that on a distributed database it goes to one shard, and no
statement ever changes a row's `shard` (docs/scaling.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, CursorResult, Float, Integer, Table, insert, text

from cityhealth.db import PREPARED
from cityhealth.fhir import jsonio
from cityhealth.fhir.clock import instant
from cityhealth.fhir.indexing import IndexRows
from cityhealth.fhir.schema import (
    INDEX_TABLES,
    care_link,
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
    shard: int  # sharding.shard_key: the same on every row of the resource
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


_COLUMNS = "rid, shard, type, id, version, last_updated, deleted, body"
_PG_TEXT: dict[str, str] = {}


def run(conn: Connection, sql: str, params: Any = (), prepare: bool = True) -> CursorResult[Any]:
    """Execute a fixed statement written with `?` placeholders straight through the driver.

    The hot statements of every request skip SQLAlchemy's expression building and compiling,
    which cost more than the statements themselves; on PostgreSQL they are prepared, so that
    they are neither parsed nor planned again (`prepare` False for a text that varies)."""
    if conn.dialect.name == "postgresql":
        sql = _PG_TEXT.get(sql) or _PG_TEXT.setdefault(sql, sql.replace("?", "%s"))
    return conn.exec_driver_sql(sql, params, execution_options=_OPTIONS[prepare])


_OPTIONS = {True: {PREPARED: True}, False: {}}


def stored_row(row: Any, method: str = "PUT") -> Stored:
    rid, shard, rtype, rid_id, version_id, updated, deleted, body = row[:8]
    return Stored(rid, shard, rtype, rid_id, version_id, updated, bool(deleted), body, method)


def current(
    conn: Connection, rtype: str, rid_id: str, *, shard: int | None = None
) -> Stored | None:
    """The current row of `rtype/rid_id`; `shard`, when the caller knows it, keeps the lookup
    on one shard of a distributed database."""
    sql = f"SELECT {_COLUMNS} FROM resource WHERE type = ? AND id = ?"
    params: tuple[Any, ...] = (rtype, rid_id)
    if shard is not None:
        sql += " AND shard = ?"
        params += (shard,)
    row = run(conn, sql, params).first()
    return None if row is None else stored_row(row)


def locked(conn: Connection, rtype: str, rid_id: str, shard: int) -> Stored | None:
    """The current row of `rtype/rid_id` if it is on `shard`, locked until the transaction
    ends (a distributed database locks rows only in a query on one shard)."""
    sql = f"SELECT {_COLUMNS} FROM resource WHERE type = ? AND id = ? AND shard = ?"
    if conn.dialect.name == "postgresql":
        sql += " FOR UPDATE"
    row = run(conn, sql, (rtype, rid_id, shard)).first()
    return None if row is None else stored_row(row)


def version(
    conn: Connection, rtype: str, rid_id: str, vid: int, *, shard: int | None = None
) -> Stored | None:
    sql = f"SELECT {_COLUMNS}, method FROM resource_history WHERE type = ? AND id = ?"
    params: tuple[Any, ...] = (rtype, rid_id)
    if shard is not None:
        sql += " AND shard = ?"
        params += (shard,)
    row = run(conn, sql + " AND version = ?", (*params, vid)).first()
    return None if row is None else stored_row(row, row.method)


#: Records of access: added, never changed or deleted. Their current row is their only version
#: (no history row: history and vread read it from `resource`); their index and chain rows
#: are written by cityhealth.security.audit.settle, for many at a time, shortly after.
APPEND_ONLY = frozenset({"AuditEvent"})


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


def bulk(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    if not rows:
        return
    insert = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
    marks = f"({', '.join('?' * len(columns))})"
    if conn.dialect.name != "postgresql":
        run(conn, insert + marks, rows)  # sqlite3's executemany loops in C
    elif len(rows) >= COPY_THRESHOLD:
        _copy(conn, table, columns, rows)
    else:  # one statement, not one per row as psycopg's executemany sends
        sql = insert + ", ".join([marks] * len(rows))  # a text per row count: prepared if one
        run(conn, sql, tuple(v for row in rows for v in row), prepare=len(rows) == 1)


def insert_new(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert current rows (shard, type, id, version, last_updated, body); their rids, in
    order."""
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
        bulk(conn, resource, columns, values)
        return [int(rid) for rid in rids]
    if len(rows) == 1:
        row = rows[0]
        sql = (
            "INSERT INTO resource (shard, type, id, version, last_updated, body, deleted)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING rid"
        )
        one = (
            row["shard"],
            row["type"],
            row["id"],
            row["version"],
            row["last_updated"],
            row["body"],
            False,
        )
        return [int(run(conn, sql, one).scalar_one())]
    result = conn.execute(
        insert(resource).returning(resource.c.rid, sort_by_parameter_order=True),
        [{**row, "deleted": False} for row in rows],
    )
    return [int(rid) for rid in result.scalars()]


def replace_current(
    conn: Connection, rid: int, shard: int, version_id: int, last_updated: int, body: str | None
) -> None:
    run(
        conn,
        "UPDATE resource SET version = ?, last_updated = ?, deleted = ?, body = ?"
        " WHERE shard = ? AND rid = ?",
        (version_id, last_updated, body is None, body, shard, rid),
    )


_HISTORY_COLUMNS = (
    "rid",
    "version",
    "shard",
    "type",
    "id",
    "last_updated",
    "method",
    "deleted",
    "body",
)


def _history_row(v: Stored) -> tuple[Any, ...]:
    return (v.rid, v.version, v.shard, v.type, v.id, v.last_updated, v.method, v.deleted, v.body)


def add_history(conn: Connection, versions: list[Stored]) -> None:
    bulk(conn, resource_history, _HISTORY_COLUMNS, [_history_row(v) for v in versions])


def move(conn: Connection, previous: Stored, new: Stored) -> None:
    """Replace the current row `previous` by `new`, which has another shard (its compartment
    patient changed), and take the earlier versions along; the caller has cleared the index.

    A distributed database cannot change a row's distribution column in place, so the rows are
    deleted and inserted again, under the same rid."""
    key = (previous.shard, previous.rid)
    earlier = [
        replace(stored_row(row, row.method), shard=new.shard)
        for row in run(
            conn,
            f"SELECT {_COLUMNS}, method FROM resource_history WHERE shard = ? AND rid = ?",
            key,
        )
    ]
    run(conn, "DELETE FROM resource_history WHERE shard = ? AND rid = ?", key)
    run(conn, "DELETE FROM resource WHERE shard = ? AND rid = ?", key)
    row = (new.rid, new.shard, new.type, new.id, new.version, new.last_updated, new.deleted)
    run(
        conn,
        f"INSERT INTO resource ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (*row, new.body),
    )
    add_history(conn, earlier)


_CLEARED = [*(t.name for t in INDEX_TABLES.values()), care_link.name, compartment.name]
# PostgreSQL: one round trip for all the tables (most of the DELETEs find nothing).
_CLEAR_ALL = (
    "WITH "
    + ", ".join(
        f"d{n} AS (DELETE FROM {name} WHERE shard = %(shard)s AND rid = %(rid)s)"
        for n, name in enumerate(_CLEARED[:-1])
    )
    + f" DELETE FROM {_CLEARED[-1]} WHERE shard = %(shard)s AND rid = %(rid)s"
)


def clear_index(conn: Connection, shard: int, rid: int) -> None:
    """Remove the index rows, care links and compartment membership of one resource."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_CLEAR_ALL, {"shard": shard, "rid": rid}, _OPTIONS[True])
    else:  # SQLite has no data-modifying WITH; its statements cost no round trip
        for name in _CLEARED:
            run(conn, f"DELETE FROM {name} WHERE shard = ? AND rid = ?", (shard, rid))


@dataclass(frozen=True)
class IndexEntry:
    """What write_index stores for one resource."""

    rid: int
    shard: int
    type: str
    rows: IndexRows
    patients: set[str]  # the Patient compartments it belongs to
    #: relations of care it establishes: (relation, actor, patient), see security.care_links
    links: list[tuple[str, str, str]] = field(default_factory=list)


def _sql_type(column: Any) -> str:
    if isinstance(column.type, Float):
        return "float8"
    return "bigint" if isinstance(column.type, Integer) else "text"


def _json_insert(table: Table, columns: tuple[str, ...]) -> str:
    """INSERT of the rows given as one JSON array of arrays (one parameter, however many)."""
    values = ", ".join(f"(r->>{n})::{_sql_type(table.c[name])}" for n, name in enumerate(columns))
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"SELECT {values} FROM json_array_elements(%s::json) AS r"
    )


_LINK_COLUMNS = ("rid", "shard", "rtype", "relation", "actor", "patient_id")
_INDEX_TARGETS: list[tuple[Table, tuple[str, ...]]] = [
    (table, ("rid", "shard", "rtype", "param", *_INDEX_COLUMNS[kind]))
    for kind, table in INDEX_TABLES.items()
] + [
    (care_link, _LINK_COLUMNS),
    (compartment, ("rid", "shard", "patient_id")),
]
# PostgreSQL: every index table in one fixed statement, a table's rows in one JSON parameter:
# the driver neither parses the text again nor sends it again (prepared), whatever the rows.
_WRITE_INDEX = (
    "WITH "
    + ", ".join(
        f"w{n} AS ({_json_insert(table, columns)})"
        for n, (table, columns) in enumerate(_INDEX_TARGETS[:-1])
    )
    + " "
    + _json_insert(*_INDEX_TARGETS[-1])
)


_FLOATS = {
    table
    for table, columns in _INDEX_TARGETS
    if any(_sql_type(table.c[c]) == "float8" for c in columns)
}


def _spelled(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """JSON has no infinity (an open range's bound): PostgreSQL reads these spellings as it."""
    return tuple(
        ("Infinity" if v > 0 else "-Infinity") if isinstance(v, float) and math.isinf(v) else v
        for v in row
    )


def write_index(conn: Connection, entries: list[IndexEntry]) -> None:
    """Index rows and compartment membership of the entries: on PostgreSQL one fixed
    statement unless some table gets a bulk load's share (COPY), else one per table."""
    if not entries:
        return
    batches: list[tuple[Table, tuple[str, ...], list[tuple[Any, ...]]]] = []
    for kind, table in INDEX_TABLES.items():
        rows = [(e.rid, e.shard, e.type, *v) for e in entries for v in getattr(e.rows, kind)]
        columns = ("rid", "shard", "rtype", "param", *_INDEX_COLUMNS[kind])
        batches.append((table, columns, rows))
    links = [(e.rid, e.shard, e.type, *link) for e in entries for link in e.links]
    batches.append((care_link, _LINK_COLUMNS, links))
    members = [(e.rid, e.shard, p) for e in entries for p in e.patients]
    batches.append((compartment, ("rid", "shard", "patient_id"), members))
    if conn.dialect.name == "postgresql" and all(len(b[2]) < COPY_THRESHOLD for b in batches):
        params = tuple(
            jsonio.dumps([_spelled(row) for row in rows] if table in _FLOATS else rows).decode()
            for table, _, rows in batches
        )
        conn.exec_driver_sql(_WRITE_INDEX, params, _OPTIONS[True])
        return
    for table, columns, rows in batches:
        bulk(conn, table, columns, rows)
