"""What one caller may see, as a SQL condition on a row of the `resource` table.

Searches add `Visibility.clause` to their statements, so they filter rather than hide: counts,
paging, `_include`, chains and `_has` only ever meet visible rows. A single row (a read by id)
is judged by the same condition (`sees`). The rules that decide what goes into a Visibility are
in cityhealth.security.policy; this module only turns them into SQL.

Every condition stays on the row's own shard (index rows joined on shard and rid), is an
uncorrelated `(shard, rid) IN (SELECT …)`, or looks up the row's patients in `care_link`, as
the distribution of the store allows (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    literal,
    select,
)

from cityhealth.fhir import jsonio, store
from cityhealth.fhir.schema import resource
from cityhealth.fhir.store import Stored
from cityhealth.security.care_links import Relation
from cityhealth.security.consent_shape import (
    ACT_CODE,
    CATEGORY_BY_CODE,
    SENSITIVE_LABELS,
    SHARED_TYPES,
    ConsentTerms,
)
from cityhealth.security.deidentify import deidentify
from cityhealth.security.row_condition import Bound, RowCondition, Template

T = TypeVar("T")

#: meta.tag of every record: the institution that holds it (code "Organization/<id>").
HOLDER = "https://cityhealth.cn/fhir/CodeSystem/record-holder"


@dataclass(frozen=True)
class Grant:
    """Records a consent in force opens: the patient's compartment, cut to its terms."""

    patient: str  # Patient id
    terms: ConsentTerms


@dataclass(frozen=True)
class Visibility:
    """Everything a caller may see; `everything` with no limit is the platform itself."""

    dialect: str
    everything: bool = False
    types: frozenset[str] | None = None  # the only types seen at all (scopes, role); None: any
    public_types: frozenset[str] = frozenset()  # types every signed-in caller may read
    patients: frozenset[str] = frozenset()  # whole compartments (own, child)
    holder: str | None = None  # "Organization/<id>" whose records are seen
    relations: tuple[Relation, ...] = ()  # relations of care naming one of `actors`
    actors: tuple[tuple[str, str], ...] = ()  # (type, id): the caller, their organization
    # Read only when a condition needs them (not for a record the caller's institution holds):
    emergencies: Callable[[], frozenset[str]] | None = None  # break-glass declarations open
    consents: Callable[[], tuple[Grant, ...]] | None = None  # Consents in force
    deidentified: bool = False  # identifying elements are removed from what is returned

    @functools.cached_property
    def grants(self) -> tuple[Grant, ...]:
        return self.consents() if self.consents is not None else ()

    @functools.cached_property
    def in_emergency(self) -> frozenset[str]:
        """The patients whose whole record a break-glass declaration opens to the caller."""
        return self.emergencies() if self.emergencies is not None else frozenset()

    @property
    def unrestricted(self) -> bool:
        return self.everything and self.types is None

    def present(self, item: T) -> T:
        """A Stored row or search Hit as the caller receives it: de-identified for some."""
        if not self.deidentified or item.body is None:  # type: ignore[attr-defined]
            return item
        return dataclasses.replace(item, body=deidentify(item.body))  # type: ignore[attr-defined, type-var]

    def can_see_type(self, rtype: str) -> bool:
        return self.types is None or rtype in self.types

    def clause(self, r: FromClause) -> ColumnElement[bool] | None:
        """The condition a row of `r` (an alias of `resource`) must meet; None: no limit."""
        if self.unrestricted:
            return None
        return RowCondition(r, *self._condition)

    @functools.cached_property
    def _condition(self) -> tuple[str, Bound]:
        whole = frozenset() if self.everything else self.patients | self.in_emergency
        grants = () if self.everything else self.grants
        return _condition(
            self.dialect,
            self.types,
            self.everything,
            self.public_types,
            whole,
            self.holder,
            self.relations,
            self.actors,
            grants,
        )

    def sees(self, conn: Connection, stored: Stored) -> bool:
        """Whether the caller may see the resource of this row (current or past version)."""
        if not self.can_see_type(stored.type):
            return False
        if self.everything:
            return True
        if stored.type in self.public_types:
            return True
        if stored.deleted or stored.body is None:
            # A deletion keeps no index rows to judge it by: its holder sees it by the last
            # version's tag; no one else learns that it existed.
            last = store.version(
                conn, stored.type, stored.id, stored.version - 1, shard=stored.shard
            )
            return bool(self.holder and last and last.body and held_by(last.body) == self.holder)
        if self.holder and held_by(stored.body) == self.holder:
            return True
        r = resource.alias("r")
        clause = self.clause(r)
        query = select(literal(1)).where(r.c.shard == stored.shard, r.c.rid == stored.rid)
        return (
            conn.execute(query.where(clause) if clause is not None else query).first() is not None
        )


