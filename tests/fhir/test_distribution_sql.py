"""The SQL the engine emits keeps the distribution design of docs/scaling.md.

Every statement sent to PostgreSQL while a scripted workload runs through the HTTP API is parsed
(sqlglot) and checked: joins and correlated subqueries between distributed tables pair their
`shard` columns, references to other resources are followed through uncorrelated subqueries,
no statement changes a `shard`, writes of a resource's rows name its shard, and a patient's own
compartment is read on the patient's shard. The checker is tested on hand-written SQL first, so
that it cannot pass by accepting everything. Moving a resource to another patient's shard and
migration 0004 are checked on both databases.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlglot
from alembic import command
from fastapi.testclient import TestClient
from helpers import bundle, create, ids, link, read, relative, search, unique
from sqlalchemy import event, inspect, select, text
from sqlglot import exp
from sqlglot.optimizer.scope import Scope, traverse_scope

from access_tokens import bearer
from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.schema import compartment, resource
from cityhealth.fhir.sharding import DISTRIBUTED_TABLES, patient_shard, shard_key
from cityhealth.migrate import alembic_config, upgrade
from conftest import BACKENDS, make_database_url

# -- the checker -------------------------------------------------------------------------------


class Forbidden(AssertionError):
    """A statement the distribution design forbids, or one the checker cannot read."""


@dataclass
class Tally:
    """What the checked statements contained, so that a capture that saw nothing fails."""

    kinds: Counter[str] = field(default_factory=Counter)


def _conjuncts(where: Any) -> list[exp.Expression]:
    if where is None:
        return []
    node = where.this if isinstance(where, exp.Where) else where
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        return [c for part in node.flatten() for c in _conjuncts(part)]
    return [node]


def _is_value(node: exp.Expression) -> bool:
    return node.find(exp.Column) is None


def _shard_of(node: exp.Expression, alias: str) -> bool:
    return isinstance(node, exp.Column) and node.name == "shard" and node.table == alias


def _compares(conjuncts: list[exp.Expression], kind: type, alias: str, other: str | None) -> bool:
    """Some conjunct is `alias.shard <kind> other.shard` (or `<kind> <value>` for None)."""
    for c in conjuncts:
        if not isinstance(c, kind):
            continue
        for left, right in ((c.this, c.expression), (c.expression, c.this)):
            if _shard_of(left, alias) and (
                _is_value(right) if other is None else _shard_of(right, other)
            ):
                return True
    return False


def _distributed(scope: Scope) -> dict[str, str]:
    """alias → table name of the distributed tables read in this scope."""
    return {
        alias: source.name
        for alias, source in scope.sources.items()
        if isinstance(source, exp.Table) and source.name in DISTRIBUTED_TABLES
    }


def _resolve(scope: Scope, column: exp.Column) -> tuple[Scope, str, str] | None:
    """(scope, alias, table) of the distributed table a column belongs to, if it does."""
    current: Scope | None = scope
    while current is not None:
        if column.table:
            source = current.sources.get(column.table)
            if source is not None:
                if isinstance(source, exp.Table) and source.name in DISTRIBUTED_TABLES:
                    return current, column.table, source.name
                return None
        elif len(current.sources) == 1:
            (alias, source), *_ = current.sources.items()
            if isinstance(source, exp.Table) and source.name in DISTRIBUTED_TABLES:
                return current, alias, source.name
            return None
        current = current.parent
    return None


def _within(scope: Scope | None, root: Scope) -> bool:
    while scope is not None:
        if scope is root:
            return True
        scope = scope.parent
    return False


def _negated(node: Any, stop: Any) -> bool:
    parent = node.parent
    while parent is not None and parent is not stop:
        if isinstance(parent, exp.Not):
            return True
        parent = parent.parent
    return False


def _outer_columns(scope: Scope) -> list[exp.Column]:
    """Columns of this scope that name a table of an enclosing one (the scope's own
    unqualified columns are its own in the single-table subqueries the engine writes)."""
    return [c for c in scope.external_columns if c.table and c.table not in scope.sources]


def _check_joins(scope: Scope, tally: Tally) -> None:
    distributed = _distributed(scope)
    for join in scope.expression.args.get("joins") or []:
        joined = join.this.alias_or_name
        if joined not in distributed:
            continue
        on = _conjuncts(join.args.get("on"))
        partners = {
            c.table for part in on for c in part.find_all(exp.Column) if c.table in distributed
        } - {joined}
        if not partners and len(distributed) > 1:
            raise Forbidden(f"{joined} is joined to distributed tables without a condition")
        for partner in partners:
            if not _compares(on, exp.EQ, joined, partner):
                raise Forbidden(f"JOIN of {joined} and {partner} without equal shard columns")
        tally.kinds["co-located join"] += 1


def _check_correlation(scope: Scope, tally: Tally) -> None:
    local = _distributed(scope)
    if not local or scope.parent is None:
        return
    outer = {found[1] for c in _outer_columns(scope) if (found := _resolve(scope, c))}
    where = _conjuncts(scope.expression.args.get("where"))
    for alias in outer:
        if not any(_compares(where, exp.EQ, mine, alias) for mine in local):
            raise Forbidden(
                f"subquery over {sorted(local.values())} correlated with {alias} "
                "without equal shard columns"
            )
    if outer:
        tally.kinds["co-located correlated subquery"] += 1


def _check_semi_join(node: exp.In, scopes: dict[int, Scope], tally: Tally) -> None:
    """`x IN (SELECT …)`: a semi-join on (shard, rid), or an uncorrelated reference lookup."""
    query = node.args.get("query")
    if query is None:
        return
    sub = query.this if isinstance(query, exp.Subquery) else query
    outer_select = node.find_ancestor(exp.Select)
    if not isinstance(sub, exp.Select) or outer_select is None:
        raise Forbidden(f"an IN over something other than a plain SELECT: {node.sql()[:80]}")
    inner, outer = scopes[id(sub)], scopes[id(outer_select)]
    left = node.this.expressions if isinstance(node.this, exp.Tuple) else [node.this]
    right = [e.this if isinstance(e, exp.Alias) else e for e in sub.expressions]
    if len(left) != len(right):
        raise Forbidden(f"an IN whose sides differ in width: {node.sql()[:80]}")
    pairs = []
    for lc, rc in zip(left, right, strict=True):
        both = isinstance(lc, exp.Column) and isinstance(rc, exp.Column)
        if both and _resolve(outer, lc) and _resolve(inner, rc):
            pairs.append((lc.name, rc.name))
    if not pairs:
        return
    if ("shard", "shard") in pairs:
        tally.kinds["co-located semi-join"] += 1
        return
    if ("rid", "rid") in pairs:
        raise Forbidden("a semi-join on rid without shard: the rows are on another shard")
    for scope in scopes.values():
        if _within(scope, inner):
            for column in _outer_columns(scope):
                found = _resolve(scope, column)
                if found and not _within(found[0], inner):
                    raise Forbidden(f"a reference lookup correlated with {found[1]}")
    tally.kinds["uncorrelated reference lookup"] += 1


def _check_lock(scope: Scope, tally: Tally) -> None:
    """Rows are locked (FOR UPDATE) only by a query on one shard."""
    if not scope.expression.args.get("locks"):
        return
    where = _conjuncts(scope.expression.args.get("where"))
    for alias, table in _distributed(scope).items():
        if not any(_compares(where, exp.EQ, name, None) for name in (alias, "")):
            raise Forbidden(f"FOR UPDATE of {table} rows without shard = <value>")
        tally.kinds["single-shard lock"] += 1


def _check_compartment(scope: Scope, root: exp.Expression, tally: Tally) -> None:
    """A patient's compartment is read on their shard, or explicitly away from it."""
    where = _conjuncts(scope.expression.args.get("where"))
    for alias, table in _distributed(scope).items():
        one_patient = any(
            isinstance(c, exp.EQ)
            and isinstance(c.this, exp.Column)
            and c.this.name == "patient_id"
            and c.this.table in (alias, "")
            and _is_value(c.expression)
            for c in where
        )
        if table != "compartment" or not one_patient or _negated(scope.expression, root):
            continue
        if _compares(where, exp.NEQ, alias, None):
            tally.kinds["compartment, other shards"] += 1
            continue
        current: Scope | None = scope
        while current is not None:
            conditions = _conjuncts(current.expression.args.get("where"))
            for name in _distributed(current):
                if not _compares(conditions, exp.EQ, name, None):
                    raise Forbidden(f"a compartment read without {name}.shard = <value>")
            current = current.parent
        tally.kinds["compartment, own shard"] += 1


