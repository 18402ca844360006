"""Properties of the REST API over generated inputs: date prefixes on partial dates agree with
search.html's range semantics, paging sees every resource once while others are written, and a
transaction is all or nothing."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from helpers import (
    create,
    history_total,
    ids,
    link,
    observation,
    patient,
    relative,
    search,
    system,
    total,
    unique,
)
from hypothesis import given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=40, deadline=None)

# -- date prefixes ---------------------------------------------------------------------------

PRECISIONS = ("year", "month", "day", "second")
OFFSETS = (0, 60, -60, 330, 480, -300, 14 * 60, -12 * 60)
#: Every prefix whose meaning search.html fixes exactly; `ap` is left to the server.
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


@dataclass(frozen=True)
class FhirDate:
    """A date or dateTime as written at some precision, with its instant range [low, high)."""

    local: datetime  # wall-clock time at `offset`
    precision: str
    offset: int  # minutes east of UTC; used by the second precision only

    @property
    def text(self) -> str:
        if self.precision == "year":
            return f"{self.local.year:04d}"
        if self.precision == "month":
            return f"{self.local.year:04d}-{self.local.month:02d}"
        if self.precision == "day":
            return self.local.date().isoformat()
        zone = timezone(timedelta(minutes=self.offset))
        return self.local.replace(tzinfo=zone).isoformat(timespec="seconds")

    @property
    def range(self) -> tuple[datetime, datetime]:
        # Values without a time are whole UTC years, months or days.
        year, month = self.local.year, self.local.month
        if self.precision == "year":
            return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
        if self.precision == "month":
            days = calendar.monthrange(year, month)[1]
            low = datetime(year, month, 1, tzinfo=UTC)
            return low, low + timedelta(days=days)
        if self.precision == "day":
            low = datetime(year, month, self.local.day, tzinfo=UTC)
            return low, low + timedelta(days=1)
        zone = timezone(timedelta(minutes=self.offset))
        low = self.local.replace(tzinfo=zone, microsecond=0).astimezone(UTC)
        return low, low + timedelta(seconds=1)


def matches(prefix: str, search_value: FhirDate, stored: FhirDate) -> bool:
    """search.html, 'prefix': how a search range selects a stored range."""
    s_low, s_high = search_value.range
    t_low, t_high = stored.range
    contained = s_low <= t_low and t_high <= s_high
    above = t_high > s_high  # the range above the search value meets the stored range
    below = t_low < s_low
    return {
        "eq": contained,
        "ne": not contained,
        "gt": above,
        "lt": below,
        "ge": above or contained,
        "le": below or contained,
        "sa": t_low >= s_high,
        "eb": t_high <= s_low,
    }[prefix]


MOMENTS = st.datetimes(min_value=datetime(2019, 1, 1), max_value=datetime(2021, 12, 31, 23, 59))
DATES = st.builds(FhirDate, MOMENTS, st.sampled_from(PRECISIONS), st.sampled_from(OFFSETS))


def near(stored: FhirDate) -> st.SearchStrategy[FhirDate]:
    """Search values at and around the edges of a stored range, where prefixes differ."""
    low, high = (edge.replace(tzinfo=None) for edge in stored.range)
    bases = st.sampled_from(
        [
            stored.local,
            low,
            high,
            low - timedelta(seconds=1),
            high - timedelta(seconds=1),
            low + timedelta(days=1),
            high - timedelta(days=1),
        ]
    )
    offsets = st.one_of(st.just(0), st.sampled_from(OFFSETS))  # edges are in UTC
    return st.builds(FhirDate, bases, st.sampled_from(PRECISIONS), offsets)


@PROPERTY
@given(data=st.data(), stored=st.lists(DATES, min_size=1, max_size=4))
def test_date_prefixes_follow_the_range_semantics(
    client: TestClient, data: st.DataObject, stored: list[FhirDate]
) -> None:
    code = unique("code")
    made = {
        create(client, observation(code, effectiveDateTime=value.text))["id"]: value
        for value in stored
    }
    values = data.draw(
        st.lists(st.one_of(DATES, st.sampled_from(stored).flatmap(near)), min_size=3, max_size=3),
        label="search values",
    )
    for value in values:
        for prefix in PREFIXES:
            query = f"code={code}&date={prefix}{quote(value.text)}&_count=10"
            expected = {rid for rid, written in made.items() if matches(prefix, value, written)}
            assert set(ids(search(client, "Observation", query))) == expected, (
                f"{prefix}{value.text} on {[d.text for d in stored]}"
            )


# -- paging while others write ---------------------------------------------------------------

SORTS = (None, "birthdate", "-birthdate", "given", "-given", "_id", "-_id,birthdate")
#: Newcomers are few, so that paging ends even when each lands after the cursor.
MAX_NEWCOMERS = 6
#: What happens before each page fetch: (action, which resource), drawn before paging starts so
#: that the examples do not depend on how many pages the server happens to return.
SCHEDULE = st.lists(
    st.lists(
        st.tuples(st.sampled_from(("create", "delete", "update")), st.integers(0, 1000)),
        max_size=3,
    ),
    min_size=1,
    max_size=12,
)


@PROPERTY
@given(
    births=st.lists(st.dates(date(1950, 1, 1), date(1952, 12, 31)), min_size=3, max_size=12),
    doomed_count=st.integers(0, 4),
    count=st.integers(1, 4),
    sort=st.sampled_from(SORTS),
    schedule=SCHEDULE,
)
def test_paging_sees_every_resource_once_while_others_change(
    client: TestClient,
    births: list[date],
    doomed_count: int,
    count: int,
    sort: str | None,
    schedule: list[list[tuple[str, int]]],
) -> None:
    sys = system()

    def make(label: str, born: date) -> str:
        body = patient(
            identifier=[{"system": sys, "value": label}],
            name=[{"given": [unique("G")]}],
            birthDate=born.isoformat(),
            gender="male",
        )
        return str(create(client, body)["id"])

    def act(action: str, pick: int) -> None:
        if action == "create" and len(newcomers) < MAX_NEWCOMERS:
            newcomers.append(make("newcomer", births[pick % len(births)]))
        elif action == "delete" and doomed:
            assert client.delete(f"/fhir/Patient/{doomed.pop()}").status_code == 204
        elif action == "update":
            rid = stable[pick % len(stable)]
            current = client.get(f"/fhir/Patient/{rid}").json()
            gender = "female" if current["gender"] == "male" else "male"
            response = client.put(f"/fhir/Patient/{rid}", json={**current, "gender": gender})
            assert response.status_code == 200

    stable = [make("stable", born) for born in births]
    doomed = [make("doomed", births[i % len(births)]) for i in range(doomed_count)]
    newcomers: list[str] = []
    most_pages = (len(stable) + doomed_count + MAX_NEWCOMERS) // count + 1
    query = f"identifier={sys}|&_count={count}" + (f"&_sort={sort}" if sort else "")
    bundle = search(client, "Patient", query)
    seen = ids(bundle)
    page = 0
    while (url := link(bundle, "next")) is not None:
        for action, pick in schedule[page % len(schedule)]:
            act(action, pick)
        page += 1
        assert page <= most_pages, "paging does not end"
        response = client.get(relative(url))
        assert response.status_code == 200, response.text
        bundle = response.json()
        assert len(ids(bundle)) <= count
        seen += ids(bundle)
    assert len(seen) == len(set(seen)), "a resource was returned twice"
    assert set(stable) <= set(seen), "a resource that existed throughout was skipped"


# -- transaction atomicity -------------------------------------------------------------------


def _entry(kind: str, sys: str, victim: str | None) -> dict[str, Any]:
    tag = [{"system": sys, "value": unique("v")}]
    if kind == "post":
        return {
            "resource": patient(identifier=tag),
            "request": {"method": "POST", "url": "Patient"},
        }
    if kind == "put":
        rid = unique("atom-")
        return {
            "resource": patient(id=rid, identifier=tag),
            "request": {"method": "PUT", "url": f"Patient/{rid}"},
        }
    if kind == "delete":
        return {"request": {"method": "DELETE", "url": f"Patient/{victim}"}}
    invalid = {
        "bad-code": patient(identifier=tag, gender="robot"),
        "unknown-element": patient(identifier=tag, nickname="Bob"),
        "bad-date": patient(identifier=tag, birthDate="1980-02-30"),
        "dangling": patient(
            identifier=tag,
            generalPractitioner=[{"reference": f"Practitioner?identifier={sys}|nobody"}],
        ),
    }
    if kind in invalid:
        return {"resource": invalid[kind], "request": {"method": "POST", "url": "Patient"}}
    rid = unique("atom-")
    return {  # kind == "id-mismatch"
        "resource": patient(id=f"{rid}x", identifier=tag),
        "request": {"method": "PUT", "url": f"Patient/{rid}"},
    }


VALID = ("post", "put", "delete")
INVALID = ("bad-code", "unknown-element", "bad-date", "dangling", "id-mismatch")


@PROPERTY
@given(kinds=st.lists(st.sampled_from(VALID + INVALID), min_size=1, max_size=6))
def test_transaction_is_all_or_nothing(client: TestClient, kinds: list[str]) -> None:
    sys = system()
    victims = [
        create(client, patient(identifier=[{"system": system(), "value": "victim"}]))["id"]
        if kind == "delete"
        else None
        for kind in kinds
    ]
    before = (total(client, "Patient"), history_total(client))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [_entry(kind, sys, victim) for kind, victim in zip(kinds, victims, strict=True)],
    }
    response = client.post("/fhir", json=bundle)
    stored = total(client, "Patient", f"identifier={sys}|")
    deleted = [rid for rid in victims if rid]
    if all(kind in VALID for kind in kinds):
        assert response.status_code == 200, response.text
        assert stored == len(kinds) - len(deleted)
        assert total(client, "Patient") == before[0] + stored - len(deleted)
        assert all(client.get(f"/fhir/Patient/{rid}").status_code == 410 for rid in deleted)
    else:
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert stored == 0
        assert (total(client, "Patient"), history_total(client)) == before
        assert all(client.get(f"/fhir/Patient/{rid}").status_code == 200 for rid in deleted)
