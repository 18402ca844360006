"""The FHIR interactions (http.html) over the repository: conditional create / update / delete,
patch, search, history and $everything. The REST router and bundle processing both call this,
so a transaction entry behaves exactly like the same request made alone."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import Connection, not_, select, tuple_

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir import jsonio
from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.datetimes import date_range
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.errors import bad_request, precondition_failed, unprocessable
from cityhealth.fhir.history import HistoryPage, history, parse_history_params
from cityhealth.fhir.patch import PatchError, apply_fhir_patch, apply_json_patch
from cityhealth.fhir.repository import Repository, WriteResult
from cityhealth.fhir.schema import compartment, idx_reference, resource
from cityhealth.fhir.search import Hit, Searcher, SearchResult, decode_cursor, encode_cursor
from cityhealth.fhir.search_parse import QueryParser, SearchRequest
from cityhealth.fhir.search_sql import own_rows
from cityhealth.fhir.sharding import patient_shard
from cityhealth.fhir.store import Stored
from cityhealth.security.break_glass import MIN_REASON, declare
from cityhealth.security.deidentify import identifying
from cityhealth.security.policy import Policy, forbidden, rules_for
from cityhealth.security.visibility import Visibility

JSON_PATCH = "application/json-patch+json"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CreateResult:
    write: WriteResult
    status: int  # 201 created, 200 when If-None-Exist matched an existing resource


def query_pairs(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)


def _recorded(
    interaction: str, what: Callable[[dict[str, Any]], str], writes: bool = False
) -> Callable[[F], F]:
    """Record the interaction in the audit trail (cityhealth.security.auditing): a write
    records itself in its transaction; a read names what it returned; a refusal or failure is
    recorded once rolled back. `what` names the target from the call's arguments."""

    def decorate(method: F) -> F:
        signature = inspect.signature(method)

        @functools.wraps(method)
        def run(self: FhirEngine, *args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(self, *args, **kwargs).arguments
            request = arguments.get("request")
            query = "?" + urlencode(request.canonical()) if request is not None else None
            if (
                not writes
                and "conn" not in arguments
                and _may_read_audit(interaction, arguments, query)
            ):
                self.repository.settle_audit()
            with self.auditor.action(
                arguments["ctx"], interaction, what(arguments), arguments.get("conn"), query
            ) as seen:
                result = method(self, *args, **kwargs)
                seen.recorded = writes and not (
                    isinstance(result, CreateResult) and result.status == 200
                )
                seen.add(_touched(result))
                return result

        return cast(F, run)

    return decorate


def _may_read_audit(interaction: str, arguments: dict[str, Any], query: str | None) -> bool:
    """Whether a read may reach AuditEvents, which must then be indexed (audit.settle)."""
    request = arguments.get("request")
    if interaction == "operation":  # $everything: only if _type names it
        return "AuditEvent" in str(arguments.get("params"))
    rtype = arguments.get("rtype") or (request.resource_type if request is not None else None)
    if not rtype:  # across types
        return request is None or not request.types or "AuditEvent" in request.types
    return rtype == "AuditEvent" or "AuditEvent" in (query or "")


def _touched(result: Any) -> list[Any]:
    if isinstance(result, SearchResult):
        return [*result.matches, *result.included]
    if isinstance(result, HistoryPage):
        return list(result.entries)
    if isinstance(result, CreateResult):
        return [result.write.stored]
    if isinstance(result, WriteResult):
        return [result.stored]
    return [result] if isinstance(result, Stored) else []


def _instance(arguments: dict[str, Any]) -> str:
    rtype = arguments.get("rtype") or "Patient"
    rid = arguments.get("rid") or arguments.get("patient_id")
    return f"{rtype}/{rid}" if rid else str(arguments.get("rtype") or "")


def _type(arguments: dict[str, Any]) -> str:
    request = arguments.get("request")
    return str(arguments.get("rtype") or (request.resource_type if request is not None else ""))


class FhirEngine:
    def __init__(self, db: Database, definitions: Definitions, settings: Settings) -> None:
        self.db = db
        self.definitions = definitions
        self.settings = settings
        self.policy = Policy(settings.break_glass_minutes)
        self.repository = Repository(db, definitions, self.policy)
        self.auditor = self.repository.auditor
        self.parser = QueryParser(
            definitions, settings.search_default_count, settings.search_max_count
        )
        self.searcher = Searcher(self.parser, settings.search_max_includes)

    # -- search -------------------------------------------------------------------------
    def parse_search(
        self, rtype: str, params: list[tuple[str, str]], lenient: bool = False
    ) -> SearchRequest:
        self.repository.check_type(rtype)
        return self.parser.parse(rtype, params, lenient)

    def parse_system_search(
        self, params: list[tuple[str, str]], lenient: bool = False
    ) -> SearchRequest:
        return self.parser.parse_system(params, lenient)

    @_recorded("search", _type)
    def search(
        self,
        ctx: AccessContext,
        request: SearchRequest,
        base_url: str | None = None,
        conn: Connection | None = None,
    ) -> SearchResult:
        for rtype in request.types or [request.resource_type]:
            if rtype:
                self.policy.require(ctx, rtype, "search")
        with self.repository.reading(conn) as tx:
            visibility = self.policy.visibility(ctx, tx)
            asked = [c.name for c in request.criteria] + [code for code, _ in request.sort]
            if visibility.deidentified and any(identifying(name) for name in asked):
                raise forbidden("De-identified access cannot search or sort by identifying data")
            return presented(visibility, self.searcher.run(tx, request, base_url, visibility))

    def find(self, ctx: AccessContext, conn: Connection, rtype: str, query: str) -> list[Hit]:
        """Resources matching conditional criteria (at most two: enough to tell 0, 1, many)."""
        if query.startswith(f"{rtype}?"):  # some clients repeat the type
            query = query[len(rtype) + 1 :]
        params = [(k, v) for k, v in query_pairs(query) if not k.startswith("_format")]
        if not params:
            raise bad_request(f"Conditional criteria for {rtype} are empty")
        request = self.parser.parse(rtype, params)
        request.count = 2
        request.includes = []
        return self.searcher.run(conn, request, None, self.policy.visibility(ctx, conn)).matches

    # -- reads --------------------------------------------------------------------------------
    @_recorded("read", _instance)
    def read(
        self, ctx: AccessContext, rtype: str, rid: str, conn: Connection | None = None
    ) -> Stored:
        return self.repository.read(ctx, rtype, rid, conn)

    @_recorded("vread", _instance)
    def vread(
        self, ctx: AccessContext, rtype: str, rid: str, vid: str, conn: Connection | None = None
    ) -> Stored:
        return self.repository.vread(ctx, rtype, rid, vid, conn)

    # -- writes ---------------------------------------------------------------------------
    @_recorded("create", _type, writes=True)
    def create(
        self,
        ctx: AccessContext,
        rtype: str,
        body: Any,
        if_none_exist: str | None = None,
        conn: Connection | None = None,
    ) -> CreateResult:
        self.repository.check_type(rtype)
        with self.repository.transaction(conn) as tx:
            if if_none_exist:
                self.repository.validate(body, rtype)
                hits = self.find(ctx, tx, rtype, if_none_exist)
                if len(hits) > 1:
                    raise precondition_failed(
                        f"If-None-Exist '{if_none_exist}' matches more than one {rtype}"
                    )
                if hits:
                    stored = self.repository.read(ctx, rtype, hits[0].id, tx)
                    return CreateResult(WriteResult(stored, False), 200)
            return CreateResult(self.repository.create(ctx, body, rtype, tx), 201)

    @_recorded("update", _instance, writes=True)
    def update(
        self,
        ctx: AccessContext,
        rtype: str,
        rid: str,
        body: Any,
        if_match: int | None = None,
        conn: Connection | None = None,
    ) -> WriteResult:
        return self.repository.update(ctx, rtype, rid, body, if_match, conn)

    @_recorded("update", _type, writes=True)
    def conditional_update(
        self,
        ctx: AccessContext,
        rtype: str,
        query: str,
        body: Any,
        if_match: int | None = None,
        conn: Connection | None = None,
    ) -> WriteResult:
        self.repository.check_type(rtype)
        self.repository.validate(body, rtype)
        with self.repository.transaction(conn) as tx:
            hits = self.find(ctx, tx, rtype, query)
            if len(hits) > 1:
                raise precondition_failed(f"The criteria '{query}' match more than one {rtype}")
            if not hits:
                if body.get("id"):
                    return self.repository.update(ctx, rtype, body["id"], body, if_match, tx)
                return self.repository.create(ctx, body, rtype, tx)
            if body.get("id") not in (None, hits[0].id):
                raise bad_request(
                    f"The id in the body ({body['id']}) is not the matched resource ({hits[0].id})",
                    "id",
                )
            body["id"] = hits[0].id
            return self.repository.update(ctx, rtype, hits[0].id, body, if_match, tx)

    @_recorded("delete", _type, writes=True)
    def conditional_delete(
        self, ctx: AccessContext, rtype: str, query: str, conn: Connection | None = None
    ) -> int:
        self.repository.check_type(rtype)
        with self.repository.transaction(conn) as tx:
            hits = self.find(ctx, tx, rtype, query)
            if len(hits) > 1:
                raise precondition_failed(f"The criteria '{query}' match more than one {rtype}")
            for hit in hits:
                self.repository.delete(ctx, rtype, hit.id, tx)
            return len(hits)

    @_recorded("delete", _instance, writes=True)
    def delete(
        self, ctx: AccessContext, rtype: str, rid: str, conn: Connection | None = None
    ) -> Stored | None:
        return self.repository.delete(ctx, rtype, rid, conn)

    @_recorded("patch", _instance, writes=True)
    def patch(
        self,
        ctx: AccessContext,
        rtype: str,
        rid: str,
        content_type: str,
        patch: Any,
        if_match: int | None = None,
        conn: Connection | None = None,
    ) -> WriteResult:
        with self.repository.transaction(conn) as tx:
            current = self.repository.read(ctx, rtype, rid, tx)
            if if_match is not None and current.version != if_match:
                raise precondition_failed(
                    f"Version {if_match} is not the current version of {rtype}/{rid}"
                )
            assert current.body is not None
            original = jsonio.loads(current.body)
            try:
                if content_type == JSON_PATCH:
                    patched = apply_json_patch(original, patch)
                elif isinstance(patch, dict) and patch.get("resourceType") == "Parameters":
                    patched = apply_fhir_patch(original, patch)
                else:
                    raise bad_request(
                        "A patch is a JSON Patch (application/json-patch+json) "
                        "or a FHIR Patch Parameters resource (application/fhir+json)"
                    )
            except PatchError as error:
                expression = (error.expression,) if error.expression else ()
                raise unprocessable(f"The patch cannot be applied: {error}", *expression) from None
            if patched.get("resourceType") != rtype or patched.get("id") != rid:
                raise unprocessable("A patch may not change the resourceType or id")
            return self.repository.update(ctx, rtype, rid, patched, None, tx, method="PATCH")

    # -- history --------------------------------------------------------------------------
    @_recorded("history", _instance)
    def history(
        self,
        ctx: AccessContext,
        params: list[tuple[str, str]],
        rtype: str | None = None,
        rid: str | None = None,
    ) -> HistoryPage:
        if rtype:
            self.repository.check_type(rtype)
            self.policy.require(ctx, rtype, "history")
        query = parse_history_params(
            params, self.settings.search_default_count, self.settings.search_max_count
        )
        query.rtype, query.rid = rtype, rid
        with self.repository.reading() as tx:
            visibility = self.policy.visibility(ctx, tx)
            if rtype and rid:
                found = self.repository.read_any_version(ctx, rtype, rid, tx)
                query.row = (found.shard, found.rid)
                page = history(tx, query)  # read_any_version checked the caller sees it
            else:
                page = history(tx, query, visibility)
        page.entries = [visibility.present(entry) for entry in page.entries]
        return page

    # -- break-glass --------------------------------------------------------------------------
    @_recorded("operation", _instance, writes=True)
    def break_glass(self, ctx: AccessContext, patient_id: str, reason: Any) -> Stored:
        """Declare an emergency for one patient (cityhealth.security.break_glass): their whole
        record opens to the caller for `break_glass_minutes`, and the declaration is recorded
        for review."""
        if not rules_for(ctx).break_glass:
            raise forbidden("Only doctors and nurses may declare an emergency access")
        if not isinstance(reason, str) or len(reason.strip()) < MIN_REASON:
            raise bad_request(f"Give the emergency's reason (at least {MIN_REASON} characters)")
        with self.repository.transaction() as tx:
            self.repository.read(SYSTEM, "Patient", patient_id, tx)  # 404 if there is none
            declared = declare(self.repository, tx, ctx, patient_id, reason.strip())
        self.repository.settle_audit()  # the access rules find the declaration from now on
        return declared

    # -- $everything ------------------------------------------------------------------------
    @_recorded("operation", _instance)
    def everything(
        self, ctx: AccessContext, rid: str, params: list[tuple[str, str]]
    ) -> SearchResult:
        """The patient, the resources of their compartment, and what those reference (paged).

        The compartment is read in two statements: the resources on the patient's own shard
        (all of them but those that also belong to a patient with a smaller id), a single-shard
        query, and the others, found through the compartment rows of other shards."""
        count = self.settings.search_default_count
        cursor: str | None = None
        types: list[str] = []
        since: int | None = None
        for name, value in params:
            if name == "_count" and value.isdigit():
                count = min(int(value), self.settings.search_max_count)
            elif name == "_cursor":
                cursor = value
            elif name == "_type":
                types = [t for t in value.split(",") if t]
            elif name == "_since":
                since = _since(value)
            elif name not in ("_format", "_pretty"):
                raise bad_request(f"Unknown $everything parameter '{name}'")
        request = SearchRequest("Patient", count=count, cursor=cursor)
        self.policy.require(ctx, "Patient", "$everything")
        with self.repository.reading() as tx:
            self.repository.read(ctx, "Patient", rid, tx)
            visibility = self.policy.visibility(ctx, tx)
            after: int | None = None
            if cursor:
                _, keys = decode_cursor(cursor)
                if len(keys) != 1 or type(keys[0]) is not int:
                    raise bad_request("The paging cursor does not match this search")
                after = keys[0]
            shard = patient_shard(rid)
            c = compartment.alias("c")
            home = select(c.c.shard, c.c.rid).where(c.c.shard == shard, c.c.patient_id == rid)
            away = select(c.c.shard, c.c.rid).where(c.c.patient_id == rid, c.c.shard != shard)
            r = resource.alias("r")
            rows: list[Any] = []
            dialect = tx.dialect.name
            for where in (
                [r.c.shard == shard, own_rows(r, home, dialect)],
                [own_rows(r, away, dialect)],
            ):
                where.append(r.c.deleted.is_(False))
                if types:
                    where.append(r.c.type.in_(types))
                else:  # the record of care, not the trail of who looked at it
                    where.append(r.c.type != "AuditEvent")
                if since is not None:
                    where.append(r.c.last_updated >= since)
                if after is not None:
                    where.append(r.c.rid > after)
                seen = visibility.clause(r)
                if seen is not None:
                    where.append(seen)
                query = select(r.c.rid, r.c.shard, r.c.type, r.c.id, r.c.body).where(*where)
                rows += tx.execute(query.order_by(r.c.rid).limit(count + 1)).all()
            rows.sort(key=lambda x: x.rid)
            result = SearchResult(request)
            result.matches = [Hit(x.rid, x.shard, x.type, x.id, x.body) for x in rows[:count]]
            if len(rows) > count:
                result.next_cursor = encode_cursor("n", [rows[count - 1].rid])
            result.included = self._referenced_outside(tx, result.matches, rid, types, visibility)
        return presented(visibility, result)

    def _referenced_outside(
        self,
        conn: Connection,
        hits: list[Hit],
        patient_id: str,
        types: list[str],
        visibility: Visibility,
    ) -> list[Hit]:
        """Resources the page references that are not in the compartment (organizations …):
        they may live on any shard, so their (type, id) come from an uncorrelated subquery."""
        if not hits:
            return []
        ref = idx_reference.alias()
        targets = select(ref.c.target_type, ref.c.target_id).where(
            ref.c.shard.in_(sorted({h.shard for h in hits})),
            ref.c.rid.in_([h.rid for h in hits]),
        )
        c = compartment.alias("c")
        in_compartment = select(c.c.shard, c.c.rid).where(c.c.patient_id == patient_id)
        t = resource.alias()
        query = select(t.c.rid, t.c.shard, t.c.type, t.c.id, t.c.body).where(
            tuple_(t.c.type, t.c.id).in_(targets),
            t.c.deleted.is_(False),
            not_(own_rows(t, in_compartment, conn.dialect.name)),
        )
        if types:
            query = query.where(t.c.type.in_(types))
        seen = visibility.clause(t)
        if seen is not None:
            query = query.where(seen)
        return [
            Hit(x.rid, x.shard, x.type, x.id, x.body) for x in conn.execute(query.order_by(t.c.rid))
        ]


def presented(visibility: Visibility, result: SearchResult) -> SearchResult:
    """The result as the caller receives it (de-identified for some, see Visibility.present)."""
    if visibility.deidentified:
        result.matches = [visibility.present(hit) for hit in result.matches]
        result.included = [visibility.present(hit) for hit in result.included]
    return result


def _since(value: str) -> int:
    try:
        return date_range(value)[0]
    except ValueError:
        raise bad_request(f"_since must be a FHIR instant, not '{value}'") from None
