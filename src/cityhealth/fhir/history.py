"""History of a resource, a type or the whole system (http.html#history), newest first,
with `_since`, `_at`, `_count` and keyset paging that new versions cannot disturb."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, FromClause, and_, func, literal, or_, select, union_all

from cityhealth.fhir.datetimes import date_range
from cityhealth.fhir.errors import bad_request
from cityhealth.fhir.schema import resource, resource_history
from cityhealth.fhir.search import decode_cursor, encode_cursor
from cityhealth.fhir.search_sql import own_rows
from cityhealth.fhir.store import APPEND_ONLY, Stored
from cityhealth.security.visibility import Visibility


@dataclass
class HistoryQuery:
    rtype: str | None = None
    rid: str | None = None
    row: tuple[int, int] | None = None  # (shard, rid) of the resource: instance history
    since: int | None = None  # microseconds, inclusive
    at: tuple[int, int] | None = None  # [low, high): versions current at some point in it
    count: int = 20
    cursor: str | None = None


@dataclass
class HistoryPage:
    entries: list[Stored] = field(default_factory=list)
    next_cursor: str | None = None
    total: int | None = None


def parse_history_params(
    params: list[tuple[str, str]], default_count: int, max_count: int
) -> HistoryQuery:
    query = HistoryQuery(count=default_count)
    for name, value in params:
        if name in ("_since", "_at"):
            try:
                low, high = date_range(value)
            except ValueError:
                raise bad_request(f"{name} must be a FHIR instant, not '{value}'") from None
            if name == "_since":
                query.since = low
            else:
                query.at = (low, high)
        elif name == "_count":
            if not value.isdigit():
                raise bad_request(f"_count must be a non-negative integer, not '{value}'")
            query.count = min(int(value), max_count)
        elif name == "_cursor":
            query.cursor = value
        elif name not in ("_format", "_pretty", "_list", "_sort"):
            raise bad_request(f"Unknown history parameter '{name}'")
    return query


def _versions(rtype: str | None) -> FromClause:
    """The versions a history of `rtype` (None: every type) reads: the history rows, and the
    current rows of the append-only types, which are their only version."""
    h, r = resource_history, resource
    if rtype is not None and rtype not in APPEND_ONLY:
        return h
    current = select(
        *(literal("POST").label("method") if c.name == "method" else r.c[c.name] for c in h.c)
    ).where(or_(*(r.c.type == t for t in sorted(APPEND_ONLY))))
    if rtype is not None:
        return current.subquery()
    return union_all(select(h), current).subquery()


def history(
    conn: Connection, query: HistoryQuery, visibility: Visibility | None = None
) -> HistoryPage:
    """A page of versions, newest first; with `visibility`, only versions of the resources the
    caller sees now (a deleted resource is then seen by the platform alone)."""
    h = _versions(query.rtype)
    where = []
    r = resource.alias("v")
    seen = visibility.clause(r) if visibility is not None else None
    if seen is not None:
        visible = select(r.c.shard, r.c.rid).where(r.c.deleted.is_(False), seen)
        where.append(own_rows(h, visible, conn.dialect.name))
    if query.rtype:
        where.append(h.c.type == query.rtype)
    if query.rid:
        where.append(h.c.id == query.rid)
    if query.row is not None:  # one shard, and the primary key rather than the type's versions
        where.extend([h.c.shard == query.row[0], h.c.rid == query.row[1]])
    if query.since is not None:
        where.append(h.c.last_updated >= query.since)
    if query.at is not None:
        low, high = query.at
        later = _versions(query.rtype).alias()
        superseded_at = (
            select(func.min(later.c.last_updated))
            .where(
                later.c.shard == h.c.shard,
                later.c.rid == h.c.rid,
                later.c.version > h.c.version,
            )
            .scalar_subquery()
        )
        # A version is current from its own lastUpdated until the next version's.
        where.append(h.c.last_updated < high)
        where.append(or_(superseded_at.is_(None), superseded_at > low))
    page = HistoryPage()
    if not query.cursor:
        page.total = conn.execute(select(func.count()).select_from(h).where(*where)).scalar()
    else:
        _, keys = decode_cursor(query.cursor)
        if len(keys) != 3 or not all(type(k) is int for k in keys):
            raise bad_request("The paging cursor does not match this history")
        updated, rid, version = keys
        where.append(
            or_(
                h.c.last_updated < updated,
                and_(h.c.last_updated == updated, h.c.rid < rid),
                and_(h.c.last_updated == updated, h.c.rid == rid, h.c.version < version),
            )
        )
    rows = conn.execute(
        select(h)
        .where(*where)
        .order_by(h.c.last_updated.desc(), h.c.rid.desc(), h.c.version.desc())
        .limit(query.count + 1)
    ).all()
    more = len(rows) > query.count
    rows = rows[: query.count]
    page.entries = [
        Stored(r.rid, r.shard, r.type, r.id, r.version, r.last_updated, r.deleted, r.body, r.method)
        for r in rows
    ]
    if more and rows:
        last = rows[-1]
        page.next_cursor = encode_cursor("n", [last.last_updated, last.rid, last.version])
    return page
