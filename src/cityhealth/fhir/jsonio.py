"""JSON in and out of the engine, keeping the written precision of decimals.

R4 says a decimal's precision is part of its value (0.010 is not 0.01), so a number such as
5.40 or 1.0e2 must come back as written. orjson parses every number to a float, which would
lose that; the rare bodies holding such a number are parsed with the standard library instead,
into `DecimalText`: a float that remembers its source text and is written back verbatim.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# A number value (after `:`, `,` or `[`, before `,`, `]` or `}`) whose fraction ends in 0, with
# an exponent, or with more digits than a float keeps. Anchored on value positions so that
# timestamps and other strings ("…T10:20:30.120Z") do not send the body to the slow parser.
_IMPRECISE = re.compile(
    rb"[:,\[]\s*-?(?:\d+\.\d*0|\d+(?:\.\d+)?[eE][+-]?\d+|\d+\.\d{16,}|\d{17,})\s*[,\]}]"
)


class DecimalText(float):
    """A JSON decimal that keeps the text it was written with."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> DecimalText:
        number = float.__new__(cls, text)
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _default(value: Any) -> Any:
    if isinstance(value, DecimalText):
        return orjson.Fragment(value.text)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def loads(raw: bytes | str) -> Any:
    """Parse JSON; raises ValueError (orjson.JSONDecodeError) on anything that is not JSON."""
    data = raw.encode() if isinstance(raw, str) else raw
    if not _IMPRECISE.search(data):
        return orjson.loads(data)
    try:
        value = json.loads(data, parse_float=DecimalText, parse_constant=_reject_constant)
        dumps(value)  # lone surrogates and the like parse here but cannot be stored
    except (ValueError, TypeError, RecursionError) as error:
        raise orjson.JSONDecodeError(str(error), "", 0) from None
    return value


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default)