def _check_write(node: exp.Expression, tally: Tally) -> None:
    target = node.this.this if isinstance(node.this, exp.Schema) else node.this
    if not isinstance(target, exp.Table) or target.name not in DISTRIBUTED_TABLES:
        return
    kind = type(node).__name__.upper()
    if isinstance(node, exp.Insert | exp.Copy):
        columns = (
            [c.name for c in node.this.expressions] if isinstance(node.this, exp.Schema) else []
        )
        if "shard" not in columns:
            raise Forbidden(f"{kind} into {target.name} without its shard column")
    else:
        sets = [s.this for s in node.expressions] if isinstance(node, exp.Update) else []
        if any(isinstance(c, exp.Column) and c.name == "shard" for c in sets):
            raise Forbidden(f"UPDATE of {target.name} sets shard")
        where = _conjuncts(node.args.get("where"))
        if not any(_compares(where, exp.EQ, name, None) for name in (target.alias_or_name, "")):
            raise Forbidden(f"{kind} of {target.name} rows without shard = <value>")
    tally.kinds[kind] += 1


_HARMLESS_COMMANDS = {"SAVEPOINT", "RELEASE"}  # savepoints of nested transactions
_STATEMENTS = (
    exp.Select,
    exp.SetOperation,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Copy,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
)


