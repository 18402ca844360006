"""What one caller may see, as a SQL condition on a row of the `resource` table.

Searches add `Visibility.clause` to their statements, so they filter rather than hide: counts,
paging, `_include`, chains and `_has` only ever meet visible rows. A single row (a read by id)
is judged by the same condition (`sees`). The rules that decide what goes into a Visibility are
in cityhealth.security.policy; this module only turns them into SQL.

Every condition stays on the row's own shard (index rows joined on shard and rid) or is an
uncorrelated `(shard, rid) IN (SELECT …)`, as the distribution of the store requires
(docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    and_,
    exists,
    literal,
    not_,
    or_,
    select,
    true,
)

from cityhealth.fhir import jsonio, store
from cityhealth.fhir.schema import compartment, idx_reference, idx_token, resource
from cityhealth.fhir.search_sql import own_rows
from cityhealth.fhir.store import Stored
from cityhealth.security.consent_shape import (
    ACT_CODE,
    CATEGORY_BY_CODE,
    SENSITIVE_LABELS,
    SHARED_TYPES,
    ConsentTerms,
)
from cityhealth.security.deidentify import deidentify

T = TypeVar("T")

#: meta.tag of every record: the institution that holds it (code "Organization/<id>").
HOLDER = "https://cityhealth.cn/fhir/CodeSystem/record-holder"


@dataclass(frozen=True)
class Relation:
    """Resources of `rtype` that name the caller (or the caller's organization) in one of the
    reference parameters `actors`, with a status in `statuses`, relate the caller to their
    patients; the relation opens those patients' records of `types` (None: all of them)."""

    rtype: str
    actors: tuple[str, ...]
    statuses: tuple[str, ...]
    types: frozenset[str] | None = None


@functools.lru_cache(maxsize=1024)
def related_patients(
    relations: tuple[Relation, ...], actors: tuple[tuple[str, str], ...], dialect: str
) -> tuple[Any, ...]:
    """Selects of the patients each of `relations` relates to `actors` (type, id): plain
    selects, one per relation, as the distribution of the store requires (no IN over a union).

    It is part of the caller's condition, so the database reads it only for a row that nothing
    cheaper (its holder, its compartment) already shows: a hospital searching its own records
    never pays for it. Each part starts from the index rows naming the actors, which are few,
    and checks each one's status on its own rows: started from the statuses instead, it would
    read every active prescription or encounter of the city. Kept per caller: building the
    statement costs more than the database spends on it."""
    parts = []
    for relation in relations:
        a, s, c = idx_reference.alias(), idx_token.alias(), compartment.alias()
        active = [
            s.c.shard == a.c.shard,
            s.c.rid == a.c.rid,
            s.c.rtype == relation.rtype,
            s.c.param == "status",
            s.c.code.in_(relation.statuses),
        ]
        naming = [
            a.c.rtype == relation.rtype,
            a.c.param.in_(relation.actors),
            or_(*[and_(a.c.target_type == t, a.c.target_id == i) for t, i in actors]),
        ]
        members = a.join(c, and_(c.c.shard == a.c.shard, c.c.rid == a.c.rid))
        if dialect == "postgresql":  # LATERAL … LIMIT 1: a lookup per naming row, never a scan
            status = select(literal(1).label("one")).where(*active).limit(1).lateral()
            members = members.join(status, true())
        else:
            naming.append(exists().where(*active))
        parts.append(select(c.c.patient_id).select_from(members).where(*naming))
    return tuple(parts)


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
        limit = [r.c.type.in_(sorted(self.types))] if self.types is not None else []
        if self.everything:
            return and_(*limit)
        options: list[ColumnElement[bool]] = []
        if self.public_types:
            options.append(r.c.type.in_(sorted(self.public_types)))
        whole = self.patients | self.in_emergency
        if whole:
            options.append(self._in_compartments(r, sorted(whole)))
        if self.holder:
            options.append(_tagged(r, HOLDER, self.holder))
        if self.actors:
            by_types: dict[frozenset[str] | None, list[Relation]] = {}
            for relation in self.relations:
                by_types.setdefault(relation.types, []).append(relation)
            for types, relations in by_types.items():
                options.append(self._related(r, types, tuple(relations)))
        for grant in self.grants:
            options.append(self._granted(r, grant))
        return and_(*limit, or_(*options)) if options else literal(False)

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

    # -- the parts of the condition --------------------------------------------------------
    def _in_compartments(self, r: FromClause, patients: list[str]) -> ColumnElement[bool]:
        """`r` is in the compartment of one of `patients`."""
        c = compartment.alias()
        return own_rows(
            r, select(c.c.shard, c.c.rid).where(c.c.patient_id.in_(patients)), self.dialect
        )

    def _related(
        self, r: FromClause, types: frozenset[str] | None, relations: tuple[Relation, ...]
    ) -> ColumnElement[bool]:
        """`r` is one of `types` (None: any) in the compartment of a patient of `relations`."""
        c = compartment.alias()
        patients = or_(
            *[c.c.patient_id.in_(p) for p in related_patients(relations, self.actors, self.dialect)]
        )
        records = own_rows(r, select(c.c.shard, c.c.rid).where(patients), self.dialect)
        return records if types is None else and_(r.c.type.in_(sorted(types)), records)

    def _granted(self, r: FromClause, grant: Grant) -> ColumnElement[bool]:
        """consent_shape.ConsentTerms.covers, as SQL over the row's index rows."""
        terms = grant.terms
        parts: list[ColumnElement[bool]] = [self._in_compartments(r, [grant.patient])]
        if terms.categories is not None:
            chosen = [CATEGORY_BY_CODE[code] for code in sorted(terms.categories)]
            options: list[ColumnElement[bool]] = []
            for category in chosen:
                plain = [t for t in category.types if t not in SHARED_TYPES]
                shared = [t for t in category.types if t in SHARED_TYPES]
                if plain:
                    options.append(r.c.type.in_(plain))
                if shared:
                    options.append(
                        and_(r.c.type.in_(shared), _coded(r, "category", category.codings))
                    )
            parts.append(or_(*options))
        denied = sorted(SENSITIVE_LABELS - terms.sensitive)
        if denied:
            parts.append(not_(_coded(r, "_security", [(ACT_CODE, label) for label in denied])))
        return and_(*parts)


def _tagged(r: FromClause, system: str, code: str) -> ColumnElement[bool]:
    return _coded(r, "_tag", [(system, code)])


def _coded(r: FromClause, param: str, codings: Iterable[tuple[str, str]]) -> ColumnElement[bool]:
    """The row has a token index row of `param` with one of the (system, code) pairs."""
    t = idx_token.alias()
    return exists().where(
        t.c.shard == r.c.shard,
        t.c.rid == r.c.rid,
        t.c.param == param,
        or_(*[and_(t.c.system == system, t.c.code == code) for system, code in codings]),
    )


def held_by(body: str) -> str | None:
    """The holder named in a stored resource's text, without parsing it when it has none."""
    if HOLDER not in body:
        return None
    tags = (jsonio.loads(body).get("meta") or {}).get("tag") or ()
    return next((t.get("code") for t in tags if t.get("system") == HOLDER), None)
