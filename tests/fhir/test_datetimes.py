"""FHIR dates as [low, high) microsecond ranges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cityhealth.fhir.datetimes import MAX_US, MIN_US, date_range

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def us(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def test_bounds_are_year_1_and_the_last_microsecond_of_9999() -> None:
    assert us(datetime(1, 1, 1, tzinfo=UTC)) == MIN_US
    assert us(datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == MAX_US


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2013", datetime(2013, 1, 1), datetime(2014, 1, 1)),
        ("2013-12", datetime(2013, 12, 1), datetime(2014, 1, 1)),
        ("2012-02", datetime(2012, 2, 1), datetime(2012, 3, 1)),
        ("2013-01-14", datetime(2013, 1, 14), datetime(2013, 1, 15)),
        ("2012-02-29", datetime(2012, 2, 29), datetime(2012, 3, 1)),
        ("2013-01-14T10:00", datetime(2013, 1, 14, 10), datetime(2013, 1, 14, 10, 1)),
        ("2013-01-14T10:00:05Z", datetime(2013, 1, 14, 10, 0, 5), datetime(2013, 1, 14, 10, 0, 6)),
        (
            "2013-01-14T10:00:05.123Z",
            datetime(2013, 1, 14, 10, 0, 5, 123_000),
            datetime(2013, 1, 14, 10, 0, 5, 124_000),
        ),
        (
            "2013-01-14T10:00:05.1Z",
            datetime(2013, 1, 14, 10, 0, 5, 100_000),
            datetime(2013, 1, 14, 10, 0, 5, 200_000),
        ),
        (
            "2013-01-14T10:00:05.123456789Z",
            datetime(2013, 1, 14, 10, 0, 5, 123_456),
            datetime(2013, 1, 14, 10, 0, 5, 123_457),
        ),
        ("9999", datetime(9999, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999_999)),
        ("0001-01-01", datetime(1, 1, 1), datetime(1, 1, 2)),
    ],
)
def test_precision_follows_the_digits_written(value: str, low: datetime, high: datetime) -> None:
    found_low, found_high = date_range(value)
    assert found_low == us(low.replace(tzinfo=UTC))
    # The end of year 9999 lies past what datetime can hold: compare to the last microsecond.
    expected_high = us(high.replace(tzinfo=UTC)) + (1 if value == "9999" else 0)
    assert found_high == expected_high


def test_timezone_offsets_are_honoured() -> None:
    shanghai = date_range("2013-01-14T10:00:00+08:00")
    assert shanghai == date_range("2013-01-14T02:00:00Z")
    assert date_range("2013-01-14T10:00:00-05:30")[0] == us(
        datetime(2013, 1, 14, 15, 30, tzinfo=UTC)
    )
    assert date_range("2013-01-14T10:00:00+00:00") == date_range("2013-01-14T10:00:00Z")


def test_no_timezone_means_utc() -> None:
    assert date_range("2013-01-14T10:00:00") == date_range("2013-01-14T10:00:00Z")
    assert date_range("2013-01-14T10:00") == date_range("2013-01-14T10:00Z")


def test_leap_second_stays_in_its_minute() -> None:
    low, high = date_range("2016-12-31T23:59:60Z")
    assert date_range("2016-12-31T23:59Z")[0] <= low < high <= date_range("2016-12-31T23:59Z")[1]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "13",
        "2013-13",
        "2013-00",
        "2013-02-29",
        "2012-02-30",
        "2013-04-31",
        "2013-01-00",
        "0000",
        "2013-1-14",
        "2013-01-14T24:00:00Z",
        "2013-01-14T10:60Z",
        "2013-01-14T10",
        "2013-01-14T10:00:61Z",
        "2013-01-14T10:00:00+15:00",
        "2013-01-14T10:00:00+08",
        "2013-01-14+08:00",
        "2013-01-14 10:00:00",
        "2013-01-14T10:00:00.Z",
        "20130114",
        "٢٠١٣",
        "10:00:00",
    ],
)
def test_invalid_values_raise(value: str) -> None:
    with pytest.raises(ValueError):
        date_range(value)


_OFFSETS = st.one_of(
    st.just(""),
    st.just("Z"),
    st.builds(
        lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
        st.sampled_from("+-"),
        st.integers(0, 14),
        st.sampled_from([0, 30, 45]),
    ),
)


def _forms(moment: datetime, digits: int, offset: str) -> list[str]:
    """The value written at each precision, coarsest first."""
    fraction = f"{moment.microsecond:06d}{moment.microsecond % 997:03d}"[:digits]
    date = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
    return [
        date[:4],
        date[:7],
        date,
        f"{date}T{moment.hour:02d}:{moment.minute:02d}{offset}",
        f"{date}T{moment:%H:%M:%S}{offset}",
        f"{date}T{moment:%H:%M:%S}.{fraction}{offset}",
    ]


@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    digits=st.integers(1, 9),
    offset=_OFFSETS,
)
def test_finer_values_lie_inside_their_truncations(
    moment: datetime, digits: int, offset: str
) -> None:
    forms = _forms(moment, digits, offset)
    ranges = [date_range(form) for form in forms]
    for low, high in ranges:
        assert low < high
    # Dates carry no timezone (UTC), so only UTC times nest inside them; times always nest.
    first_nesting = 0 if offset in ("", "Z") else 3
    for outer, inner in zip(ranges[first_nesting:], ranges[first_nesting + 1 :], strict=False):
        assert outer[0] <= inner[0] < inner[1] <= outer[1]


@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    minutes=st.integers(-14 * 60, 14 * 60),
)
def test_seconds_match_the_standard_library(moment: datetime, minutes: int) -> None:
    zone = timezone(timedelta(minutes=minutes))
    aware = moment.replace(microsecond=0, tzinfo=zone)
    sign = "-" if minutes < 0 else "+"
    date = f"{aware.year:04d}-{aware.month:02d}-{aware.day:02d}"
    text = f"{date}T{aware:%H:%M:%S}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    assert date_range(text) == (us(aware), us(aware) + 1_000_000)