def check(sql: str, tally: Tally | None = None) -> None:
    """Raise Forbidden when `sql` breaks the distribution design or cannot be parsed."""
    tally = tally or Tally()
    try:
        statements = sqlglot.parse(sql, dialect="postgres")
    except sqlglot.errors.SqlglotError as error:
        raise Forbidden(f"cannot parse: {error}") from None
    for statement in statements:
        if statement is None:
            continue
        if isinstance(statement, exp.Command):
            if str(statement.this).upper() not in _HARMLESS_COMMANDS:
                raise Forbidden(f"cannot parse: {statement.sql()[:80]}")
            continue
        if not isinstance(statement, _STATEMENTS):
            raise Forbidden(f"cannot parse: not a statement: {statement.sql()[:80]}")
        for node in statement.find_all(exp.Insert, exp.Copy, exp.Update, exp.Delete):
            _check_write(node, tally)
        scopes = {id(s.expression): s for s in traverse_scope(statement)}
        for scope in scopes.values():
            _check_joins(scope, tally)
            _check_correlation(scope, tally)
            _check_lock(scope, tally)
            _check_compartment(scope, statement, tally)
        for node in statement.find_all(exp.In):
            _check_semi_join(node, scopes, tally)
        tally.kinds["statement"] += 1


# -- the checker on hand-written SQL ---------------------------------------------------------

GOOD = {
    "index criterion": "SELECT r.rid FROM resource AS r WHERE (r.shard, r.rid) IN "
    "(SELECT t.shard, t.rid FROM idx_token AS t WHERE t.code = %(c)s)",
    "sort key": "SELECT r.rid, (SELECT min(d.low) FROM idx_date AS d WHERE d.shard = r.shard "
    "AND d.rid = r.rid) AS k FROM resource AS r",
    "reverse include": "SELECT t.rid FROM idx_reference AS ref JOIN resource AS t "
    "ON t.shard = ref.shard AND t.rid = ref.rid WHERE ref.target_id IN (%(a)s, %(b)s)",
    "chain": "SELECT r.rid FROM resource AS r WHERE (r.shard, r.rid) IN (SELECT ref.shard, "
    "ref.rid FROM idx_reference AS ref WHERE (ref.target_type, ref.target_id) IN "
    "(SELECT p.type, p.id FROM resource AS p WHERE p.deleted = false))",
    "own compartment": "SELECT r.rid FROM resource AS r WHERE r.shard = %(s)s AND "
    "(r.shard, r.rid) IN (SELECT c.shard, c.rid FROM compartment AS c "
    "WHERE c.shard = %(s2)s AND c.patient_id = %(p)s)",
    "compartment elsewhere": "SELECT r.rid FROM resource AS r WHERE (r.shard, r.rid) IN "
    "(SELECT c.shard, c.rid FROM compartment AS c WHERE c.patient_id = %(p)s "
    "AND c.shard != %(s)s)",
    "clear index": "WITH d0 AS (DELETE FROM idx_token WHERE shard = %(shard)s AND rid = %(rid)s)"
    " DELETE FROM compartment WHERE shard = %(shard)s AND rid = %(rid)s",
    "update": "UPDATE resource SET version = %s, body = %s WHERE shard = %s AND rid = %s",
    "lock": "SELECT rid FROM resource WHERE type = %s AND id = %s AND shard = %s FOR UPDATE",
    "copy": "COPY idx_token (rid, shard, rtype, param, system, code, text) FROM STDIN",
    "reference table": "SELECT j.id FROM job AS j WHERE j.status = %s FOR UPDATE SKIP LOCKED",
}