# -- the parts of the condition (row_condition.Template text) ---------------------------------
@functools.lru_cache(maxsize=4096)
def _condition(
    dialect: str,
    types: frozenset[str] | None,
    everything: bool,
    public_types: frozenset[str],
    whole: frozenset[str],
    holder: str | None,
    relations: tuple[Relation, ...],
    actors: tuple[tuple[str, str], ...],
    grants: tuple[Grant, ...],
) -> tuple[str, Bound]:
    """Visibility.clause's text and values, made once for each caller (see row_condition)."""
    sql = Template(dialect)
    limit = sql.member("{type}", types) if types is not None else None
    if everything:
        return limit or "true", sql.bound()
    options = []
    if public_types:
        options.append(sql.member("{type}", public_types))
    if whole:
        options.append(_in_compartments(sql, whole))
    if holder:
        options.append(_coded(sql, "_tag", [(HOLDER, holder)]))
    if actors:
        by_types: dict[frozenset[str] | None, list[Relation]] = {}
        for relation in relations:
            by_types.setdefault(relation.types, []).append(relation)
        for limited, related in by_types.items():
            options.append(_related(sql, actors, limited, related))
    options += [_granted(sql, grant) for grant in grants]
    seen = " OR ".join(options) if options else "false"
    return (f"{limit} AND ({seen})" if limit else seen), sql.bound()


def _related(
    sql: Template,
    actors: tuple[tuple[str, str], ...],
    types: frozenset[str] | None,
    relations: list[Relation],
) -> str:
    """The row is one of `types` (None: any) in the compartment of a patient whom one of
    `relations` relates to one of `actors` (care_links)."""
    named = sql.member("seen_l.actor", [f"{kind}/{rid}" for kind, rid in actors])
    names = sql.member("seen_l.relation", [relation.name for relation in relations])
    linked = (
        "EXISTS (SELECT 1 FROM compartment seen_c"
        " WHERE seen_c.shard = {shard} AND seen_c.rid = {rid} AND seen_c.patient_id IN"
        f" (SELECT seen_l.patient_id FROM care_link seen_l WHERE {named} AND {names}))"
    )
    return linked if types is None else f"({sql.member('{type}', types)} AND {linked})"


def _in_compartments(sql: Template, patients: Iterable[str]) -> str:
    """The row is in the compartment of one of `patients`: an uncorrelated list of rows, as
    search_sql.own_rows writes it."""
    chosen = sql.member("seen_c.patient_id", patients)
    if sql.dialect == "sqlite":
        return f"{{rid}} IN (SELECT seen_c.rid FROM compartment seen_c WHERE {chosen})"
    return (
        "({shard}, {rid}) IN"
        f" (SELECT seen_c.shard, seen_c.rid FROM compartment seen_c WHERE {chosen})"
    )


def _coded(sql: Template, param: str, codings: Iterable[tuple[str, str]]) -> str:
    """The row has a token index row of `param` with one of the (system, code) pairs."""
    pairs = " OR ".join(
        f"(seen_t.system = {sql.value(system)} AND seen_t.code = {sql.value(code)})"
        for system, code in codings
    )
    return (
        "EXISTS (SELECT 1 FROM idx_token seen_t WHERE seen_t.shard = {shard}"
        f" AND seen_t.rid = {{rid}} AND seen_t.param = {sql.value(param)} AND ({pairs}))"
    )


def _granted(sql: Template, grant: Grant) -> str:
    """consent_shape.ConsentTerms.covers, as SQL over the row's index rows."""
    terms = grant.terms
    parts = [_in_compartments(sql, [grant.patient])]
    if terms.categories is not None:
        options = []
        for code in sorted(terms.categories):
            category = CATEGORY_BY_CODE[code]
            plain = [t for t in category.types if t not in SHARED_TYPES]
            shared = [t for t in category.types if t in SHARED_TYPES]
            if plain:
                options.append(sql.member("{type}", plain))
            if shared:
                coded = _coded(sql, "category", category.codings)
                options.append(f"({sql.member('{type}', shared)} AND {coded})")
        parts.append("(" + (" OR ".join(options) or "false") + ")")
    denied = sorted(SENSITIVE_LABELS - terms.sensitive)
    if denied:
        parts.append("NOT " + _coded(sql, "_security", [(ACT_CODE, label) for label in denied]))
    return "(" + " AND ".join(parts) + ")"


def held_by(body: str) -> str | None:
    """The holder named in a stored resource's text, without parsing it when it has none."""
    if HOLDER not in body:
        return None
    tags = (jsonio.loads(body).get("meta") or {}).get("tag") or ()
    return next((t.get("code") for t in tags if t.get("system") == HOLDER), None)
