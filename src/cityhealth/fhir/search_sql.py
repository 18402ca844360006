"""Turn search criteria into SQL conditions on an alias of the `resource` table.

Each criterion becomes `(shard, rid) IN (SELECT shard, rid FROM idx_<kind> WHERE rtype = … AND
param = … AND (value OR value …))`, so that repeated parameters AND together and commas OR
together, and so that every condition stays a range scan on the (rtype, param, value) index.

A resource meets its own index rows on (shard, rid), which keeps the join on one shard of a
distributed database; a reference leads to another resource, possibly on another shard, so it is
followed with an uncorrelated `(type, id) IN (SELECT …)`, never a join (docs/scaling.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    and_,
    exists,
    false,
    literal,
    not_,
    or_,
    select,
    tuple_,
)

from cityhealth.fhir.chinese import fold
from cityhealth.fhir.composites import composite_for
from cityhealth.fhir.datetimes import date_range
from cityhealth.fhir.definitions import SearchParam
from cityhealth.fhir.errors import bad_request
from cityhealth.fhir.numbers import number_range
from cityhealth.fhir.schema import INDEX_TABLES, idx_reference, idx_token, resource
from cityhealth.fhir.search_parse import QueryParser

if TYPE_CHECKING:
    from cityhealth.security.visibility import Visibility

#: Upper bound for prefix ranges: sorts after every other code point (byte order).
MAX_CHAR = chr(0x10FFFF)
_PREFIX = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.*)$", re.DOTALL)
_ABSOLUTE_REF = re.compile(r"^(https?://.+)/([A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(/_history/.*)?$")


def _renamed(**columns: Any) -> Any:
    """A stand-in table whose columns carry the names the value conditions expect."""
    return SimpleNamespace(c=SimpleNamespace(**columns))


def split_pipe(value: str) -> list[str]:
    """Split a token/quantity value on unescaped '|' and remove the escapes."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            current.append(value[i + 1])
            i += 2
            continue
        if value[i] == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


def unescape(value: str) -> str:
    return "|".join(split_pipe(value))


def prefix_range(column: Any, text: str) -> ColumnElement[bool]:
    return and_(column >= text, column < text + MAX_CHAR)


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def split_prefix(value: str, allow: bool = True) -> tuple[str, str]:
    match = _PREFIX.match(value)
    assert match is not None  # the pattern matches every string
    prefix, rest = match.group(1) or "eq", match.group(2)
    if not allow and match.group(1):
        raise bad_request(f"Prefix '{prefix}' is not allowed here")
    return prefix, rest