#: name → (statement, what the checker must say about it)
BAD = {
    "include as a join": (
        "SELECT t.rid FROM idx_reference AS ref JOIN resource AS t "
        "ON t.type = ref.target_type AND t.id = ref.target_id WHERE ref.rid IN (1, 2)",
        "without equal shard columns",
    ),
    "join without shard": (
        "SELECT t.rid FROM idx_reference AS ref JOIN resource AS t ON t.rid = ref.rid",
        "without equal shard columns",
    ),
    "correlated without shard": (
        "SELECT r.rid FROM resource AS r WHERE EXISTS "
        "(SELECT 1 FROM idx_token AS t WHERE t.rid = r.rid AND t.param = 'code')",
        "correlated with r",
    ),
    "semi-join on rid": (
        "SELECT r.rid FROM resource AS r WHERE r.rid IN "
        "(SELECT t.rid FROM idx_token AS t WHERE t.code = 'x')",
        "semi-join on rid",
    ),
    "correlated reference": (
        "SELECT r.rid FROM resource AS r WHERE r.id IN (SELECT ref.target_id "
        "FROM idx_reference AS ref WHERE ref.shard = r.shard AND ref.rid = r.rid)",
        "reference lookup correlated",
    ),
    "update of shard": (
        "UPDATE resource SET shard = 1, version = 2 WHERE shard = 2 AND rid = 3",
        "sets shard",
    ),
    "delete on any shard": ("DELETE FROM idx_token WHERE rid = 5", "without shard = <value>"),
    "lock on any shard": (
        "SELECT rid FROM resource WHERE type = %s AND id = %s FOR UPDATE",
        "FOR UPDATE",
    ),
    "$everything before the shard column": (
        "SELECT r.rid FROM resource AS r WHERE r.deleted IS false AND (r.rid = 7 OR "
        "r.rid IN (SELECT compartment.rid FROM compartment WHERE compartment.patient_id = 'p1'))",
        "compartment read without compartment.shard",
    ),
    "compartment, outer unbound": (
        "SELECT r.rid FROM resource AS r WHERE (r.shard, r.rid) IN (SELECT c.shard, c.rid "
        "FROM compartment AS c WHERE c.shard = 5 AND c.patient_id = 'p1')",
        "compartment read without r.shard",
    ),
    "compartment, inner unbound": (
        "SELECT r.rid FROM resource AS r WHERE r.shard = 5 AND (r.shard, r.rid) IN "
        "(SELECT c.shard, c.rid FROM compartment AS c WHERE c.patient_id = 'p1')",
        "compartment read without c.shard",
    ),
    "copy without shard": ("COPY idx_token (rid, rtype, param) FROM STDIN", "shard column"),
    "insert without shard": (
        "INSERT INTO compartment (rid, patient_id) VALUES (%s, %s)",
        "shard column",
    ),
    "not SQL": ("SELEC rid FROM resource", "cannot parse"),
    "unknown command": ("SHOW search_path", "cannot parse"),
}


@pytest.mark.parametrize("name", GOOD)
def test_the_checker_accepts_the_designed_shapes(name: str) -> None:
    check(GOOD[name])


@pytest.mark.parametrize("name", BAD)
def test_the_checker_rejects_what_the_design_forbids(name: str) -> None:
    sql, reason = BAD[name]
    with pytest.raises(Forbidden, match=re.escape(reason)):
        check(sql)


# -- the workload ------------------------------------------------------------------------------


@dataclass
class Captured:
    statements: list[str] = field(default_factory=list)
    during_everything: list[str] = field(default_factory=list)
    everything: bool = False  # set while a $everything request runs

    def add(self, sql: str) -> None:
        self.statements.append(sql)
        if self.everything:
            self.during_everything.append(sql)


@pytest.fixture(scope="module")
def backend() -> str:
    """The design is about PostgreSQL (Citus); SQLite is never distributed."""
    return "postgresql"


