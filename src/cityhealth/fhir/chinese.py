"""Text folding for the FHIR string search index, with pinyin for Chinese text.

FHIR string search is case- and accent-insensitive and matches values that start with the search
value. The index stores `fold()`ed values; for Han text it also stores the toneless pinyin and its
initials, so that 张三 is found by `zhang`, `zhangsan` and `zs` typed on any keyboard. In a name
the surname is read as a surname (曾 zeng, 单 shan, 尉迟 yuchi), elsewhere phrase-aware readings
apply (曾经 cengjing). Traditional and simplified characters are not folded into each other, but
their pinyin is the same, so 張三 is found by `zhangsan` too.
"""

import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Literal

from pypinyin import lazy_pinyin

from cityhealth.fhir.surnames import COMPOUND_SURNAMES, SURNAME_READINGS

NamePart = Literal["family", "full", "given"]

_NAME_PARTS: frozenset[str | None] = frozenset({"family", "full", "given", None})
_HAN_RANGES = "\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN_CHAR = re.compile(f"[{_HAN_RANGES}]")
_HAN_RUN = re.compile(f"[{_HAN_RANGES}]+")

_Reading = tuple[str, ...]
_HanReader = Callable[[str], list[str]]
_COMPOUND: dict[str, tuple[_Reading, ...]] = {
    name: tuple(tuple(reading.split()) for reading in readings)
    for name, readings in COMPOUND_SURNAMES.items()
}
_SINGLE: dict[str, tuple[_Reading, ...]] = {
    name: tuple((reading,) for reading in readings) for name, readings in SURNAME_READINGS.items()
}
# Distinct name parts seen by a busy server number in the tens of thousands; each entry is small.
_CACHE_SIZE = 1 << 16


def fold(text: str) -> str:
    """Normalised form for string search: NFKC (full-width → half-width, compatibility forms),
    casefold, accents removed ('Müller' → 'muller'), whitespace collapsed to single spaces,
    stripped."""
    if text.isascii():
        return " ".join(text.lower().split())
    compatible = unicodedata.normalize("NFKC", text).casefold()
    decomposed = unicodedata.normalize("NFD", compatible)
    unmarked = "".join(char for char in decomposed if not unicodedata.combining(char))
    return " ".join(unicodedata.normalize("NFC", unmarked).split())


def has_han(text: str) -> bool:
    """Whether the text contains at least one Han (Chinese) character."""
    return _HAN_CHAR.search(text) is not None


def pinyin_forms(text: str, *, name_part: NamePart | None = None) -> list[str]:
    """Extra folded index values for text containing Han characters, else an empty list.

    The values are the toneless pinyin joined without spaces (张三 → 'zhangsan') and its initials
    ('zs'); the initials are left out when they are a prefix of the pinyin (a single syllable), as
    a starts-with match on the pinyin already covers them. Non-Han characters are kept folded,
    without whitespace ('A座3号' → 'azuo3hao', 'az3h').

    name_part: 'family' reads the text as surname(s); 'full' reads it as a name written surname
    first (单田芳 → 'shantianfang'), the surname from the surname table and the rest phrase-aware;
    'given' and None use phrase-aware readings. A surname with two genuine readings (乐 yue/le)
    yields a pair of values for each.
    """
    if name_part not in _NAME_PARTS:
        raise ValueError(f"unknown name part {name_part!r}")
    folded = fold(text)
    if not has_han(folded):
        return []
    values: dict[str, None] = {}
    for full, initials in _pinyin_variants(folded, name_part):
        _add_pinyin(values, full, initials)
    return list(values)


