"""String search-index rows: folded text, the parts of names and addresses, and pinyin.

FHIR string search matches case- and accent-insensitively from the start of a value. Each
value is stored folded with its exact text (for `:exact`); Han text also gets its pinyin forms
(张三 → 'zhangsan', 'zs') without exact text, so a search typed on any keyboard finds it.
"""

from __future__ import annotations

from typing import Any

from cityhealth.fhir.chinese import fold, has_han, name_index_values, pinyin_forms
from cityhealth.fhir.index_values import (
    TEXT_PRIMITIVES,
    IndexRows,
    Target,
    Valuer,
    ValuerFactory,
)

#: Longest folded string stored (it is indexed by the database); the exact value is kept whole.
MAX_FOLDED = 256


def _add_text(code: str, text: str, rows: IndexRows, name_part: Any = None) -> None:
    """A plain text value: its folded form with the exact text, and pinyin for Han text."""
    folded = fold(text)[:MAX_FOLDED]
    if not folded:
        return  # whitespace only
    rows.string.append((code, folded, text))
    if has_han(text):
        for form in pinyin_forms(text, name_part=name_part):
            rows.string.append((code, form[:MAX_FOLDED], None))


def _string_text(t: Target) -> Valuer:
    code, name_part = t.code, t.name_part

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is str and node:
            _add_text(code, node, rows, name_part)

    return valuer


def _strings(node: dict[str, Any], key: str) -> list[str]:
    value = node.get(key)
    if type(value) is list:
        return [v for v in value if type(v) is str and v]
    return [value] if type(value) is str and value else []


_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")


def _string_human_name(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is not dict:
            return
        family = node.get("family")
        text = node.get("text")
        given = _strings(node, "given")
        seen = set()
        for key in _NAME_PARTS:
            for part in _strings(node, key):
                folded = fold(part)[:MAX_FOLDED]
                if folded:
                    seen.add(folded)
                    rows.string.append((code, folded, part))
        # Whole-name and pinyin forms; parts already stored with their exact text are skipped.
        for value in name_index_values(
            family if type(family) is str else None, given, text if type(text) is str else None
        ):
            folded = value[:MAX_FOLDED]
            if folded not in seen:
                seen.add(folded)
                rows.string.append((code, folded, None))

    return valuer


_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _string_address(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict:
            for key in _ADDRESS_PARTS:
                for part in _strings(node, key):
                    _add_text(code, part, rows)

    return valuer


STRING_FACTORIES: dict[str, ValuerFactory] = {
    "HumanName": _string_human_name,
    "Address": _string_address,
    **dict.fromkeys(TEXT_PRIMITIVES, _string_text),
}
