"""How a person or an organization is named on a page."""

from __future__ import annotations

from typing import Any

from cityhealth.fhir.chinese import has_han


def display_name(resource: dict[str, Any]) -> str:
    """An Organization's name, or a person's first HumanName (Chinese names without a space)."""
    name = resource.get("name")
    if isinstance(name, str):
        return name.strip()
    for human in name or ():
        if human.get("text"):
            return str(human["text"]).strip()
        family = human.get("family") or ""
        given = " ".join(human.get("given") or ())
        if has_han(family + given):
            return f"{family}{given.replace(' ', '')}"
        return " ".join(part for part in (given, family) if part)
    return ""