def range_condition(
    low: Any, high: Any, prefix: str, s_low: int | float, s_high: int | float
) -> ColumnElement[bool]:
    """Compare a stored range [low, high) with a search range (search.html 'prefix' table)."""
    if prefix == "eq":
        return and_(low >= s_low, high <= s_high)
    if prefix == "ne":
        return or_(low < s_low, high > s_high)
    if prefix == "gt":
        return high > s_high
    if prefix == "lt":
        return low < s_low
    if prefix == "ge":  # gt or eq
        return or_(high > s_high, and_(low >= s_low, high <= s_high))
    if prefix == "le":  # lt or eq
        return or_(low < s_low, and_(low >= s_low, high <= s_high))
    if prefix == "sa":
        return low >= s_high
    if prefix == "eb":
        return high <= s_low
    # ap: overlap with the search range widened by 10 % of its distance from now
    now = time.time_ns() // 1000
    margin = max(abs(now - s_low) // 10, 1)
    return and_(low < s_high + margin, high > s_low - margin)


def own_rows(r: FromClause, rows: Select[Any], dialect: str) -> ColumnElement[bool]:
    """`r` is one of the resources that `rows` (a select of their shard and rid) name.

    SQLite is never distributed and gets `rid IN (SELECT rid …)`: its planner drives a search
    from the first of several such lists but from the last of several row-value lists, and
    clients put the narrow criterion (the patient) first."""
    if dialect == "sqlite":
        return r.c.rid.in_(rows.with_only_columns(rows.selected_columns.rid))
    return tuple_(r.c.shard, r.c.rid).in_(rows)


@dataclass(frozen=True)
class PageHint:
    """A search with one index criterion, in the default order (by rid), takes its page from
    the index rows alone: they exist only for current, live resources of their type (a write
    replaces them in its transaction), so the first rids of the index are the first matches.
    Without this a frequent surname (9,000 of 100,000 patients) reads every match's resource
    row before the page is cut."""

    alias: FromClause
    limit: int
    after: int | None  # the cursor's rid
    backwards: bool

    def restrict(self, rows: Select[Any], t: FromClause) -> Select[Any]:
        if self.after is not None:
            rows = rows.where(t.c.rid < self.after if self.backwards else t.c.rid > self.after)
        order = t.c.rid.desc() if self.backwards else t.c.rid.asc()
        return rows.distinct().order_by(order).limit(self.limit)


class ClauseBuilder:
    def __init__(
        self,
        parser: QueryParser,
        base_url: str | None,
        dialect: str,
        visibility: Visibility | None = None,
    ) -> None:
        self.parser = parser
        self.visibility = visibility
        self.dialect = dialect
        self.definitions = parser.definitions
        self.base_url = base_url.rstrip("/") if base_url else None
        self._driven: set[int] = set()  # aliases that already have their driving criterion
        self.page: PageHint | None = None

    def visible(self, r: FromClause) -> ColumnElement[bool] | None:
        """What of `r` the caller may see (None: all): the searched resources, and the ones a
        chain or `_has` looks into, so that no criterion tests a hidden resource."""
        return self.visibility.clause(r) if self.visibility is not None else None

    def rank(self, rtype: str, name: str) -> int:
        """How narrow a criterion usually is (0 narrowest): searches list the narrow ones first,
        so that SQLite, which drives a search from its first index criterion, starts there."""
        head, dot, _ = name.partition(".")
        code, _, modifier = head.partition(":")
        if dot or code.startswith("_has") or modifier in ("not", "missing"):
            return 4
        if code == "_id" or modifier == "identifier":
            return 0
        param = self.parser.param(rtype, code)
        if param is None:
            return 4
        if param.type == "reference" or (param.type == "token" and "identifier" in code):
            return 0
        return {"string": 1, "uri": 1, "token": 2}.get(param.type, 3)

    # -- entry point --------------------------------------------------------------------
    def criterion(
        self, r: FromClause, rtype: str, name: str, values: tuple[str, ...]
    ) -> ColumnElement[bool]:
        if name.startswith("_has:"):
            return self._reverse_chain(r, rtype, name, values)
        head, dot, rest = name.partition(".")
        code, _, modifier = head.partition(":")
        if dot:
            return self._chain(r, rtype, code, modifier, rest, values)
        if code == "_id":
            return self._id(r, modifier, values)
        if code == "_lastUpdated":
            return or_(
                *[self._date_value(r.c.last_updated, r.c.last_updated + 1, v) for v in values]
            )
        param = self.parser.param(rtype, code)
        assert param is not None  # checked by the parser
        if modifier == "missing":
            return self._missing(r, rtype, param, values)
        if modifier == "identifier":
            return self._in_index(r, rtype, f"{code}:identifier", idx_token, values, self._token)
        table = INDEX_TABLES[param.type]
        build = self._builders()[param.type]

        def value_clause(t: FromClause, value: str) -> ColumnElement[bool]:
            return build(t, value, modifier, param)

        if modifier == "not":
            return not_(self._in_index(r, rtype, code, table, values, value_clause, drive=False))
        return self._in_index(r, rtype, code, table, values, value_clause)

    def _builders(self) -> dict[str, Callable[..., ColumnElement[bool]]]:
        return {
            "token": lambda t, v, m, p: self._token(t, v, m),
            "string": self._string,
            "date": lambda t, v, m, p: self._date_value(t.c.low, t.c.high, v),
            "number": lambda t, v, m, p: self._number(t, v),
            "quantity": lambda t, v, m, p: self._quantity(t, v),
            "reference": self._reference,
            "uri": lambda t, v, m, p: self._uri(t, v, m),
            "composite": self._composite,
        }

    def _in_index(
        self,
        r: FromClause,
        rtype: str,
        code: str,
        table: Any,
        values: tuple[str, ...],
        build: Callable[..., ColumnElement[bool]],
        drive: bool = True,
    ) -> ColumnElement[bool]:
        t = table.alias()
        matches = or_(*[build(t, v) for v in values])
        where = (t.c.rtype == rtype, t.c.param == code, matches)
        if self.dialect == "sqlite" and (not drive or id(r) in self._driven):
            # SQLite builds every `rid IN (…)` list in full (all heart rates of the city, say);
            # past the driving criterion, each candidate is checked through the rid index.
            return exists().where(t.c.rid == r.c.rid, *where)
        self._driven.add(id(r))
        rows = select(t.c.shard, t.c.rid).where(*where)
        if self.page is not None and self.page.alias is r:
            rows = self.page.restrict(rows, t)
        return own_rows(r, rows, self.dialect)

    # -- special parameters -------------------------------------------------------------
    def _id(self, r: FromClause, modifier: str, values: tuple[str, ...]) -> ColumnElement[bool]:
        ids = [unescape(v) for v in values]
        return r.c.id.not_in(ids) if modifier == "not" else r.c.id.in_(ids)

    def _missing(
        self, r: FromClause, rtype: str, param: SearchParam, values: tuple[str, ...]
    ) -> ColumnElement[bool]:
        if len(values) != 1 or values[0] not in ("true", "false"):
            raise bad_request(f"{param.code}:missing takes 'true' or 'false'")
        table = INDEX_TABLES[param.type].alias()
        present = exists().where(
            table.c.shard == r.c.shard,
            table.c.rid == r.c.rid,
            table.c.rtype == rtype,
            table.c.param == param.code,
        )
        return not_(present) if values[0] == "true" else present

    def _chain(
        self,
        r: FromClause,
        rtype: str,
        code: str,
        modifier: str,
        rest: str,
        values: tuple[str, ...],
    ) -> ColumnElement[bool]:
        param = self.parser.param(rtype, code)
        assert param is not None
        ref = idx_reference.alias()
        target = resource.alias()
        next_code = rest.partition(".")[0].partition(":")[0]
        options = [
            and_(target.c.type == ttype, self.criterion(target, ttype, rest, values))
            for ttype in self.parser.chain_targets(param, modifier)
            if next_code in ("_id", "_lastUpdated") or self.parser.param(ttype, next_code)
        ]
        targets = select(target.c.type, target.c.id).where(
            target.c.deleted == false(), or_(*options) if options else false()
        )
        seen = self.visible(target)
        if seen is not None:
            targets = targets.where(seen)
        sub = select(ref.c.shard, ref.c.rid).where(
            ref.c.rtype == rtype,
            ref.c.param == code,
            tuple_(ref.c.target_type, ref.c.target_id).in_(targets),
        )
        return own_rows(r, sub, self.dialect)

    def _reverse_chain(
        self, r: FromClause, rtype: str, name: str, values: tuple[str, ...]
    ) -> ColumnElement[bool]:
        _, source_type, ref_code, rest = name.split(":", 3)
        ref = idx_reference.alias()
        source = resource.alias()
        sub = (
            select(ref.c.target_id)
            .select_from(
                ref.join(source, and_(source.c.shard == ref.c.shard, source.c.rid == ref.c.rid))
            )
            .where(
                ref.c.rtype == source_type,
                ref.c.param == ref_code,
                ref.c.target_type == rtype,
                self.criterion(source, source_type, rest, values),
            )
        )
        seen = self.visible(source)
        if seen is not None:
            sub = sub.where(seen)
        return r.c.id.in_(sub)

    # -- value conditions per parameter type --------------------------------------------
    def _token(self, t: FromClause, value: str, modifier: str = "") -> ColumnElement[bool]:
        if modifier == "text":
            return prefix_range(t.c.text, fold(unescape(value)))
        parts = split_pipe(value)
        if len(parts) == 1:
            return t.c.code == parts[0]
        system, code = parts[0], "|".join(parts[1:])
        if not system:
            return and_(t.c.system.is_(None), t.c.code == code)
        if not code:
            return t.c.system == system
        return and_(t.c.system == system, t.c.code == code)

    def _string(
        self, t: FromClause, value: str, modifier: str, param: SearchParam
    ) -> ColumnElement[bool]:
        text = unescape(value)
        if modifier == "exact":
            return t.c.exact == text
        folded = fold(text)
        if modifier == "contains":
            return t.c.value.like(f"%{like_escape(folded)}%", escape="\\")
        return prefix_range(t.c.value, folded)

    def _date_value(self, low: Any, high: Any, value: str) -> ColumnElement[bool]:
        # An unencoded '+' of a timezone offset arrives as a space.
        prefix, text = split_prefix(value.replace(" ", "+"))
        try:
            s_low, s_high = date_range(text)
        except ValueError:
            raise bad_request(f"'{value}' is not a valid date search value") from None
        return range_condition(low, high, prefix, s_low, s_high)

    @staticmethod
    def _decimal(text: str, original: str) -> tuple[float, float, float]:
        try:
            Decimal(text)
            return number_range(text)
        except (InvalidOperation, ValueError):
            raise bad_request(f"'{original}' is not a valid number search value") from None

    def _numeric(self, column: Any, value: str, text: str, prefix: str) -> ColumnElement[bool]:
        number, low, high = self._decimal(text, value)
        if prefix == "eq":
            return and_(column >= low, column < high)
        if prefix == "ne":
            return or_(column < low, column >= high)
        if prefix in ("gt", "sa"):
            return column > number
        if prefix in ("lt", "eb"):
            return column < number
        if prefix == "ge":
            return column >= number
        if prefix == "le":
            return column <= number
        margin = abs(number) * 0.1
        return and_(column >= number - margin, column <= number + margin)

    def _number(self, t: FromClause, value: str) -> ColumnElement[bool]:
        prefix, text = split_prefix(value)
        return self._numeric(t.c.value, value, text, prefix)

    def _quantity(self, t: FromClause, value: str) -> ColumnElement[bool]:
        parts = split_pipe(value)
        if len(parts) not in (1, 3):
            raise bad_request(f"'{value}' is not a quantity: expected number|system|code")
        prefix, text = split_prefix(parts[0])
        clause = self._numeric(t.c.value, value, text, prefix)
        if len(parts) == 3:
            system, code = parts[1], parts[2]
            if system:
                clause = and_(clause, t.c.system == system)
            if code:
                clause = and_(
                    clause, t.c.code == code if system else or_(t.c.code == code, t.c.unit == code)
                )
        return clause

    def _reference(
        self, t: FromClause, value: str, modifier: str, param: SearchParam
    ) -> ColumnElement[bool]:
        text = unescape(value)
        if self.base_url and text.startswith(self.base_url + "/"):
            text = text[len(self.base_url) + 1 :]
        type_filter = modifier if modifier else None
        absolute = _ABSOLUTE_REF.match(text)
        if absolute:
            return or_(t.c.url == text, t.c.url == text.split("/_history/")[0])
        if "://" in text or text.startswith("urn:"):
            return or_(t.c.url == text, t.c.url == text.partition("|")[0])
        parts = text.split("/")
        if len(parts) >= 2 and self.definitions.is_resource_type(parts[0]):
            if type_filter and type_filter != parts[0]:
                raise bad_request(f"'{value}' does not match the type modifier ':{modifier}'")
            return and_(t.c.target_type == parts[0], t.c.target_id == parts[1])
        if len(parts) != 1 or not text:
            raise bad_request(f"'{value}' is not a valid reference search value")
        if type_filter:
            return and_(t.c.target_type == type_filter, t.c.target_id == text)
        return t.c.target_id == text

    def _composite(
        self, t: FromClause, value: str, modifier: str, param: SearchParam
    ) -> ColumnElement[bool]:
        """`token$value`: both parts must match on the same element (one idx_composite row)."""
        composite = composite_for(self.definitions, param)
        assert composite is not None  # checked by the parser
        first, dollar, second = value.partition("$")
        if not dollar or not first or not second:
            raise bad_request(f"'{value}' is not a composite value: expected token$value")
        c = t.c
        token = self._token(_renamed(system=c.system, code=c.code), first)
        kind = composite.second_type
        if kind == "token":
            other = self._token(_renamed(system=c.v_system, code=c.v_code), second)
        elif kind == "quantity":
            columns = _renamed(value=c.v_value, system=c.v_system, code=c.v_code, unit=c.v_text)
            other = self._quantity(columns, second)
        elif kind == "date":
            other = self._date_value(c.v_date_low, c.v_date_high, second)
        else:
            other = prefix_range(c.v_text, fold(unescape(second)))
        return and_(token, other)

    def _uri(self, t: FromClause, value: str, modifier: str) -> ColumnElement[bool]:
        text = unescape(value)
        if modifier == "below":
            return prefix_range(t.c.value, text)
        if modifier == "above":
            return literal(text).like(t.c.value + "%")
        if modifier == "contains":
            return t.c.value.like(f"%{like_escape(text)}%", escape="\\")
        return t.c.value == text
