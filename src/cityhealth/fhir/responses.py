"""Bundles returned by search, history and $everything.

Stored bodies are spliced into the Bundle as they are (bytes in, bytes out): only `_summary`
and `_elements` make the engine parse a resource again.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

import orjson

from cityhealth.fhir import jsonio
from cityhealth.fhir.clock import instant, now_us
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.history import HistoryPage
from cityhealth.fhir.search import Hit, SearchResult
from cityhealth.fhir.subsetting import subset


def _bundle(
    kind: str, total: int | None, links: list[tuple[str, str]], entries: list[bytes]
) -> bytes:
    head: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(now_us())},
        "type": kind,
    }
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": rel, "url": url} for rel, url in links]
    prefix = orjson.dumps(head)[:-1]
    return prefix + b',"entry":[' + b",".join(entries) + b"]}" if entries else prefix + b"}"


def _entry(full_url: str, body: bytes, extra: dict[str, Any]) -> bytes:
    tail = orjson.dumps(extra)[1:-1]
    return (
        b'{"fullUrl":'
        + orjson.dumps(full_url)
        + b',"resource":'
        + body
        + (b"," + tail if tail else b"")
        + b"}"
    )


def link(url: str, params: list[tuple[str, str]]) -> str:
    return f"{url}?{urlencode(params)}" if params else url


def searchset(
    definitions: Definitions,
    result: SearchResult,
    base: str,
    self_url: str,
    params: list[tuple[str, str]],
    outcome: dict[str, Any] | None = None,
) -> bytes:
    request = result.request
    links = [("self", link(self_url, params))]
    if result.next_cursor:
        links.append(("next", link(self_url, [*params, ("_cursor", result.next_cursor)])))
    if result.previous_cursor:
        links.append(("previous", link(self_url, [*params, ("_cursor", result.previous_cursor)])))

    def body(hit: Hit) -> bytes:
        if request.summary in (None, "false") and not request.elements:
            return hit.body.encode()
        return jsonio.dumps(
            subset(definitions, jsonio.loads(hit.body), request.summary, request.elements)
        )

    entries = [
        _entry(f"{base}/{h.type}/{h.id}", body(h), {"search": {"mode": "match"}})
        for h in result.matches
    ]
    entries += [
        _entry(f"{base}/{h.type}/{h.id}", h.body.encode(), {"search": {"mode": "include"}})
        for h in result.included
    ]
    if outcome:
        entries.append(b'{"resource":' + orjson.dumps(outcome) + b',"search":{"mode":"outcome"}}')
    return _bundle("searchset", result.total, links, entries)


def history_bundle(
    page: HistoryPage, base: str, self_url: str, params: list[tuple[str, str]]
) -> bytes:
    links = [("self", link(self_url, params))]
    if page.next_cursor:
        links.append(("next", link(self_url, [*params, ("_cursor", page.next_cursor)])))
    entries = []
    for s in page.entries:
        url = f"{base}/{s.type}/{s.id}"
        request_url = f"{s.type}/{s.id}" if s.method != "POST" else s.type
        extra = {
            "request": {"method": s.method if s.method != "PATCH" else "PATCH", "url": request_url},
            "response": {
                "status": "201 Created"
                if s.method == "POST"
                else ("204 No Content" if s.deleted else "200 OK"),
                "etag": s.etag,
                "lastModified": s.last_updated_instant,
            },
        }
        if s.deleted or s.body is None:
            entries.append(b'{"fullUrl":' + orjson.dumps(url) + b"," + orjson.dumps(extra)[1:])
        else:
            entries.append(_entry(url, s.body.encode(), extra))
    return _bundle("history", page.total, links, entries)