@pytest.fixture(scope="module")
def client(database: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from cityhealth.app import create_app

    url = database.url.render_as_string(hide_password=False)
    settings = Settings(database_url=url, var_dir=tmp_path_factory.mktemp("var"))
    app = create_app(settings, database)
    # A hospital's system: every statement carries the access rules' conditions too.
    his = bearer(app, organization="Organization/distribution-his")
    with TestClient(app, raise_server_exceptions=False, headers=his) as client:
        yield client


@pytest.fixture(scope="module")
def captured(client: TestClient, database: Database) -> Iterator[Captured]:
    """Every statement the engine sends while the workload runs, COPY included (psycopg runs
    COPY outside SQLAlchemy's cursor events)."""
    result = Captured()

    def on_execute(*args: Any) -> None:
        result.add(args[2])

    original_copy = psycopg.Cursor.copy

    def copy(self: psycopg.Cursor[Any], statement: Any, *args: Any, **kwargs: Any) -> Any:
        result.add(str(statement))
        return original_copy(self, statement, *args, **kwargs)

    event.listen(database.engine, "before_cursor_execute", on_execute)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg.Cursor, "copy", copy)
        try:
            workload(client, result)
        finally:
            event.remove(database.engine, "before_cursor_execute", on_execute)
    yield result


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json() if response.content else {}
    return body


def everything(client: TestClient, captured: Captured, pid: str) -> tuple[list[str], set[str]]:
    """Ids matched and included by Patient/pid/$everything, page by page."""
    matched: list[str] = []
    included: set[str] = set()
    url: str | None = f"/fhir/Patient/{pid}/$everything?_count=3"
    captured.everything = True
    try:
        while url is not None:
            page = ok(client.get(url))
            matched += ids(page)
            included |= set(ids(page, "include"))
            url = relative(nxt) if (nxt := link(page, "next")) else None
    finally:
        captured.everything = False
    return matched, included


def export(client: TestClient, kick_off: str) -> dict[str, Any]:
    response = client.get(kick_off, headers={"Prefer": "respond-async"})
    ok(response, 202)
    status = relative(response.headers["content-location"])
    deadline = time.monotonic() + 30
    while True:
        client.app.state.jobs.run_pending()  # type: ignore[attr-defined]
        response = client.get(status)
        if response.status_code != 202 or time.monotonic() > deadline:
            return ok(response)
        time.sleep(0.05)


