"""Transaction and batch Bundles (http.html#transaction, bundle.html).

A transaction is one database transaction: entries run in the order DELETE, POST, PUT/PATCH,
GET; `urn:uuid:` full URLs and conditional references (`Patient?identifier=…`) are resolved
first and rewritten everywhere in the resources; any failure rolls everything back. A batch
runs each entry on its own and reports each entry's status.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from sqlalchemy import Connection

from cityhealth.fhir import jsonio
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.engine import JSON_PATCH, FhirEngine, query_pairs
from cityhealth.fhir.errors import FhirError, bad_request, precondition_failed
from cityhealth.fhir.responses import searchset
from cityhealth.fhir.store import Stored

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}
_REFERENCE_JSON = re.compile(r'"reference":"((?:[^"\\]|\\.)*)"')
_URN_UUID = re.compile(
    r"urn:uuid:[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)
_CONDITIONAL_REF = re.compile(r"^[A-Z][A-Za-z]+\?.+")


def _skeleton(bundle: dict[str, Any]) -> dict[str, Any]:
    """The Bundle without its entries' resources: each resource is validated by the operation
    of its own entry, so that a batch reports it on that entry alone."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return bundle
    return {
        **bundle,
        "entry": [
            {k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
            for e in entries
        ],
    }


@contextmanager
def _about(entry: Entry) -> Iterator[None]:
    try:
        yield
    except FhirError as error:
        raise error.within(f"Bundle.entry[{entry.index}]") from None


@dataclass
class Entry:
    index: int
    method: str
    url: str
    resource: Any
    full_url: str | None
    if_none_exist: str | None
    if_match: int | None
    target_id: str | None = None  # id decided before processing (POST / conditional PUT)
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return urlsplit(self.url).path.strip("/")

    @property
    def query(self) -> str:
        return urlsplit(self.url).query

    @property
    def rtype(self) -> str:
        return self.path.split("/")[0]


def _status(code: int) -> str:
    return _STATUS_TEXT.get(code, str(code))


def _parse_if_match(value: Any) -> int | None:
    if value is None:
        return None
    tag = str(value).strip().removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise bad_request(f"ifMatch '{value}' is not a version ETag")
    return int(tag)


class BundleProcessor:
    def __init__(self, engine: FhirEngine) -> None:
        self.engine = engine

    def process(
        self, ctx: AccessContext, bundle: Any, base: str, conn: Connection | None = None
    ) -> dict[str, Any]:
        """Run a transaction or batch; inside the caller's transaction when `conn` is given
        (batch entries then each get a savepoint)."""
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise bad_request("POST to the base takes a Bundle", "resourceType")
        kind = bundle.get("type")
        if kind not in ("transaction", "batch"):
            raise bad_request("Bundle.type must be 'transaction' or 'batch'", "Bundle.type")
        self.engine.repository.validate(_skeleton(bundle), "Bundle")
        entries = [self._entry(i, e, kind) for i, e in enumerate(bundle.get("entry", []))]
        # Each entry records itself; a transaction that fails is recorded as a whole.
        with self.engine.auditor.action(ctx, kind, "", conn) as seen:
            seen.recorded = True
            if kind == "transaction":
                with self.engine.repository.transaction(conn) as tx:
                    self._transaction(ctx, entries, tx, base)
            else:
                for entry in sorted(entries, key=lambda e: ORDER.get(e.method, 9)):
                    self._batch_entry(ctx, entry, base, conn)
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": f"{kind}-response",
            "entry": [e.response for e in entries],
        }

    def _entry(self, index: int, raw: Any, kind: str) -> Entry:
        where = f"Bundle.entry[{index}]"
        request = raw.get("request") if isinstance(raw, dict) else None
        if not isinstance(request, dict) or "method" not in request or "url" not in request:
            raise bad_request(
                f"{where}: a {kind} entry needs request.method and request.url", where
            )
        method = request["method"]
        if method not in ORDER:
            raise bad_request(
                f"{where}: method {method} is not supported", f"{where}.request.method"
            )
        return Entry(
            index=index,
            method=method,
            url=request["url"],
            resource=raw.get("resource"),
            full_url=raw.get("fullUrl"),
            if_none_exist=request.get("ifNoneExist"),
            if_match=_parse_if_match(request.get("ifMatch")),
        )

    # -- transaction ----------------------------------------------------------------------
    def _transaction(
        self, ctx: AccessContext, entries: list[Entry], conn: Connection, base: str
    ) -> None:
        ordered = sorted(entries, key=lambda e: ORDER[e.method])
        targets = Counter(
            f"{e.rtype}/{e.path.split('/')[1]}"
            for e in entries
            if e.method in ("PUT", "PATCH", "DELETE") and "/" in e.path
        )
        duplicates = sorted(t for t, n in targets.items() if n > 1)
        if duplicates:
            raise bad_request(f"The transaction changes {duplicates[0]} more than once")
        for entry in ordered:
            if entry.method == "DELETE":
                with _about(entry):
                    self._run(ctx, entry, conn, base)
        mapping = self._identities(ctx, entries, conn)
        for entry in entries:
            if entry.resource is not None:
                with _about(entry):
                    entry.resource = self._rewrite(ctx, entry.resource, mapping, conn)
        self._create_all(ctx, [e for e in ordered if e.method == "POST" and not e.response], conn)
        for entry in ordered:
            if entry.method not in ("DELETE", "POST"):
                with _about(entry):
                    self._run(ctx, entry, conn, base)

    def _create_all(self, ctx: AccessContext, posts: list[Entry], conn: Connection) -> None:
        """The plain creates of a transaction, written together (their ids are already set)."""
        for entry in posts:
            if "/" in entry.path:
                raise bad_request(f"POST url must be a resource type, not '{entry.url}'").within(
                    f"Bundle.entry[{entry.index}]"
                )
        try:
            results = self.engine.repository.create_many(
                ctx, [(e.rtype, e.resource, e.target_id) for e in posts], conn
            )
        except FhirError as error:
            if error.index is not None:
                error.within(f"Bundle.entry[{posts[error.index].index}]")
            raise
        for entry, result in zip(posts, results, strict=True):
            self._written(entry, result.stored, 201)

    def _identities(
        self, ctx: AccessContext, entries: list[Entry], conn: Connection
    ) -> dict[str, str]:
        """fullUrl → `Type/id` for every entry whose identity is known before it runs."""
        mapping: dict[str, str] = {}
        for entry in entries:
            if entry.method == "POST":
                if entry.if_none_exist:
                    hits = self.engine.find(ctx, conn, entry.rtype, entry.if_none_exist)
                    if len(hits) > 1:
                        raise precondition_failed(
                            f"Bundle.entry[{entry.index}]: ifNoneExist matches several resources"
                        )
                    entry.target_id = hits[0].id if hits else str(uuid.uuid4())
                    if hits:
                        entry.response = {
                            "response": {
                                "status": _status(200),
                                "location": f"{entry.rtype}/{hits[0].id}",
                            }
                        }
                else:
                    entry.target_id = str(uuid.uuid4())
            elif entry.method == "PUT" and entry.query:
                hits = self.engine.find(ctx, conn, entry.rtype, entry.query)
                if len(hits) > 1:
                    raise precondition_failed(
                        f"Bundle.entry[{entry.index}]: criteria match more than one resource"
                    )
                entry.target_id = (
                    hits[0].id
                    if hits
                    else (
                        entry.resource.get("id")
                        if isinstance(entry.resource, dict) and entry.resource.get("id")
                        else str(uuid.uuid4())
                    )
                )
            elif entry.method == "PUT":
                entry.target_id = entry.path.split("/")[1] if "/" in entry.path else None
            if entry.full_url and entry.target_id:
                mapping[entry.full_url] = f"{entry.rtype}/{entry.target_id}"
        return mapping

    def _rewrite(
        self, ctx: AccessContext, value: Any, mapping: dict[str, str], conn: Connection
    ) -> Any:
        """The resource with its references resolved: full URLs of the Bundle's entries and
        conditional references become `Type/id`, also inside the narrative. Done on the JSON
        text, which is several times faster than walking large resources in Python."""
        text = jsonio.dumps(value).decode()

        def reference(match: re.Match[str]) -> str:
            raw = match.group(1)
            old = json.loads(f'"{raw}"') if "\\" in raw else raw
            new = self._reference(ctx, old, mapping, conn)
            return match.group(0) if new == old else '"reference":' + json.dumps(new)

        new = _REFERENCE_JSON.sub(reference, text)
        if "urn:uuid:" in new:
            new = _URN_UUID.sub(lambda m: mapping.get(m.group(0), m.group(0)), new)
        return value if new == text else jsonio.loads(new)

    def _reference(
        self, ctx: AccessContext, reference: str, mapping: dict[str, str], conn: Connection
    ) -> str:
        if reference in mapping:
            return mapping[reference]
        if _CONDITIONAL_REF.match(reference):
            rtype, _, criteria = reference.partition("?")
            hits = self.engine.find(ctx, conn, rtype, criteria)
            if len(hits) != 1:
                found = "no" if not hits else "more than one"
                raise precondition_failed(
                    f"The conditional reference {reference} matches {found} resource"
                )
            mapping[reference] = f"{rtype}/{hits[0].id}"
            return mapping[reference]
        return reference

    # -- one entry ------------------------------------------------------------------------
    def _batch_entry(
        self, ctx: AccessContext, entry: Entry, base: str, outer: Connection | None
    ) -> None:
        try:
            with self._own_transaction(outer) as conn:
                if entry.resource is not None:
                    entry.resource = self._rewrite(ctx, entry.resource, {}, conn)
                self._run(ctx, entry, conn, base)
        except FhirError as error:
            entry.response = {"response": {"status": str(error.status), "outcome": error.outcome()}}

    @contextmanager
    def _own_transaction(self, outer: Connection | None) -> Iterator[Connection]:
        if outer is None:
            with self.engine.db.write() as conn:
                yield conn
        else:
            with outer.begin_nested():
                yield outer

    def _written(self, entry: Entry, stored: Stored, status: int) -> None:
        entry.response = {
            "fullUrl": f"{stored.type}/{stored.id}",
            "response": {
                "status": _status(status),
                "location": f"{stored.type}/{stored.id}/_history/{stored.version}",
                "etag": stored.etag,
                "lastModified": stored.last_updated_instant,
            },
        }

    def _run(self, ctx: AccessContext, entry: Entry, conn: Connection, base: str) -> None:
        engine, parts = self.engine, entry.path.split("/")
        rtype = parts[0]
        if entry.method == "POST":
            if entry.response:  # ifNoneExist already matched
                return
            if len(parts) != 1:
                raise bad_request(f"POST url must be a resource type, not '{entry.url}'")
            if entry.target_id is None and entry.if_none_exist:
                created = engine.create(ctx, rtype, entry.resource, entry.if_none_exist, conn)
                self._written(entry, created.write.stored, created.status)
                return
            engine.repository.check_type(rtype)
            result = engine.repository.create(ctx, entry.resource, rtype, conn, rid=entry.target_id)
            self._written(entry, result.stored, 201)
        elif entry.method == "PUT":
            if entry.query:
                if entry.target_id and isinstance(entry.resource, dict):
                    entry.resource["id"] = entry.target_id
                    result = engine.update(
                        ctx, rtype, entry.target_id, entry.resource, entry.if_match, conn
                    )
                else:
                    result = engine.conditional_update(
                        ctx, rtype, entry.query, entry.resource, entry.if_match, conn
                    )
            elif len(parts) == 2:
                result = engine.update(ctx, rtype, parts[1], entry.resource, entry.if_match, conn)
            else:
                raise bad_request(f"PUT url must be Type/id or Type?criteria, not '{entry.url}'")
            self._written(entry, result.stored, 201 if result.created else 200)
        elif entry.method == "PATCH":
            if len(parts) != 2:
                raise bad_request(f"PATCH url must be Type/id, not '{entry.url}'")
            content_type, patch = self._patch_body(entry.resource)
            result = engine.patch(ctx, rtype, parts[1], content_type, patch, entry.if_match, conn)
            self._written(entry, result.stored, 200)
        elif entry.method == "DELETE":
            if entry.query:
                engine.conditional_delete(ctx, rtype, entry.query, conn)
            elif len(parts) == 2:
                engine.delete(ctx, rtype, parts[1], conn)
            else:
                raise bad_request(f"DELETE url must be Type/id or Type?criteria, not '{entry.url}'")
            entry.response = {"response": {"status": _status(204)}}
        else:
            self._read(ctx, entry, conn, base)

    @staticmethod
    def _patch_body(resource: Any) -> tuple[str, Any]:
        if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
            try:
                data = jsonio.loads(base64.b64decode(resource.get("data", "")))
            except (ValueError, orjson.JSONDecodeError):
                raise bad_request("The Binary of a PATCH entry must hold a JSON Patch") from None
            return JSON_PATCH, data
        return "application/fhir+json", resource

    def _read(self, ctx: AccessContext, entry: Entry, conn: Connection, base: str) -> None:
        engine, parts = self.engine, entry.path.split("/")
        if len(parts) == 1:
            search = engine.parse_search(parts[0], query_pairs(entry.query))
            result = engine.search(ctx, search, base, conn)
            body = searchset(
                engine.definitions, result, base, f"{base}/{parts[0]}", search.canonical()
            )
            entry.response = {"resource": jsonio.loads(body), "response": {"status": _status(200)}}
            return
        if len(parts) == 2:
            stored = engine.read(ctx, parts[0], parts[1], conn)
        elif len(parts) == 4 and parts[2] == "_history":
            stored = engine.vread(ctx, parts[0], parts[1], parts[3], conn)
        else:
            raise bad_request(f"GET url '{entry.url}' is not supported in a Bundle")
        assert stored.body is not None
        entry.response = {
            "fullUrl": f"{base}/{stored.type}/{stored.id}",
            "resource": jsonio.loads(stored.body),
            "response": {
                "status": _status(200),
                "etag": stored.etag,
                "lastModified": stored.last_updated_instant,
            },
        }
