"""The implicit precision range of a FHIR number.

FHIR search compares numbers to the precision they were written with: 100 stands for
[99.5, 100.5), 100.0 for [99.95, 100.05). Stored values arrive as Python numbers (JSON parsed
by orjson); their shortest ``repr`` is the best remaining evidence of how they were written.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation


def number_range(value: int | float | str) -> tuple[float, float, float]:
    """(value, low, high): the number and the half-open range its last written digit implies.

    Integers are exact to the unit (±0.5); decimals to half a unit of their last decimal place;
    exponent forms (``1.5e-07``) to half a unit of their last significant digit. Raises
    ValueError on text that is not a finite number.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value), value - 0.5, value + 0.5
    text = repr(value) if isinstance(value, float) else str(value).strip()
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite decimals always have an integer exponent
    half = Decimal(5).scaleb(exponent - 1)
    return float(number), float(number - half), float(number + half)