def workload(client: TestClient, captured: Captured) -> None:
    """Writes, reads, history, searches, includes, $everything and exports through the API."""
    code, sys = unique("code"), f"urn:test:{unique('sys')}"
    coding = {"system": sys, "code": code}
    family = unique("Fam")
    a, b = f"a{unique()}", f"b{unique()}"  # a < b: a resource of both belongs to a's shard
    org = create(client, {"resourceType": "Organization", "name": unique("Org")})["id"]
    doctor = unique("dr")
    ok(
        client.put(
            f"/fhir/Practitioner/{doctor}", json={"resourceType": "Practitioner", "id": doctor}
        ),
        201,
    )
    for pid, birth in ((a, "1980-02-03"), (b, None)):
        body = {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"family": family}],
            "identifier": [{"system": sys, "value": pid}],
            "managingOrganization": {"reference": f"Organization/{org}"},
        }
        if birth:
            body["birthDate"] = birth
        ok(client.put(f"/fhir/Patient/{pid}", json=body), 201)

    def obs(subject: str, day: int, **more: Any) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [coding]},
            "subject": {"reference": f"Patient/{subject}"},
            "effectiveDateTime": f"2021-03-{day:02d}",
            "valueQuantity": {
                "value": day,
                "unit": "mg",
                "system": "http://unitsofmeasure.org",
                "code": "mg",
            },
            "performer": [{"reference": f"Practitioner/{doctor}"}],
            **more,
        }

    kept = [create(client, obs(a, day))["id"] for day in (1, 2, 3)]
    shared = create(client, obs(b, 4, performer=[{"reference": f"Patient/{a}"}]))["id"]
    moved = create(client, obs(a, 5))["id"]
    encounter = create(
        client,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{a}"},
            "serviceProvider": {"reference": f"Organization/{org}"},
        },
    )["id"]
    group = create(
        client,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{a}"}},
                {"entity": {"reference": f"Patient/{b}"}},
            ],
        },
    )["id"]
    # Updates: in place, and to another patient (the rows move to that patient's shard).
    ok(client.put(f"/fhir/Observation/{kept[0]}", json={**obs(a, 6), "id": kept[0]}))
    ok(client.put(f"/fhir/Observation/{moved}", json={**obs(b, 5), "id": moved}))
    ok(
        client.patch(
            f"/fhir/Patient/{b}",
            json=[{"op": "add", "path": "/gender", "value": "female"}],
            headers={"Content-Type": "application/json-patch+json"},
        )
    )
    ok(client.delete(f"/fhir/Observation/{kept[2]}"), 204)
    ok(
        client.put(
            f"/fhir/Patient?identifier={sys}|{a}",
            json={
                "resourceType": "Patient",
                "name": [{"family": family}],
                "birthDate": "1980-02-03",
                "identifier": [{"system": sys, "value": a}],
                "managingOrganization": {"reference": f"Organization/{org}"},
            },
        )
    )
    # A transaction large enough for COPY, with a conditional create and an update.
    posts = [
        {
            "fullUrl": "urn:uuid:c",
            "resource": {"resourceType": "Patient", "identifier": [{"system": sys, "value": "c"}]},
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={sys}|c"},
        }
    ]
    posts += [
        {
            "resource": {**obs(a, 7), "subject": {"reference": "urn:uuid:c"}},
            "request": {"method": "POST", "url": "Observation"},
        }
        for _ in range(55)
    ]
    posts.append(
        {
            "resource": {**obs(a, 8), "id": kept[1]},
            "request": {"method": "PUT", "url": f"Observation/{kept[1]}"},
        }
    )
    done = ok(client.post("/fhir", json=bundle("transaction", *posts)))
    c = done["entry"][0]["response"]["location"].split("/")[1]
    # A small transaction (multi-row INSERT) and a batch (savepoints).
    few = [
        {
            "resource": {"resourceType": "Organization"},
            "request": {"method": "POST", "url": "Organization"},
        }
    ] * 3
    ok(client.post("/fhir", json=bundle("transaction", *few)))
    ok(client.post("/fhir", json=bundle("batch", *few)))

    # Reads, history.
    read(client, "Patient", a)
    read(client, "Practitioner", doctor)
    assert read(client, "Observation", moved)["subject"]["reference"] == f"Patient/{b}"
    first = ok(client.get(f"/fhir/Observation/{moved}/_history/1"))
    assert first["subject"]["reference"] == f"Patient/{a}"
    ok(client.get(f"/fhir/Observation/{kept[2]}"), 410)
    assert ok(client.get(f"/fhir/Observation/{moved}/_history"))["total"] == 2
    ok(client.get("/fhir/Observation/_history?_count=3"))
    at = {"_count": "2", "_at": first["meta"]["lastUpdated"]}
    ok(client.get("/fhir/_history", params=at))
    ok(client.get(f"/fhir/Patient/{a}/_history?_since=2000-01-01"))

    # Searches of every kind.
    def found(rtype: str, query: str) -> set[str]:
        return set(ids(search(client, rtype, query)))

    live = {kept[0], kept[1]}
    assert found("Observation", f"code={sys}|{code}&subject=Patient/{a}") == live
    assert found("Patient", f"identifier={sys}|{a}") == {a}
    assert found("Patient", f"family={family}&name:contains={family[3:]}") == {a, b}
    assert found("Observation", f"subject={a}&date=ge2021-03-06&date=lt2021-04") == live
    assert found("Observation", f"subject=Patient/{a}&value-quantity=gt5.5") == live
    assert found("Patient", f"family={family}&birthdate:missing=true") == {b}
    assert found("Observation", f"subject={a}&code:not={sys}|x") == live
    assert found("Observation", f"code-value-quantity={sys}|{code}$gt7.5&patient={a}") == {kept[1]}
    sorted_ids = ids(search(client, "Observation", f"subject={a}&_sort=-date,code"))
    assert sorted_ids == [kept[1], kept[0]]
    assert found("Observation", f"subject:Patient.family={family}&_count=100") == (
        live | {shared, moved}
    )
    assert found(
        "Encounter", f"subject.identifier={sys}|{a}&service-provider.name:missing=false"
    ) == {encounter}
    assert found("Patient", f"_has:Observation:subject:code={sys}|{code}&family={family}") == {
        a,
        b,
    }
    included = search(
        client,
        "Observation",
        f"subject={a}&_include=Observation:subject&_include=Observation:performer",
    )
    assert set(ids(included, "include")) == {a, doctor}
    reverse = search(client, "Patient", f"_id={a}&_revinclude=Observation:subject")
    assert set(ids(reverse, "include")) == live
    iterated = search(
        client,
        "Encounter",
        f"_id={encounter}&_include=Encounter:subject&_revinclude:iterate=Observation:subject",
    )
    assert set(ids(iterated, "include")) == {a} | live
    page = search(client, "Observation", f"subject={c}&_count=20&_total=accurate")
    assert page["total"] == 55
    pages = 1
    while (nxt := link(page, "next")) is not None:
        page = ok(client.get(relative(nxt)))
        pages += 1
    assert pages == 3
    assert ok(client.get(f"/fhir/Patient?family={family}&_summary=count"))["total"] == 2
    ok(client.get("/fhir?_type=Patient,Observation&_lastUpdated=ge2000-01-01&_count=5"))

    # $everything: a's own shard; b's record holds `shared`, which lives on a's shard.
    matched, outside = everything(client, captured, a)
    assert sorted(matched) == sorted({a, *live, shared, encounter, group})
    assert {org, doctor} <= outside
    matched, outside = everything(client, captured, b)
    assert sorted(matched) == sorted({b, shared, moved, group})

    # Bulk export at every level.
    for kick_off in ("/fhir/$export", "/fhir/Patient/$export", f"/fhir/Group/{group}/$export"):
        assert export(client, f"{kick_off}?_type=Patient,Observation")["output"]


