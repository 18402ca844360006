"""SMART on FHIR scopes in v1 (`patient/*.read`) and v2 (`patient/Observation.rs`) syntax.

A resource scope grants interactions (c create, r read, u update, d delete, s search) on one
resource type or all (`*`) in a context: `patient` (only the launch patient's compartment),
`user` (what the signed-in user may see) or `system` (a backend client acting for itself). v1
`read` means rs, `write` means cud and `*` means cruds. Granular v2 scopes with a query
(`patient/Observation.rs?category=...`) are refused rather than widened to the whole type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CONTEXTS = ("patient", "user", "system")
NON_RESOURCE_SCOPES = frozenset(
    {
        "openid",
        "profile",
        "fhirUser",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
    }
)
_LETTERS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": _LETTERS}
_RESOURCE_SCOPE = re.compile(
    r"(patient|user|system)/(\*|[A-Z][A-Za-z]*)\.(read|write|\*|c?r?u?d?s?)"
)

# What each interaction needs. vread and history read a resource's versions; $everything and
# $export both find (search) and return (read) resources, so they need both letters.
INTERACTIONS: dict[str, frozenset[str]] = {
    "create": frozenset("c"),
    "read": frozenset("r"),
    "vread": frozenset("r"),
    "history": frozenset("r"),
    "update": frozenset("u"),
    "patch": frozenset("u"),
    "delete": frozenset("d"),
    "search": frozenset("s"),
    "$everything": frozenset("rs"),
    "$export": frozenset("rs"),
}


@dataclass(frozen=True)
class Scope:
    context: str
    resource_type: str  # "*" for every type
    interactions: frozenset[str]

    def covers(self, resource_type: str) -> bool:
        return self.resource_type in ("*", resource_type)

    def __str__(self) -> str:
        letters = "".join(letter for letter in _LETTERS if letter in self.interactions)
        return f"{self.context}/{self.resource_type}.{letters}"


@dataclass(frozen=True)
class ParsedScopes:
    resource: tuple[Scope, ...]
    other: tuple[str, ...]


def parse_scope(text: str) -> Scope:
    """One resource scope; `ValueError` for anything else."""
    match = _RESOURCE_SCOPE.fullmatch(text)
    if match is None or not match[3]:
        if "?" in text:
            raise ValueError(f"granular scope not supported: {text!r}")
        raise ValueError(f"malformed resource scope: {text!r}")
    context, resource_type, access = match.groups()
    return Scope(context, resource_type, frozenset(_V1.get(access, access)))


def parse_scopes(scopes: str | Iterable[str]) -> ParsedScopes:
    """Split a space-separated scope string (or a list) into resource and other scopes.

    Raises `ValueError` naming every scope that is neither a resource scope nor a known one.
    """
    texts = scopes.split() if isinstance(scopes, str) else list(scopes)
    resource: list[Scope] = []
    other: list[str] = []
    refused: list[str] = []
    for text in texts:
        if text in NON_RESOURCE_SCOPES:
            other.append(text)
            continue
        try:
            resource.append(parse_scope(text))
        except ValueError:
            refused.append(text)
    if refused:
        raise ValueError(f"unknown or malformed scopes: {', '.join(refused)}")
    return ParsedScopes(tuple(resource), tuple(other))


def contexts_allowing(
    scopes: Iterable[Scope], resource_type: str, interaction: str
) -> frozenset[str]:
    """The contexts (patient, user, system) whose scopes together grant `interaction`.

    `interaction` is a key of INTERACTIONS: create, read, update, delete, search; vread and
    history count as read, patch as update, $everything and $export (bulk export) as read
    plus search. Letters combine within a context (`patient/*.r` and `patient/*.s` allow export),
    never across contexts, because each context limits the data differently.
    """
    try:
        needed = INTERACTIONS[interaction]
    except KeyError:
        raise ValueError(f"unknown interaction: {interaction!r}") from None
    granted: dict[str, set[str]] = {}
    for scope in scopes:
        if scope.covers(resource_type):
            granted.setdefault(scope.context, set()).update(scope.interactions)
    return frozenset(context for context, letters in granted.items() if needed <= letters)


def allows(scopes: Iterable[Scope], resource_type: str, interaction: str) -> bool:
    """True when some context grants `interaction` on `resource_type` (see contexts_allowing)."""
    return bool(contexts_allowing(scopes, resource_type, interaction))
