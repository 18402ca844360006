"""The FHIR REST API under /fhir (http.html): routes map HTTP onto the engine's interactions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from cityhealth.fhir import jsonio
from cityhealth.fhir.bundles import BundleProcessor
from cityhealth.fhir.capability import capability_statement
from cityhealth.fhir.clock import instant
from cityhealth.fhir.engine import JSON_PATCH, FhirEngine
from cityhealth.fhir.errors import FhirError, OutcomeIssue, bad_request, operation_outcome
from cityhealth.fhir.http import (
    JSON_TYPES,
    base_url,
    caller,
    fhir_response,
    if_match,
    json_body,
    negotiate,
    prefer,
    resource_response,
    write_response,
)
from cityhealth.fhir.responses import history_bundle, searchset

T = TypeVar("T")


def build_router(engine: FhirEngine) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["FHIR R4"])
    bundles = BundleProcessor(engine)
    settings = engine.settings

    async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    def base(request: Request) -> str:
        return base_url(request, settings.fhir_base_url)

    def query(request: Request) -> list[tuple[str, str]]:
        return [(k, v) for k, v in request.query_params.multi_items()]

    async def form_query(request: Request) -> list[tuple[str, str]]:
        """The URL's parameters plus those of a form-encoded body (POST _search)."""
        form = await request.form() if _is_form(request) else None
        if form is None and (await request.body()).strip():
            raise FhirError(
                415, "not-supported", "POST _search takes application/x-www-form-urlencoded"
            )
        return query(request) + ([(k, str(v)) for k, v in form.multi_items()] if form else [])

    async def search_response(
        request: Request, rtype: str, params: list[tuple[str, str]]
    ) -> Response:
        lenient = prefer(request, "handling") == "lenient"
        ctx, url = caller(request), base(request)

        def parse_and_search() -> tuple[Any, Any]:  # one thread hand-off per request
            if rtype:
                search = engine.parse_search(rtype, params, lenient)
            else:
                search = engine.parse_system_search(params, lenient)
            return search, engine.search(ctx, search, url)

        search, result = await run(parse_and_search)
        outcome = None
        if search.ignored:
            outcome = operation_outcome(
                [
                    OutcomeIssue("warning", "not-supported", f"Parameter '{n}' was ignored")
                    for n in search.ignored
                ]
            )
        body = searchset(
            engine.definitions,
            result,
            base(request),
            f"{base(request)}/{rtype}".rstrip("/"),
            search.canonical(),
            outcome,
        )
        return fhir_response(body)

    @router.get("/metadata", summary="CapabilityStatement")
    async def metadata(request: Request) -> Response:
        negotiate(request)
        statement = capability_statement(engine.definitions, base(request), settings.public_url)
        return fhir_response(orjson.dumps(statement))

    @router.api_route(
        "/metadata", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def metadata_other() -> Response:
        raise FhirError(405, "not-supported", "The CapabilityStatement is read with GET")

    @router.get("", summary="Search across resource types")
    async def system_search(request: Request) -> Response:
        negotiate(request)
        return await search_response(request, "", query(request))

    @router.post("/_search", summary="Search across resource types by POST")
    async def system_search_post(request: Request) -> Response:
        negotiate(request)
        return await search_response(request, "", await form_query(request))

    @router.post("", summary="Transaction or batch Bundle")
    async def bundle(request: Request) -> Response:
        negotiate(request)
        body = await json_body(request)
        result = await run(bundles.process, caller(request), body, base(request))
        return fhir_response(jsonio.dumps(result))

    @router.get("/_history", summary="System history")
    async def system_history(request: Request) -> Response:
        negotiate(request)
        params = query(request)
        page = await run(engine.history, caller(request), params)
        return fhir_response(
            history_bundle(page, base(request), f"{base(request)}/_history", _plain(params))
        )

    @router.get("/{rtype}", summary="Search")
    async def search_get(request: Request, rtype: str) -> Response:
        negotiate(request)
        return await search_response(request, rtype, query(request))

    @router.post("/{rtype}/_search", summary="Search by POST")
    async def search_post(request: Request, rtype: str) -> Response:
        negotiate(request)
        return await search_response(request, rtype, await form_query(request))

    @router.post("/{rtype}", summary="Create")
    async def create(request: Request, rtype: str) -> Response:
        negotiate(request)
        body = await json_body(request)
        outcome = await run(
            engine.create, caller(request), rtype, body, request.headers.get("if-none-exist")
        )
        return write_response(request, base(request), outcome.write.stored, outcome.status)

    @router.put("/{rtype}", summary="Conditional update")
    async def conditional_update(request: Request, rtype: str) -> Response:
        negotiate(request)
        engine.repository.check_type(rtype)
        body = await json_body(request)
        result = await run(
            engine.conditional_update,
            caller(request),
            rtype,
            _criteria(request),
            body,
            if_match(request),
        )
        return write_response(request, base(request), result.stored, 201 if result.created else 200)

    @router.delete("/{rtype}", summary="Conditional delete")
    async def conditional_delete(request: Request, rtype: str) -> Response:
        negotiate(request)
        engine.repository.check_type(rtype)
        await run(engine.conditional_delete, caller(request), rtype, _criteria(request))
        return fhir_response(None, 204)

    @router.get("/{rtype}/_history", summary="Type history")
    async def type_history(request: Request, rtype: str) -> Response:
        negotiate(request)
        params = query(request)
        page = await run(engine.history, caller(request), params, rtype)
        url = f"{base(request)}/{rtype}/_history"
        return fhir_response(history_bundle(page, base(request), url, _plain(params)))

    @router.post("/{rtype}/$validate", summary="Validate without storing")
    async def validate(request: Request, rtype: str) -> Response:
        negotiate(request)
        body = await json_body(request)
        if isinstance(body, dict) and body.get("resourceType") == "Parameters":
            parts = body.get("parameter")
            found = [
                p.get("resource")
                for p in (parts if isinstance(parts, list) else [])
                if isinstance(p, dict) and p.get("name") == "resource"
            ]
            body = found[0] if found else body
        engine.repository.check_type(rtype)
        try:
            await run(engine.repository.validate, body, rtype)
        except FhirError as error:
            if error.status != 400:
                raise
            return fhir_response(orjson.dumps(error.outcome()), 200)
        ok = operation_outcome(
            [OutcomeIssue("information", "informational", "Validation successful")]
        )
        return fhir_response(orjson.dumps(ok))

    @router.get("/Patient/{rid}/$everything", summary="Patient $everything")
    async def everything(request: Request, rid: str) -> Response:
        negotiate(request)
        params = query(request)
        result = await run(engine.everything, caller(request), rid, params)
        url = f"{base(request)}/Patient/{rid}/$everything"
        return fhir_response(
            searchset(engine.definitions, result, base(request), url, _plain(params))
        )

    @router.post("/Patient/{rid}/$break-glass", summary="Declare an emergency access")
    async def break_glass(request: Request, rid: str) -> Response:
        """Body: Parameters with `reason` (valueString). Answers the declaration's AuditEvent
        reference and until when the patient's record is open to the caller."""
        negotiate(request)
        body = await json_body(request)
        reason = _parameter(body, "reason")
        stored = await run(engine.break_glass, caller(request), rid, reason)
        until = stored.last_updated + settings.break_glass_minutes * 60_000_000
        answer = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "auditEvent", "valueReference": {"reference": f"AuditEvent/{stored.id}"}},
                {"name": "expires", "valueInstant": instant(until)},
            ],
        }
        return fhir_response(orjson.dumps(answer), 201)

    @router.get("/{rtype}/{rid}", summary="Read")
    async def read(request: Request, rtype: str, rid: str) -> Response:
        negotiate(request)
        stored = await run(engine.read, caller(request), rtype, rid)
        return resource_response(stored)

    @router.put("/{rtype}/{rid}", summary="Update (or create with this id)")
    async def update(request: Request, rtype: str, rid: str) -> Response:
        negotiate(request)
        body = await json_body(request)
        result = await run(engine.update, caller(request), rtype, rid, body, if_match(request))
        return write_response(request, base(request), result.stored, 201 if result.created else 200)

    @router.patch("/{rtype}/{rid}", summary="Patch (JSON Patch or FHIR Patch)")
    async def patch(request: Request, rtype: str, rid: str) -> Response:
        negotiate(request)
        body = await json_body(request, JSON_TYPES | {JSON_PATCH})
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        result = await run(
            engine.patch, caller(request), rtype, rid, media, body, if_match(request)
        )
        return write_response(request, base(request), result.stored, 200)

    @router.delete("/{rtype}/{rid}", summary="Delete")
    async def delete(request: Request, rtype: str, rid: str) -> Response:
        negotiate(request)
        await run(engine.delete, caller(request), rtype, rid)
        return fhir_response(None, 204)

    @router.get("/{rtype}/{rid}/_history", summary="Instance history")
    async def instance_history(request: Request, rtype: str, rid: str) -> Response:
        negotiate(request)
        params = query(request)
        page = await run(engine.history, caller(request), params, rtype, rid)
        url = f"{base(request)}/{rtype}/{rid}/_history"
        return fhir_response(history_bundle(page, base(request), url, _plain(params)))

    @router.get("/{rtype}/{rid}/_history/{vid}", summary="Version read")
    async def vread(request: Request, rtype: str, rid: str, vid: str) -> Response:
        negotiate(request)
        stored = await run(engine.vread, caller(request), rtype, rid, vid)
        return resource_response(stored)

    return router


def _criteria(request: Request) -> str:
    criteria = request.url.query
    if not criteria:
        raise bad_request("A conditional update or delete needs search criteria in the URL")
    return criteria


def _plain(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in params if k != "_cursor"]


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")


def _parameter(body: Any, name: str) -> Any:
    """The value of the parameter `name` of a Parameters body (400 if the body is not one)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise bad_request("The body must be a Parameters resource")
    for parameter in body.get("parameter") or ():
        if isinstance(parameter, dict) and parameter.get("name") == name:
            return next((v for k, v in parameter.items() if k.startswith("value")), None)
    return None
