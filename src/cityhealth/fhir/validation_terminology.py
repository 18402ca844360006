"""Expansion of the value sets that required bindings point to, from the loaded definitions.

Only what the definitions hold is expanded: a value set that includes a code system that is
not loaded (or only partly: `content` other than `complete`), an unknown value set or a filter
that is not understood yields `None`, and the validator then skips the check rather than
rejecting codes it cannot judge.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from cityhealth.fhir.definitions import Definitions

#: A value set's content: the (system, code) pairs it contains.
Expansion = frozenset[tuple[str, str]]


class _CannotExpand(Exception):
    """The value set depends on content the definitions do not hold."""


def _walk(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for concept in concepts:
        yield concept
        yield from _walk(concept.get("concept", ()))


def _descendants(concepts: list[dict[str, Any]], code: str) -> set[str] | None:
    """The codes below `code` in the concept hierarchy (None: `code` is not in it)."""
    for concept in _walk(concepts):
        if concept["code"] == code:
            return {c["code"] for c in _walk(concept.get("concept", ()))}
    return None


class ValueSetExpander:
    """Expands value sets by canonical URL and remembers the results."""

    def __init__(self, definitions: Definitions) -> None:
        self._defs = definitions
        self._cache: dict[str, Expansion | None] = {}

    def expand(self, url: str) -> Expansion | None:
        """All (system, code) pairs of the value set, or None when it cannot be expanded."""
        url = url.split("|", 1)[0]
        if url not in self._cache:
            self._cache[url] = None  # guards against value sets that import themselves
            with suppress(_CannotExpand):
                self._cache[url] = self._expand(url)
        return self._cache[url]

    def _expand(self, url: str) -> Expansion:
        value_set = self._defs.value_sets.get(url)
        if value_set is None or "compose" not in value_set:
            raise _CannotExpand(url)
        compose = value_set["compose"]
        codes: set[tuple[str, str]] = set()
        for include in compose.get("include", ()):
            codes |= self._include(include)
        for exclude in compose.get("exclude", ()):
            codes -= self._include(exclude)
        return frozenset(codes)

    def _include(self, include: dict[str, Any]) -> set[tuple[str, str]]:
        selected: set[tuple[str, str]] | None = None
        system = include.get("system")
        if system is not None:
            selected = self._from_system(system, include)
        for imported in include.get("valueSet", ()):
            expansion = self.expand(imported)
            if expansion is None:
                raise _CannotExpand(imported)
            # A system and imported value sets together select their intersection.
            selected = set(expansion) if selected is None else selected & expansion
        return selected or set()

    def _from_system(self, system: str, include: dict[str, Any]) -> set[tuple[str, str]]:
        if "concept" in include:
            # An explicit list stands on its own, even for a code system that is not loaded.
            return {(system, c["code"]) for c in include["concept"]}
        code_system = self._defs.code_systems.get(system)
        if code_system is None or code_system.get("content") != "complete":
            raise _CannotExpand(system)
        concepts = code_system.get("concept", [])
        codes = {c["code"] for c in _walk(concepts)}
        for flt in include.get("filter", ()):
            codes &= self._filter(concepts, flt)
        return {(system, code) for code in codes}

    @staticmethod
    def _filter(concepts: list[dict[str, Any]], flt: dict[str, Any]) -> set[str]:
        prop, op, value = flt.get("property"), flt.get("op"), flt.get("value", "")
        if prop != "concept":
            raise _CannotExpand(f"filter on property {prop}")
        below = _descendants(concepts, value)
        if below is None:
            return {c["code"] for c in _walk(concepts)} if op == "is-not-a" else set()
        if op == "is-a":
            return below | {value}
        if op == "descendent-of":
            return below
        if op == "is-not-a":
            return {c["code"] for c in _walk(concepts)} - below - {value}
        if op == "=":
            return {value}
        raise _CannotExpand(f"filter op {op}")
