"""HTTP details of the FHIR API: content negotiation, Prefer, If-Match, bodies and responses."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request, Response

from cityhealth.fhir import jsonio
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.clock import http_date
from cityhealth.fhir.errors import FhirError, OutcomeIssue, bad_request, operation_outcome
from cityhealth.fhir.store import Stored

FHIR_JSON = "application/fhir+json"
JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
_FORMAT_ALIASES = JSON_TYPES | {"json"}
_ANY = frozenset({"*/*", "application/*"})


def media_types(header: str) -> list[str]:
    return [part.split(";")[0].strip().lower() for part in header.split(",") if part.strip()]


def negotiate(request: Request) -> None:
    """Only JSON is served: `_format` or `Accept` asking for anything else → 406."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _FORMAT_ALIASES:
            raise FhirError(406, "not-supported", f"_format '{fmt}' is not supported; use json")
        return
    accept = request.headers.get("accept")
    if not accept:
        return
    types = media_types(accept)
    if not any(t in JSON_TYPES or t in _ANY for t in types):
        raise FhirError(
            406, "not-supported", f"Cannot answer with {accept}; this server speaks {FHIR_JSON}"
        )


async def json_body(request: Request, allow: frozenset[str] = JSON_TYPES) -> Any:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media and media not in allow:
        raise FhirError(415, "not-supported", f"Content-Type '{media}' is not supported")
    raw = await request.body()
    if not raw.strip():
        raise bad_request("The request has no body")
    try:
        return jsonio.loads(raw)
    except orjson.JSONDecodeError as error:
        raise bad_request(f"The body is not valid JSON: {error}", code="structure") from None


def if_match(request: Request) -> int | None:
    value = request.headers.get("if-match")
    if value is None:
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise bad_request(f"If-Match '{value}' is not a version ETag such as W/\"3\"")
    return int(tag)


def prefer(request: Request, key: str) -> str | None:
    for part in request.headers.get("prefer", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == key:
            return value.strip().strip('"').lower()
    return None


def fhir_response(
    body: bytes | None, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        content=body or b"",
        status_code=status,
        headers=headers,
        media_type=f"{FHIR_JSON}; charset=utf-8" if body else None,
    )


def outcome_response(error: FhirError) -> Response:
    return fhir_response(orjson.dumps(error.outcome()), error.status, error.headers or None)


def version_headers(base: str, stored: Stored) -> dict[str, str]:
    return {
        "ETag": stored.etag,
        "Last-Modified": http_date(stored.last_updated),
        "Location": f"{base}/{stored.type}/{stored.id}/_history/{stored.version}",
    }


def resource_response(stored: Stored) -> Response:
    """A read or vread: the stored bytes with their version headers."""
    assert stored.body is not None
    return fhir_response(
        stored.body.encode(),
        200,
        {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)},
    )


def write_response(request: Request, base: str, stored: Stored, status: int) -> Response:
    """Answer a create/update/patch as the client's Prefer header asks."""
    headers = version_headers(base, stored)
    wanted = prefer(request, "return") or "representation"
    if wanted == "minimal":
        return fhir_response(None, status, headers)
    if wanted == "operationoutcome":
        outcome = operation_outcome(
            [
                OutcomeIssue(
                    "information",
                    "informational",
                    f"{stored.type}/{stored.id} saved as version {stored.version}",
                )
            ]
        )
        return fhir_response(orjson.dumps(outcome), status, headers)
    assert stored.body is not None
    return fhir_response(stored.body.encode(), status, headers)


def base_url(request: Request, configured: str | None) -> str:
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


def caller(request: Request) -> AccessContext:
    """Who the request acts for, as the bearer guard (cityhealth.security.guard) found it."""
    ctx = getattr(request.state, "access", None)
    if not isinstance(ctx, AccessContext):  # never reached behind the guard; fail closed
        raise FhirError(401, "login", "Sign in first: send an access token (Bearer)")
    return ctx