def name_index_values(family: str | None, given: list[str], text: str | None) -> list[str]:
    """All folded string-index values for a HumanName, without duplicates, in a stable order.

    These are each part folded (family, each given, text); the whole name, in Chinese order
    without spaces when the family name is Chinese (张 + 三 → '张三') and as 'given family'
    otherwise; and the pinyin forms of each Han part and of the whole name, which reads the
    family part as a surname (曾 + 小明 → 'zengxiaoming', 'zxm').
    """
    family_folded = fold(family) if family else ""
    given_folded = [part for part in (fold(name) for name in given) if part]
    text_folded = fold(text) if text else ""
    chinese = has_han(family_folded) or (
        not family_folded and any(has_han(part) for part in given_folded)
    )
    if chinese:
        whole = family_folded + "".join(given_folded)
    else:
        whole = " ".join(part for part in (*given_folded, family_folded) if part)

    values: dict[str, None] = dict.fromkeys(
        part for part in (family_folded, *given_folded, text_folded, whole) if part
    )
    parts: list[tuple[str, NamePart]] = [
        (family_folded, "family"),
        *((part, "given") for part in given_folded),
        (text_folded, "full"),
    ]
    for part, name_part in parts:
        if has_han(part):
            for full, initials in _pinyin_variants(part, name_part):
                _add_pinyin(values, full, initials)
    if chinese:
        given_full, given_initials = "", ""
        for part in given_folded:
            full, initials = _pinyin_variants(part, "given")[0]
            given_full += full
            given_initials += initials
        family_variants = (
            _pinyin_variants(family_folded, "family") if family_folded else (("", ""),)
        )
        for full, initials in family_variants:
            _add_pinyin(values, full + given_full, initials + given_initials)
    return list(values)


def _add_pinyin(values: dict[str, None], full: str, initials: str) -> None:
    # Concatenating folded pieces can form a sequence that folds further (e.g. Hangul jamo
    # around a dropped space), so the joined value is folded once more.
    values.setdefault(fold(full))
    if not full.startswith(initials):
        values.setdefault(fold(initials))


@lru_cache(maxsize=_CACHE_SIZE)
def _pinyin_variants(folded: str, name_part: NamePart | None) -> tuple[tuple[str, str], ...]:
    """(pinyin, initials) of folded text, one pair per reading of its leading surname."""
    if name_part in ("family", "full") and _HAN_CHAR.match(folded):
        length, heads = _surname_at(folded, 0)
        rest = _pairs(folded[length:], _surname_syllables if name_part == "family" else lazy_pinyin)
    else:
        heads, rest = ((),), _pairs(folded, lazy_pinyin)
    variants = []
    for head in heads:
        pairs = [*_syllable_pairs(head), *rest]
        variants.append(("".join(p[0] for p in pairs), "".join(p[1] for p in pairs)))
    return tuple(variants)


def _pairs(text: str, read_han: _HanReader) -> list[tuple[str, str]]:
    """(pinyin, initial) per Han syllable and per run of other characters (kept whole)."""
    pairs: list[tuple[str, str]] = []
    position = 0
    for match in _HAN_RUN.finditer(text):
        pairs.extend(_literal_pairs(text[position : match.start()]))
        pairs.extend(_syllable_pairs(read_han(match.group())))
        position = match.end()
    pairs.extend(_literal_pairs(text[position:]))
    return pairs


def _literal_pairs(text: str) -> list[tuple[str, str]]:
    literal = "".join(text.split())
    return [(literal, literal)] if literal else []


def _syllable_pairs(syllables: Sequence[str]) -> list[tuple[str, str]]:
    # A Han character without a known reading comes back as itself and is kept whole.
    return [(syllable, syllable[0] if syllable.isascii() else syllable) for syllable in syllables]


def _surname_syllables(run: str) -> list[str]:
    """A run of Han characters read surname by surname (e.g. a family of two surnames 陈曾)."""
    syllables: list[str] = []
    position = 0
    while position < len(run):
        length, readings = _surname_at(run, position)
        syllables.extend(readings[0])
        position += length
    return syllables


def _surname_at(text: str, position: int) -> tuple[int, tuple[_Reading, ...]]:
    """Length and readings of the surname that starts at a Han character of the text."""
    if (compound := _COMPOUND.get(text[position : position + 2])) is not None:
        return 2, compound
    if (single := _SINGLE.get(text[position])) is not None:
        return 1, single
    return 1, (tuple(lazy_pinyin(text[position])),)