# -- what the workload emitted -----------------------------------------------------------------


def test_every_statement_keeps_the_distribution_design(captured: Captured) -> None:
    failures = []
    for sql in captured.statements:
        try:
            check(sql)
        except Forbidden as error:
            failures.append(f"{error}\n    {' '.join(sql.split())}")
    assert not failures, "\n".join(failures)


def test_the_workload_exercised_every_shape(captured: Captured) -> None:
    """A capture that missed statements, or a checker that stopped seeing a shape, fails here."""
    tally = Tally()
    for sql in captured.statements:
        check(sql, tally)
    least = {
        "statement": 200,
        "co-located semi-join": 40,
        "co-located join": 3,
        "co-located correlated subquery": 4,
        "uncorrelated reference lookup": 8,
        "compartment, own shard": 3,
        "compartment, other shards": 3,
        "INSERT": 30,
        "COPY": 5,
        "UPDATE": 4,
        "single-shard lock": 8,
        "DELETE": 10,
    }
    short = {kind: (tally.kinds[kind], n) for kind, n in least.items() if tally.kinds[kind] < n}
    assert not short, f"(seen, expected at least) per kind: {short}"


def test_everything_reads_the_patients_own_record_on_one_shard(captured: Captured) -> None:
    tally = Tally()
    for sql in captured.during_everything:
        check(sql, tally)
    assert tally.kinds["compartment, own shard"] >= 3  # a's two pages and b's page
    assert tally.kinds["compartment, other shards"] >= 3
    # The patient itself is read by id on its shard too.
    reads = [s for s in captured.during_everything if s.startswith("SELECT rid, shard, type")]
    assert reads and all("shard = %s" in s for s in reads)


def test_every_row_of_a_resource_carries_its_shard(
    captured: Captured, database: Database, definitions: Definitions
) -> None:
    """After the workload (moves and deletes included): every table agrees with `resource`,
    and a live resource's shard follows its compartment patients."""
    with database.read() as conn:
        for table in sorted(DISTRIBUTED_TABLES - {"resource"}):
            stray = conn.execute(
                text(
                    f"SELECT count(*) FROM {table} x JOIN resource r ON r.rid = x.rid"
                    " WHERE r.shard <> x.shard"
                )
            ).scalar()
            assert stray == 0, table
        patients: dict[int, set[str]] = {}
        for rid, pid in conn.execute(select(compartment.c.rid, compartment.c.patient_id)):
            patients.setdefault(rid, set()).add(pid)
        rows = conn.execute(
            select(resource.c.rid, resource.c.shard, resource.c.type, resource.c.id).where(
                resource.c.deleted.is_(False)
            )
        ).all()
    assert len(rows) > 60
    for rid, shard, rtype, rid_id in rows:
        assert shard == shard_key(rtype, rid_id, patients.get(rid, set())), f"{rtype}/{rid_id}"
    assert {rtype for _, _, rtype, _ in rows} >= {"Patient", "Observation", "Practitioner"}


# -- moves and migration 0004 ------------------------------------------------------------------


def _observation(subject: str, performer: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "t"},
        "subject": {"reference": subject},
    }
    if performer:
        body["performer"] = [{"reference": performer}]
    return body


@contextmanager
def _fresh_engine(kind: str, tmp_path: Path, definitions: Definitions) -> Iterator[FhirEngine]:
    """An engine on a new database of `kind`, migrated to the head revision."""
    for url in make_database_url(kind, tmp_path):
        upgrade(url)
        db = Database(url, pool_size=1)
        try:
            yield FhirEngine(db, definitions, Settings(database_url=url))
        finally:
            db.dispose()


def _subject(engine: FhirEngine, pid: str) -> list[str]:
    """Ids of the Observations about a patient."""
    request = engine.parse_search("Observation", [("subject", pid)])
    return [h.id for h in engine.search(SYSTEM, request).matches]


