"""Run a parsed search: one SQL statement for the page (keyset paging, `LIMIT n+1`), one per
include round, and a count only when the client asks for it.

Sort keys are correlated subqueries over the resource's own index rows (same shard, same rid);
includes follow references to other resources through uncorrelated `(type, id) IN (SELECT …)`
subqueries, as the distribution of the store requires (docs/scaling.md)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import ColumnElement, Connection, FromClause, and_, func, or_, select, tuple_
from sqlalchemy.sql import ColumnElement as Column

from cityhealth.fhir.datetimes import MAX_US, MIN_US
from cityhealth.fhir.errors import bad_request
from cityhealth.fhir.schema import INDEX_TABLES, idx_reference, resource
from cityhealth.fhir.search_parse import QueryParser, SearchRequest
from cityhealth.fhir.search_sql import MAX_CHAR, ClauseBuilder, PageHint
from cityhealth.security.visibility import Visibility

#: Sort column and the values that put resources without one last, per parameter type.
_SORT = {
    "string": ("value", MAX_CHAR, ""),
    "token": ("code", MAX_CHAR, ""),
    "uri": ("value", MAX_CHAR, ""),
    "reference": ("target_id", MAX_CHAR, ""),
    "number": ("value", 1e300, -1e300),
    "quantity": ("value", 1e300, -1e300),
}
#: JSON types a cursor key may have, by the SQL type of its sort column.
_KEY_KINDS: dict[str, tuple[type, ...]] = {
    "BigInteger": (int,),
    "Integer": (int,),
    "Float": (int, float),
    "String": (str,),
    "Text": (str,),
}
#: Criteria on the resource row itself, the same for every type.
_TYPE_FREE = frozenset({"_id", "_lastUpdated"})
#: Where the sort keys start in a row of the page query (after rid, shard, type, id, body).
_KEYS = 5
#: How deep `:iterate` includes follow references.
MAX_INCLUDE_ROUNDS = 4


@dataclass(frozen=True)
class Hit:
    rid: int
    shard: int
    type: str
    id: str
    body: str


@dataclass
class SearchResult:
    request: SearchRequest
    matches: list[Hit] = field(default_factory=list)
    included: list[Hit] = field(default_factory=list)
    total: int | None = None
    next_cursor: str | None = None
    previous_cursor: str | None = None


def encode_cursor(direction: str, keys: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([direction, *keys])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, list[Any]]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(data, list) or data[0] not in ("n", "p"):
            raise ValueError
        return data[0], data[1:]
    except (ValueError, TypeError, IndexError, orjson.JSONDecodeError):
        raise bad_request("The paging cursor is not valid; start the search again") from None


class Searcher:
    def __init__(self, parser: QueryParser, max_includes: int) -> None:
        self.parser = parser
        self.max_includes = max_includes

    def _sort_columns(
        self, r: FromClause, request: SearchRequest
    ) -> list[tuple[Column[Any], bool]]:
        columns: list[tuple[Column[Any], bool]] = []
        for code, descending in request.sort:
            if code == "_id":
                columns.append((r.c.id, descending))
                continue
            if code == "_lastUpdated":
                columns.append((r.c.last_updated, descending))
                continue
            param = self.parser.param(request.resource_type, code)
            assert param is not None
            table = INDEX_TABLES[param.type].alias()
            if param.type == "date":
                value = func.max(table.c.high) if descending else func.min(table.c.low)
                missing: object = MIN_US - 1 if descending else MAX_US + 1
            else:
                name, last_asc, last_desc = _SORT[param.type]
                value = func.max(table.c[name]) if descending else func.min(table.c[name])
                missing = last_desc if descending else last_asc
            where = [table.c.shard == r.c.shard, table.c.rid == r.c.rid, table.c.param == code]
            if param.type == "string":
                where.append(table.c.exact.is_not(None))  # pinyin forms do not sort names
            sub = select(value).where(*where).scalar_subquery()
            columns.append((func.coalesce(sub, missing), descending))
        columns.append((r.c.rid, False))
        return columns

    @staticmethod
    def _after(
        columns: list[tuple[Column[Any], bool]], keys: list[Any], backwards: bool
    ) -> ColumnElement[bool]:
        """Rows strictly after (or before) `keys` in the sort order: keyset paging."""
        kinds = [_KEY_KINDS.get(type(c.type).__name__, (str,)) for c, _ in columns]
        if len(keys) != len(columns) or not all(
            type(k) in kind for k, kind in zip(keys, kinds, strict=True)
        ):
            raise bad_request("The paging cursor does not match this search")
        options = []
        for i, (column, descending) in enumerate(columns):
            forward = descending == backwards
            step = column > keys[i] if forward else column < keys[i]
            options.append(and_(*[c == keys[j] for j, (c, _) in enumerate(columns[:i])], step))
        return or_(*options)

    def where(self, r: FromClause, request: SearchRequest, builder: ClauseBuilder) -> list[Any]:
        types = self.parser.searched_types(request)
        where: list[Any] = [r.c.deleted.is_(False)]
        restriction = builder.visible(r)
        if restriction is not None:
            where.append(restriction)
        if len(types) == 1:
            where.append(r.c.type == types[0])
        elif request.types:
            where.append(r.c.type.in_(types))
        for c in sorted(request.criteria, key=lambda c: builder.rank(types[0], c.name)):
            if len(types) == 1 or c.name.partition(":")[0] in _TYPE_FREE:
                where.append(builder.criterion(r, types[0], c.name, c.values))
            else:
                where.append(
                    or_(
                        *[
                            and_(r.c.type == t, builder.criterion(r, t, c.name, c.values))
                            for t in types
                        ]
                    )
                )
        return where

    def run(
        self,
        conn: Connection,
        request: SearchRequest,
        base_url: str | None,
        visibility: Visibility | None = None,
    ) -> SearchResult:
        """One page of matches and what it includes; with `visibility`, only what the caller
        may see exists for the search (counts, paging, includes, chains and _has alike)."""
        r = resource.alias("r")
        result = SearchResult(request)

        def builder() -> ClauseBuilder:
            return ClauseBuilder(self.parser, base_url, conn.dialect.name, visibility)

        if (
            request.total in ("accurate", "estimate")
            or request.summary == "count"
            or not request.count
        ):
            where = self.where(r, request, builder())
            result.total = conn.execute(select(func.count()).select_from(r).where(*where)).scalar()
        if request.summary == "count" or request.count == 0:
            return result
        columns = self._sort_columns(r, request)
        direction, keys = decode_cursor(request.cursor) if request.cursor else ("n", [])
        backwards = direction == "p"
        paging = builder()
        single = len(request.criteria) == 1 and len(self.parser.searched_types(request)) == 1
        unlimited = visibility is None or visibility.unrestricted
        if single and unlimited and len(columns) == 1 and all(isinstance(k, int) for k in keys):
            paging.page = PageHint(r, request.count + 1, keys[0] if keys else None, backwards)
        where = self.where(r, request, paging)
        query = select(
            r.c.rid,
            r.c.shard,
            r.c.type,
            r.c.id,
            r.c.body,
            *[c.label(f"k{i}") for i, (c, _) in enumerate(columns)],
        ).where(*where)
        if keys:
            query = query.where(self._after(columns, keys, backwards))
        order = [c.desc() if d != backwards else c.asc() for c, d in columns]
        rows = conn.execute(query.order_by(*order).limit(request.count + 1)).all()
        more = len(rows) > request.count
        rows = list(rows[: request.count])
        if backwards:
            rows.reverse()
        result.matches = [Hit(row.rid, row.shard, row.type, row.id, row.body) for row in rows]
        if rows:
            first = list(rows[0][_KEYS:])
            last = list(rows[-1][_KEYS:])
            if (more and not backwards) or (backwards and keys):
                result.next_cursor = encode_cursor("n", last)
            if (more and backwards) or (not backwards and keys):
                result.previous_cursor = encode_cursor("p", first)
        if result.total is None and not keys and not more:
            result.total = len(rows)
        if request.includes and result.matches:
            result.included = self.includes(conn, request, result.matches, visibility)
        return result

    def includes(
        self,
        conn: Connection,
        request: SearchRequest,
        matches: list[Hit],
        visibility: Visibility | None = None,
    ) -> list[Hit]:
        seen = {h.rid for h in matches}
        included: list[Hit] = []
        frontier = matches
        for round_number in range(MAX_INCLUDE_ROUNDS):
            found: list[Hit] = []
            for inc in request.includes:
                if round_number > 0 and not inc.iterate:
                    continue
                sources = [h for h in frontier if inc.reverse or h.type == inc.source_type]
                if not sources:
                    continue
                for hit in self._include_query(conn, inc, sources, visibility):
                    if hit.rid not in seen and len(included) + len(found) < self.max_includes:
                        seen.add(hit.rid)
                        found.append(hit)
            if not found:
                break
            included.extend(found)
            frontier = found
        return included

    def _include_query(
        self, conn: Connection, inc: Any, sources: list[Hit], visibility: Visibility | None
    ) -> list[Hit]:
        ref = idx_reference.alias()
        t = resource.alias()
        conditions = [ref.c.rtype == inc.source_type]
        if inc.param is not None:
            conditions.append(ref.c.param == inc.param.code)
        if inc.target_type:
            conditions.append(ref.c.target_type == inc.target_type)
        if not inc.reverse:
            # The sources' reference rows (on the sources' shards) name the targets, which
            # may live on any shard: an uncorrelated subquery, not a join.
            conditions.append(ref.c.shard.in_(sorted({h.shard for h in sources})))
            conditions.append(ref.c.rid.in_([h.rid for h in sources]))
            targets = select(ref.c.target_type, ref.c.target_id).where(*conditions)
            query = select(t.c.rid, t.c.shard, t.c.type, t.c.id, t.c.body).where(
                t.c.deleted.is_(False), tuple_(t.c.type, t.c.id).in_(targets)
            )
        else:
            by_type: dict[str, list[str]] = {}
            for h in sources:
                by_type.setdefault(h.type, []).append(h.id)
            conditions.append(
                or_(
                    *[
                        and_(ref.c.target_type == k, ref.c.target_id.in_(v))
                        for k, v in by_type.items()
                    ]
                )
            )
            query = (
                select(t.c.rid, t.c.shard, t.c.type, t.c.id, t.c.body)
                .distinct()
                .select_from(ref.join(t, and_(t.c.shard == ref.c.shard, t.c.rid == ref.c.rid)))
                .where(t.c.deleted.is_(False), *conditions)
            )
        restriction = visibility.clause(t) if visibility is not None else None
        if restriction is not None:
            query = query.where(restriction)
        query = query.order_by(t.c.rid).limit(self.max_includes + 1)
        return [Hit(x.rid, x.shard, x.type, x.id, x.body) for x in conn.execute(query)]
