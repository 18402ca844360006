"""A condition on the rows of a `resource` alias, written as SQL text with bound values.

The caller's condition (visibility.Visibility.clause) goes into every search, include, chain
and read check; built as SQLAlchemy expressions (an alias and a comparison object per term) it
cost more Python per request than the rest of the search. As text it is a single node: the
alias's columns are rendered by SQLAlchemy (so an anonymous alias works too), its values are
bound parameters (so the statement cache holds one entry per shape of condition), and sets of
values are one parameter each (an array; JSON on SQLite), so its text does not grow with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ARRAY, Boolean, FromClause, Text, bindparam
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from cityhealth.fhir import jsonio

Bound = tuple[BindParameter[Any], ...]

#: The columns of the alias a template may name: `{shard}`, `{rid}`, `{type}`.
COLUMNS = ("shard", "rid", "type")


class Template:
    """SQL text naming the alias's columns as `{shard}`, `{rid}`, `{type}` and bound values as
    they are added (`value`, `member`)."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def value(self, value: Any) -> str:
        self.values.append(value)
        return f"{{{len(self.values) - 1}}}"

    def member(self, column: str, items: Iterable[str]) -> str:
        """`column` is one of `items` (`column` is SQL text, e.g. "{type}" or "c.patient_id")."""
        chosen = sorted(items)
        if self.dialect == "postgresql":
            return f"{column} = ANY({self.value(chosen)})"
        listed = self.value(jsonio.dumps(chosen).decode())
        return f"{column} IN (SELECT value FROM json_each({listed}))"

    def bound(self) -> Bound:
        """The values as bound parameters: made once for a condition that many statements
        share (statements only read them)."""
        return tuple(
            bindparam(None, v, type_=_ARRAY if isinstance(v, list) else _TEXT, unique=True)
            for v in self.values
        )


_ARRAY, _TEXT = ARRAY(Text), Text()


class RowCondition(ColumnElement[bool]):
    """`sql` (a Template's text) on the rows of `alias`, with `values` (Template.bound)."""

    type = Boolean()
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy's declaration: a list)
        ("alias", InternalTraversal.dp_clauseelement),
        ("sql", InternalTraversal.dp_string),
        ("values", InternalTraversal.dp_clauseelement_tuple),
    ]

    def __init__(self, alias: FromClause, sql: str, values: tuple[BindParameter[Any], ...]) -> None:
        self.alias = alias
        self.sql = sql
        self.values = values

    @property
    def _from_objects(self) -> list[FromClause]:
        return [self.alias]


@compiles(RowCondition)
def _render(element: RowCondition, compiler: SQLCompiler, **kw: Any) -> str:
    columns = {name: compiler.process(element.alias.c[name], **kw) for name in COLUMNS}
    values = [compiler.process(value, **kw) for value in element.values]
    return "(" + element.sql.format(*values, **columns) + ")"