@pytest.mark.parametrize("kind", BACKENDS)
def test_an_update_to_another_patient_moves_every_row(
    kind: str, tmp_path: Path, definitions: Definitions
) -> None:
    with _fresh_engine(kind, tmp_path, definitions) as engine:
        repo, db = engine.repository, engine.db
        a, b = f"a{unique()}", f"b{unique()}"
        for pid in (a, b):
            repo.update(SYSTEM, "Patient", pid, {"resourceType": "Patient", "id": pid})
        made = repo.create(SYSTEM, _observation(f"Patient/{a}")).stored
        assert made.shard == patient_shard(a)
        body = {**_observation(f"Patient/{b}"), "id": made.id}
        moved = repo.update(SYSTEM, "Observation", made.id, body).stored
        assert (moved.rid, moved.version, moved.shard) == (made.rid, 2, patient_shard(b))
        with db.read() as conn:
            for table in sorted(DISTRIBUTED_TABLES):
                shards = conn.execute(
                    text(f"SELECT DISTINCT shard FROM {table} WHERE rid = :rid"),
                    {"rid": made.rid},
                ).scalars()
                assert set(shards) <= {patient_shard(b)}, table
        versions = engine.history(SYSTEM, [], "Observation", made.id).entries
        assert [v.version for v in versions] == [2, 1]
        assert f"Patient/{a}" in (versions[1].body or "")
        assert repo.vread(SYSTEM, "Observation", made.id, "1").shard == patient_shard(b)
        assert (_subject(engine, a), _subject(engine, b)) == ([], [made.id])
        assert made.id in {h.id for h in engine.everything(SYSTEM, b, []).matches}
        assert made.id not in {h.id for h in engine.everything(SYSTEM, a, []).matches}
        # Deleted, then written again for the first patient: it moves back.
        repo.delete(SYSTEM, "Observation", made.id)
        body = {**_observation(f"Patient/{a}"), "id": made.id}
        again = repo.update(SYSTEM, "Observation", made.id, body)
        assert again.created and again.stored.shard == patient_shard(a)
        assert _subject(engine, a) == [made.id]


# -- migration 0004 ----------------------------------------------------------------------------


def _shards(db: Database) -> dict[str, set[tuple[int, int]]]:
    with db.read() as conn:
        return {
            table: {
                (rid, shard) for rid, shard in conn.execute(text(f"SELECT rid, shard FROM {table}"))
            }
            for table in sorted(DISTRIBUTED_TABLES)
        }


@pytest.mark.parametrize("kind", BACKENDS)
def test_migration_fills_the_shard_of_existing_data(
    kind: str, tmp_path: Path, definitions: Definitions
) -> None:
    """Data written before 0004 (the schema of 0003) gets the shards the write path gives."""
    with _fresh_engine(kind, tmp_path, definitions) as engine:
        repo, db = engine.repository, engine.db
        url = db.url.render_as_string(hide_password=False)
        a, b = f"a{unique()}", f"b{unique()}"
        for pid in (a, b):
            repo.update(SYSTEM, "Patient", pid, {"resourceType": "Patient", "id": pid})
        org = repo.create(SYSTEM, {"resourceType": "Organization", "name": "x"}).stored
        made = [
            repo.create(SYSTEM, _observation(subject, performer)).stored
            for subject, performer in (
                (f"Patient/{b}", f"Patient/{a}"),
                (f"Patient/{a}", f"Organization/{org.id}"),
                (f"Patient/{b}", f"Organization/{org.id}"),
            )
        ]
        repo.delete(SYSTEM, "Observation", made[2].id)
        before = _shards(db)
        assert {s for _, s in before["resource"]} >= {patient_shard(a), patient_shard(b)}
        command.downgrade(alembic_config(url), "0003")
        assert "shard" not in {c["name"] for c in inspect(db.engine).get_columns("resource")}
        db.dispose()
        upgrade(url)
        columns = {c["name"]: c for c in inspect(db.engine).get_columns("idx_reference")}
        assert columns["shard"]["nullable"] is False
        after = _shards(db)
        # A deleted resource, which has no compartment left, is keyed by its own type/id.
        gone = (made[2].rid, shard_key("Observation", made[2].id, ()))
        assert gone in after["resource"]
        for table, rows in before.items():
            assert {r for r in rows if r[0] != made[2].rid} == {
                r for r in after[table] if r[0] != made[2].rid
            }, table
        assert {r for r in after["resource_history"] if r[0] == made[2].rid} == {gone}
        assert _subject(engine, a) == [made[1].id]
