"""FHIR date, dateTime and instant values as half-open ranges of epoch microseconds.

A FHIR date carries its own precision: "2013" is the whole year, "2013-01-14T10:00" one
minute. Search compares such ranges, so both the index and the search parser turn every
value into ``[low, high)`` microseconds since 1970-01-01T00:00:00Z. The arithmetic is done on
integers (no ``datetime``) so that year 9999 and offsets at the edges of the calendar work and
the hot write path stays cheap.
"""

from __future__ import annotations

import re
from functools import lru_cache

_US_PER_SECOND = 1_000_000
_US_PER_MINUTE = 60 * _US_PER_SECOND
_US_PER_DAY = 86_400 * _US_PER_SECOND

# Search syntax also allows minutes without seconds and values without a timezone.
_DATE_TIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


MIN_US = _days_from_civil(1, 1, 1) * _US_PER_DAY
MAX_US = _days_from_civil(10_000, 1, 1) * _US_PER_DAY - 1


@lru_cache(maxsize=65_536)
def date_range(value: str) -> tuple[int, int]:
    """[low, high) in microseconds since the epoch (UTC) of a FHIR date, dateTime or instant.

    The precision is the one written: a year, a month, a day, a minute, a second or a
    fraction of a second (by its number of digits). Timezone offsets are honoured; a value
    without one is read as UTC. Raises ValueError on anything that is not a valid value.
    """
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        raise ValueError(f"not a FHIR date or dateTime: {value!r}")
    year_s, month_s, day_s, hour_s, minute_s, second_s, fraction, zone = match.groups()
    year = int(year_s)
    if year == 0:
        raise ValueError(f"year 0000 does not exist: {value!r}")
    if month_s is None:
        return _days_from_civil(year, 1, 1) * _US_PER_DAY, _days_from_civil(
            year + 1, 1, 1
        ) * _US_PER_DAY
    month = int(month_s)
    if not 1 <= month <= 12:
        raise ValueError(f"invalid month in {value!r}")
    if day_s is None:
        next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
        return _days_from_civil(year, month, 1) * _US_PER_DAY, _days_from_civil(
            next_year, next_month, 1
        ) * _US_PER_DAY
    day = int(day_s)
    last_day = 29 if month == 2 and _is_leap(year) else _DAYS_IN_MONTH[month - 1]
    if not 1 <= day <= last_day:
        raise ValueError(f"invalid day in {value!r}")
    start_of_day = _days_from_civil(year, month, day) * _US_PER_DAY
    if hour_s is None:
        return start_of_day, start_of_day + _US_PER_DAY
    hour, minute = int(hour_s), int(minute_s)
    if hour > 23 or minute > 59:
        raise ValueError(f"invalid time in {value!r}")
    low = start_of_day + (hour * 60 + minute) * _US_PER_MINUTE - _offset_us(zone, value)
    if second_s is None:
        return low, low + _US_PER_MINUTE
    second = int(second_s)
    if second > 60:
        raise ValueError(f"invalid seconds in {value!r}")
    # FHIR admits a leap second (":60"); it is folded into the minute's last second so that
    # the value stays inside the minute it was written in.
    low += min(second, 59) * _US_PER_SECOND
    if fraction is None:
        return low, low + _US_PER_SECOND
    digits = len(fraction)
    if digits >= 6:
        return low + int(fraction[:6]), low + int(fraction[:6]) + 1
    return low + int(fraction) * 10 ** (6 - digits), low + (int(fraction) + 1) * 10 ** (6 - digits)


def _offset_us(zone: str | None, value: str) -> int:
    if zone is None or zone == "Z":
        return 0
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError(f"invalid timezone offset in {value!r}")
    offset = (hours * 60 + minutes) * _US_PER_MINUTE
    return -offset if zone[0] == "-" else offset
