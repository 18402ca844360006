"""Search through the REST API as hl7.org/fhir/R4/search.html defines it: parameter types,
prefixes and modifiers, OR and AND, paging, sorting, totals, subsetting, includes, chaining and
Patient/$everything."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import pytest
from fastapi.testclient import TestClient
from helpers import (
    create,
    entries,
    found,
    ids,
    link,
    observation,
    patient,
    relative,
    search,
    system,
    unique,
)

VIA = ["GET", "POST"]


def run(client: TestClient, via: str, rtype: str, query: str) -> set[str]:
    """Ids matched by a search made with GET or with POST [type]/_search and a form body."""
    if via == "GET":
        return found(client, rtype, query)
    form = parse_qsl(query, keep_blank_values=True)
    response = client.post(f"/fhir/{rtype}/_search", data=dict(form))
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    assert bundle["type"] == "searchset"
    return set(ids(bundle))


def tagged(sys: str, value: str, **fields: Any) -> dict[str, Any]:
    """A Patient carrying an identifier that scopes the searches of one test."""
    return patient(identifier=[{"system": sys, "value": value}], **fields)


def make(client: TestClient, sys: str, **people: dict[str, Any]) -> dict[str, str]:
    """Create one tagged Patient per keyword; returns name → id."""
    return {key: create(client, tagged(sys, key, **fields))["id"] for key, fields in people.items()}


# -- token -----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
def test_token_forms(client: TestClient, via: str) -> None:
    sys, other = system(), system()
    value = unique("mrn")
    with_system = create(client, patient(identifier=[{"system": sys, "value": value}]))["id"]
    other_system = create(client, patient(identifier=[{"system": other, "value": value}]))["id"]
    no_system = create(client, patient(identifier=[{"value": value}]))["id"]
    everyone = {with_system, other_system, no_system}
    assert run(client, via, "Patient", f"identifier={value}") == everyone
    assert run(client, via, "Patient", f"identifier={sys}|{value}") == {with_system}
    assert run(client, via, "Patient", f"identifier=|{value}") == {no_system}
    assert run(client, via, "Patient", f"identifier={other}|") == {other_system}
    assert run(client, via, "Patient", f"identifier={sys}|{value}x") == set()


def test_token_not_includes_resources_without_a_value(client: TestClient) -> None:
    sys = system()
    made = make(client, sys, m={"gender": "male"}, f={"gender": "female"}, none={})
    assert found(client, "Patient", f"identifier={sys}|&gender:not=male") == {
        made["f"],
        made["none"],
    }


def test_token_missing(client: TestClient) -> None:
    sys = system()
    made = make(client, sys, m={"gender": "male"}, none={})
    assert found(client, "Patient", f"identifier={sys}|&gender:missing=true") == {made["none"]}
    assert found(client, "Patient", f"identifier={sys}|&gender:missing=false") == {made["m"]}


def test_token_text_on_lower_case_text(client: TestClient) -> None:
    code = unique("code")
    concept = {"text": f"fasting {code} sugar", "coding": [{"system": "urn:s", "code": code}]}
    rid = create(client, {**observation(code), "code": concept})["id"]
    assert found(client, "Observation", f"code:text=fasting%20{code}") == {rid}
    assert found(client, "Observation", f"code:text=sugar%20{code}") == set()


def test_token_text_is_case_insensitive_on_text_and_display(client: TestClient) -> None:
    code = unique("code")
    concept = {
        "text": f"Fasting {code}",
        "coding": [{"system": "urn:s", "code": code, "display": f"Blood {code} Glucose"}],
    }
    rid = create(client, {**observation(code), "code": concept})["id"]
    assert found(client, "Observation", f"code:text=fasting%20{code}") == {rid}
    assert found(client, "Observation", f"code:text=BLOOD%20{code}") == {rid}


def test_token_on_code_and_boolean(client: TestClient) -> None:
    sys = system()
    made = make(client, sys, yes={"active": True}, no={"active": False})
    assert found(client, "Patient", f"identifier={sys}|&active=true") == {made["yes"]}
    assert found(client, "Patient", f"identifier={sys}|&active=false") == {made["no"]}


# -- string ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
def test_string_starts_with_ignoring_case_and_accents(client: TestClient, via: str) -> None:
    sys = system()
    made = make(
        client,
        sys,
        mueller={"name": [{"family": "Müller", "given": ["Hans"]}]},
        muller={"name": [{"family": "MULLER"}]},
        other={"name": [{"family": "Amuller"}]},
    )
    scope = f"identifier={sys}|"
    both = {made["mueller"], made["muller"]}
    assert run(client, via, "Patient", f"{scope}&family=muller") == both
    assert run(client, via, "Patient", f"{scope}&family=MÜL") == both
    assert run(client, via, "Patient", f"{scope}&name=hans") == {made["mueller"]}
    assert run(client, via, "Patient", f"{scope}&family=uller") == set()


def test_string_exact_and_contains(client: TestClient) -> None:
    sys = system()
    made = make(
        client,
        sys,
        mueller={"name": [{"family": "Müller"}]},
        muller={"name": [{"family": "Muller"}]},
        other={"name": [{"family": "Amuller"}]},
    )
    scope = f"identifier={sys}|"
    assert found(client, "Patient", f"{scope}&family:exact=Müller") == {made["mueller"]}
    assert found(client, "Patient", f"{scope}&family:exact=müller") == set()
    assert found(client, "Patient", f"{scope}&family:exact=Müll") == set()
    assert found(client, "Patient", f"{scope}&family:contains=ULLE") == set(made.values())
    assert found(client, "Patient", f"{scope}&family:contains=amu") == {made["other"]}


def test_string_on_address(client: TestClient) -> None:
    sys = system()
    made = make(
        client,
        sys,
        sh={"address": [{"city": "Shanghai", "line": ["88 Century Avenue"]}]},
        bj={"address": [{"city": "Beijing"}]},
    )
    scope = f"identifier={sys}|"
    assert found(client, "Patient", f"{scope}&address-city=shang") == {made["sh"]}
    assert found(client, "Patient", f"{scope}&address=88%20century") == {made["sh"]}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("name=zhang", {"zhang"}),
        ("name=zs", {"zhang"}),
        ("name=zhangsan", {"zhang"}),
        ("phonetic=zhangsan", {"zhang"}),
        ("name=ｚｈａｎｇ", {"zhang"}),
        ("name=ZhangSan", {"zhang"}),
        ("name=张", {"zhang"}),
        ("name=张三", {"zhang"}),
        ("name=zeng", {"zeng"}),
        ("name=zengxiaoming", {"zeng"}),
        ("name=ceng", set()),
        ("family=zhang", {"zhang"}),
        ("name=shan", {"shan"}),
        ("name=shantianfang", {"shan"}),
        ("name=dan", set()),
        ("name=li", set()),
    ],
)
def test_chinese_names(client: TestClient, query: str, expected: set[str]) -> None:
    sys = system()
    made = make(
        client,
        sys,
        zhang={"name": [{"family": "张", "given": ["三"], "text": "张三"}]},
        zeng={"name": [{"family": "曾", "given": ["小明"]}]},
        shan={"name": [{"family": "单", "given": ["田芳"]}]},
    )
    result = found(client, "Patient", f"identifier={sys}|&{query}")
    assert result == {made[key] for key in expected}


@pytest.mark.parametrize(
    ("query", "expected"),
    [("family=zeng", {"zeng"}), ("family=shan", {"shan"}), ("family=ceng,dan", set())],
)
def test_chinese_family_parameter_reads_surnames(
    client: TestClient, query: str, expected: set[str]
) -> None:
    sys = system()
    made = make(
        client,
        sys,
        zeng={"name": [{"family": "曾", "given": ["小明"]}]},
        shan={"name": [{"family": "单", "given": ["田芳"]}]},
    )
    result = found(client, "Patient", f"identifier={sys}|&{query}")
    assert result == {made[key] for key in expected}


# -- date ------------------------------------------------------------------------------------

BIRTH_DATES = {"y": "1980", "ym": "1980-05", "ymd": "1980-05-15", "next": "1981-01-01"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1980", {"y", "ym", "ymd"}),
        ("eq1980-05", {"ym", "ymd"}),
        ("1980-05-15", {"ymd"}),
        ("ne1980-05", {"y", "next"}),
        ("gt1980-05", {"y", "next"}),
        ("gt1980-05-15", {"y", "ym", "next"}),
        ("lt1980-05", {"y"}),
        ("lt1981", {"y", "ym", "ymd"}),
        ("ge1980-05", {"y", "ym", "ymd", "next"}),
        ("ge1981-01-01", {"next"}),
        ("ge1980-12-31", {"next"}),
        ("le1980-05", {"y", "ym", "ymd"}),
        ("le1979", set()),
        ("le1980-01-01", set()),
        ("le1980-05-15", {"y", "ym", "ymd"}),
        ("sa1980-05", {"next"}),
        ("sa1980", {"next"}),
        ("eb1980-05", set()),
        ("eb1981", {"y", "ym", "ymd"}),
        ("eb1980-05-20", {"ymd"}),
        ("ap1980-05-15", {"y", "ym", "ymd", "next"}),
        ("ap1900", set()),
    ],
)
def test_birthdate_prefixes_on_partial_dates(
    client: TestClient, value: str, expected: set[str]
) -> None:
    sys = system()
    made = make(client, sys, **{k: {"birthDate": v} for k, v in BIRTH_DATES.items()})
    result = found(client, "Patient", f"identifier={sys}|&birthdate={value}")
    assert result == {made[key] for key in expected}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2020-01", {"period", "instant"}),
        ("2020-01-15", set()),
        ("eq2020-01-12T08:00:00%2B08:00", {"instant"}),
        ("ne2020-01-15", {"period", "instant", "open"}),
        ("gt2020-01-15", {"period", "open"}),
        ("lt2020-01-15", {"period", "instant", "open"}),
        ("ge2020-01-19", {"period", "open"}),
        ("ge2020-01-20", {"open"}),
        ("sa2020-01-05", {"period", "instant", "open"}),
        ("sa2020-01-10", {"instant"}),
        ("eb2020-01-25", {"period", "instant"}),
        ("gt2030", {"open"}),
        ("eb2030", {"period", "instant"}),
    ],
)
def test_observation_date_with_period_and_instant(
    client: TestClient, value: str, expected: set[str]
) -> None:
    code = unique("code")
    made = {
        "period": create(
            client, observation(code, effectivePeriod={"start": "2020-01-10", "end": "2020-01-20"})
        )["id"],
        "open": create(client, observation(code, effectivePeriod={"start": "2020-01-10"}))["id"],
        "instant": create(client, observation(code, effectiveDateTime="2020-01-12T00:00:00Z"))[
            "id"
        ],
    }
    result = found(client, "Observation", f"code={code}&date={value}")
    assert result == {made[key] for key in expected}


def test_last_updated(client: TestClient) -> None:
    sys = system()
    first = create(client, tagged(sys, "a"))
    second = create(client, tagged(sys, "b"))
    since = first["meta"]["lastUpdated"].replace("+", "%2B")
    scope = f"identifier={sys}|"
    assert found(client, "Patient", f"{scope}&_lastUpdated=ge{since}") == {
        first["id"],
        second["id"],
    }
    assert found(client, "Patient", f"{scope}&_lastUpdated=gt{since}") == {second["id"]}
    assert found(client, "Patient", f"{scope}&_lastUpdated=lt2000") == set()


# -- number, quantity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.5", {0.5}),
        ("0.50", {0.5}),
        ("eq0.7", set()),
        ("ne0.5", {0.25, 0.75}),
        ("gt0.5", {0.75}),
        ("ge0.5", {0.5, 0.75}),
        ("lt0.5", {0.25}),
        ("le0.5", {0.25, 0.5}),
        ("ap0.74", {0.75}),
        ("0.5,0.25", {0.25, 0.5}),
    ],
)
def test_number_prefixes(client: TestClient, value: str, expected: set[float]) -> None:
    sys = system()
    subject = create(client, tagged(sys, "subject"))["id"]
    made = {
        probability: create(
            client,
            {
                "resourceType": "RiskAssessment",
                "status": "final",
                "identifier": [{"system": sys, "value": "risk"}],
                "subject": {"reference": f"Patient/{subject}"},
                "prediction": [{"probabilityDecimal": probability}],
            },
        )["id"]
        for probability in (0.25, 0.5, 0.75)
    }
    result = found(client, "RiskAssessment", f"identifier={sys}|&probability={value}")
    assert result == {made[p] for p in expected}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5.4|http://unitsofmeasure.org|mg", {"mg"}),
        ("5.4||mg", {"mg"}),
        ("5.4", {"mg", "g"}),
        ("5.4|http://unitsofmeasure.org|g", {"g"}),
        ("gt5|http://unitsofmeasure.org|mg", {"mg", "ten"}),
        ("lt10|http://unitsofmeasure.org|mg", {"mg"}),
        ("le10||mg", {"mg", "ten"}),
        ("ne5.4||mg", {"ten"}),
        ("5.40|http://unitsofmeasure.org|mg", {"mg"}),
        ("5|http://unitsofmeasure.org|mg", {"mg"}),
        ("6|http://unitsofmeasure.org|mg", set()),
    ],
)
def test_quantity(client: TestClient, value: str, expected: set[str]) -> None:
    code = unique("code")

    def quantity(number: float, unit: str) -> dict[str, Any]:
        return {"value": number, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}

    made = {
        "mg": create(client, observation(code, valueQuantity=quantity(5.4, "mg")))["id"],
        "g": create(client, observation(code, valueQuantity=quantity(5.4, "g")))["id"],
        "ten": create(client, observation(code, valueQuantity=quantity(10, "mg")))["id"],
    }
    result = found(client, "Observation", f"code={code}&value-quantity={value}")
    assert result == {made[key] for key in expected}


# -- reference, uri --------------------------------------------------------------------------


def test_reference_forms(client: TestClient) -> None:
    code = unique("code")
    sys = system()
    created = client.post("/fhir/Patient", json=tagged(sys, "p"))
    pid = created.json()["id"]
    base = created.headers["location"].split("/Patient/")[0]
    group = create(client, {"resourceType": "Group", "type": "person", "actual": True})["id"]
    of_patient = create(client, observation(code, subject={"reference": f"Patient/{pid}"}))["id"]
    of_group = create(client, observation(code, subject={"reference": f"Group/{group}"}))["id"]
    logical = create(
        client, observation(code, subject={"identifier": {"system": sys, "value": "p"}})
    )["id"]
    unattached = create(client, observation(code))["id"]
    scope = f"code={code}"
    assert found(client, "Observation", f"{scope}&subject=Patient/{pid}") == {of_patient}
    assert found(client, "Observation", f"{scope}&subject={pid}") == {of_patient}
    assert found(client, "Observation", f"{scope}&subject:Patient={pid}") == {of_patient}
    assert found(client, "Observation", f"{scope}&subject:Group={pid}") == set()
    assert found(client, "Observation", f"{scope}&patient={pid}") == {of_patient}
    assert found(client, "Observation", f"{scope}&subject=Group/{group}") == {of_group}
    assert found(client, "Observation", f"{scope}&subject={base}/Patient/{pid}") == {of_patient}
    assert found(client, "Observation", f"{scope}&subject:identifier={sys}|p") == {logical}
    missing = found(client, "Observation", f"{scope}&subject:missing=true")
    assert unattached in missing
    assert not missing & {of_patient, of_group}


def test_uri_exact_and_below(client: TestClient) -> None:
    base = f"http://example.org/fhir/{unique('vs')}"
    made = {
        url: create(client, {"resourceType": "ValueSet", "status": "draft", "url": url})["id"]
        for url in (base, f"{base}/child", f"{base}/child/grandchild", f"{base}x")
    }
    assert found(client, "ValueSet", f"url={base}") == {made[base]}
    assert found(client, "ValueSet", f"url={base}/chi") == set()
    assert found(client, "ValueSet", f"url:below={base}/child") == {
        made[f"{base}/child"],
        made[f"{base}/child/grandchild"],
    }


# -- combining -------------------------------------------------------------------------------


@pytest.mark.parametrize("via", VIA)
def test_comma_is_or_and_repetition_is_and(client: TestClient, via: str) -> None:
    sys = system()
    made = make(
        client,
        sys,
        ab={"name": [{"given": ["Anna", "Bea"]}], "gender": "female"},
        a={"name": [{"given": ["Anna"]}], "gender": "male"},
        c={"name": [{"given": ["Cleo"]}], "gender": "other"},
    )
    scope = f"identifier={sys}|"
    assert run(client, via, "Patient", f"{scope}&gender=male,female") == {made["ab"], made["a"]}
    assert run(client, via, "Patient", f"{scope}&given=anna&given=bea") == {made["ab"]}
    assert run(client, via, "Patient", f"{scope}&given=bea,cleo") == {made["ab"], made["c"]}
    assert run(client, via, "Patient", f"{scope}&given=anna&gender=male,other") == {made["a"]}


def test_escaped_comma_is_part_of_the_value(client: TestClient) -> None:
    sys = system()
    made = make(
        client,
        sys,
        comma={"name": [{"family": "Smith,Jones"}]},
        smith={"name": [{"family": "Smith"}]},
    )
    assert found(client, "Patient", f"identifier={sys}|&family=Smith\\,Jones") == {made["comma"]}
    assert found(client, "Patient", f"identifier={sys}|&family=Smith,Jones") == set(made.values())


def test_id(client: TestClient) -> None:
    sys = system()
    made = make(client, sys, a={}, b={}, c={})
    assert found(client, "Patient", f"_id={made['a']},{made['c']}") == {made["a"], made["c"]}
    assert found(client, "Patient", f"identifier={sys}|&_id:not={made['a']}") == {
        made["b"],
        made["c"],
    }


# -- paging, sorting, totals -----------------------------------------------------------------


def _page_ids(client: TestClient, url: str) -> tuple[list[str], dict[str, Any]]:
    response = client.get(url)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    return ids(bundle), bundle


def test_paging_next_to_the_end_and_previous_back(client: TestClient) -> None:
    sys = system()
    made = make(client, sys, **{f"p{i}": {} for i in range(8)})
    pages: list[list[str]] = []
    page, bundle = _page_ids(client, f"/fhir/Patient?identifier={sys}|&_count=3")
    pages.append(page)
    assert link(bundle, "self") is not None
    assert link(bundle, "previous") is None
    while (url := link(bundle, "next")) is not None:
        page, bundle = _page_ids(client, relative(url))
        pages.append(page)
    assert [len(p) for p in pages] == [3, 3, 2]
    seen = [rid for p in pages for rid in p]
    assert sorted(seen) == sorted(made.values())
    backwards = [pages[-1]]
    while (url := link(bundle, "previous")) is not None:
        page, bundle = _page_ids(client, relative(url))
        backwards.append(page)
    assert backwards == pages[::-1]


def test_sort_on_several_keys(client: TestClient) -> None:
    sys = system()
    people: dict[str, dict[str, Any]] = {
        "b80": {"name": [{"family": "Berg"}], "birthDate": "1980-01-01"},
        "a70": {"name": [{"family": "Alder"}], "birthDate": "1970-01-01"},
        "b90": {"name": [{"family": "Berg"}], "birthDate": "1990-01-01"},
        "a85": {"name": [{"family": "Alder"}], "birthDate": "1985-01-01"},
        "none": {"birthDate": "2000-01-01"},
    }
    made = make(client, sys, **people)
    order = ids(search(client, "Patient", f"identifier={sys}|&_sort=family,-birthdate"))
    assert order == [made[k] for k in ("a85", "a70", "b90", "b80", "none")]
    order = ids(search(client, "Patient", f"identifier={sys}|&_sort=-birthdate"))
    assert order == [made[k] for k in ("none", "b90", "a85", "b80", "a70")]
    paged: list[str] = []
    bundle = search(client, "Patient", f"identifier={sys}|&_sort=-family,birthdate&_count=2")
    paged += ids(bundle)
    while (url := link(bundle, "next")) is not None:
        _, bundle = _page_ids(client, relative(url))
        paged += ids(bundle)
    assert paged == [made[k] for k in ("b80", "b90", "a70", "a85", "none")]


def test_total_accurate_counts_every_page(client: TestClient) -> None:
    sys = system()
    make(client, sys, **{f"p{i}": {} for i in range(5)})
    bundle = search(client, "Patient", f"identifier={sys}|&_count=2&_total=accurate")
    assert bundle["total"] == 5
    assert len(ids(bundle)) == 2


def test_summary_count_has_a_total_and_no_entries(client: TestClient) -> None:
    sys = system()
    make(client, sys, a={}, b={}, c={})
    bundle = search(client, "Patient", f"identifier={sys}|&_summary=count")
    assert bundle["total"] == 3
    assert "entry" not in bundle


def test_summary_true_keeps_summary_elements_and_marks_the_resource(client: TestClient) -> None:
    sys = system()
    make(client, sys, a={"gender": "male", "maritalStatus": {"text": "married"}})
    (resource,) = entries(search(client, "Patient", f"identifier={sys}|&_summary=true"))
    assert resource["gender"] == "male"
    assert "maritalStatus" not in resource
    assert any(t.get("code") == "SUBSETTED" for t in resource["meta"]["tag"])
    (full,) = entries(search(client, "Patient", f"identifier={sys}|"))
    assert full["maritalStatus"] == {"text": "married"}
    assert "tag" not in full["meta"]


def test_elements_keeps_only_the_listed_elements(client: TestClient) -> None:
    sys = system()
    make(client, sys, a={"gender": "male", "birthDate": "1980", "name": [{"family": "X"}]})
    (resource,) = entries(
        search(client, "Patient", f"identifier={sys}|&_elements=gender,birthDate")
    )
    assert resource["gender"] == "male"
    assert resource["birthDate"] == "1980"
    assert "name" not in resource
    assert "identifier" not in resource
    assert resource["id"]
    assert any(t.get("code") == "SUBSETTED" for t in resource["meta"]["tag"])


# -- include, chaining -----------------------------------------------------------------------


def test_include_and_iterate(client: TestClient) -> None:
    code = unique("code")
    org = create(client, {"resourceType": "Organization", "name": unique("Org")})["id"]
    pid = create(client, patient(managingOrganization={"reference": f"Organization/{org}"}))["id"]
    obs = [
        create(client, observation(code, subject={"reference": f"Patient/{pid}"}))["id"]
        for _ in range(2)
    ]
    bundle = search(client, "Observation", f"code={code}&_include=Observation:subject")
    assert set(ids(bundle)) == set(obs)
    assert ids(bundle, "include") == [pid]
    deeper = search(
        client,
        "Observation",
        f"code={code}&_include=Observation:subject&_include:iterate=Patient:organization",
    )
    assert set(ids(deeper)) == set(obs)
    assert sorted(ids(deeper, "include")) == sorted([pid, org])
    shallow = search(
        client,
        "Observation",
        f"code={code}&_include=Observation:subject&_include=Patient:organization",
    )
    assert ids(shallow, "include") == [pid]


def test_revinclude_and_iterate(client: TestClient) -> None:
    code = unique("code")
    pid = create(client, patient(gender="female"))["id"]
    obs = create(client, observation(code, subject={"reference": f"Patient/{pid}"}))["id"]
    derived = create(client, observation(code, derivedFrom=[{"reference": f"Observation/{obs}"}]))[
        "id"
    ]
    bundle = search(client, "Patient", f"_id={pid}&_revinclude=Observation:subject")
    assert ids(bundle) == [pid]
    assert ids(bundle, "include") == [obs]
    deeper = search(
        client,
        "Patient",
        f"_id={pid}&_revinclude=Observation:subject&_revinclude:iterate=Observation:derived-from",
    )
    assert sorted(ids(deeper, "include")) == sorted([obs, derived])


def test_chained_parameters(client: TestClient) -> None:
    code = unique("code")
    family = unique("Chain")
    pid = create(client, patient(name=[{"family": family}]))["id"]
    other = create(client, patient(name=[{"family": unique("Other")}]))["id"]
    mine = create(client, observation(code, subject={"reference": f"Patient/{pid}"}))["id"]
    create(client, observation(code, subject={"reference": f"Patient/{other}"}))
    scope = f"code={code}"
    assert found(client, "Observation", f"{scope}&subject:Patient.name={family}") == {mine}
    assert found(client, "Observation", f"{scope}&subject.name={family}") == {mine}
    assert found(client, "Observation", f"{scope}&patient.family={family.upper()}") == {mine}
    assert found(client, "Observation", f"{scope}&subject:Patient.name=nobody") == set()


def test_reverse_chaining(client: TestClient) -> None:
    code = unique("code")
    sys = system()
    made = make(client, sys, with_obs={}, without={})
    create(client, observation(code, subject={"reference": f"Patient/{made['with_obs']}"}))
    create(client, observation(unique("code"), subject={"reference": f"Patient/{made['without']}"}))
    scope = f"identifier={sys}|"
    assert found(client, "Patient", f"{scope}&_has:Observation:patient:code={code}") == {
        made["with_obs"]
    }
    assert found(client, "Patient", f"{scope}&_has:Observation:subject:code={code}") == {
        made["with_obs"]
    }


def test_patient_everything_pages_through_the_compartment(client: TestClient) -> None:
    code = unique("code")
    org = create(client, {"resourceType": "Organization", "name": unique("Org")})["id"]
    pid = create(client, patient(managingOrganization={"reference": f"Organization/{org}"}))["id"]
    other = create(client, patient())["id"]
    obs = {
        create(client, observation(code, subject={"reference": f"Patient/{pid}"}))["id"]
        for _ in range(5)
    }
    create(client, observation(code, subject={"reference": f"Patient/{other}"}))
    matched: list[str] = []
    included: set[str] = set()
    url: str | None = f"/fhir/Patient/{pid}/$everything?_count=2"
    pages = 0
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.text
        bundle = response.json()
        assert bundle["type"] == "searchset"
        assert len(ids(bundle)) <= 2
        matched += ids(bundle)
        included |= set(ids(bundle, "include"))
        pages += 1
        next_url = link(bundle, "next")
        url = relative(next_url) if next_url else None
    assert pages == 3
    assert sorted(matched) == sorted({pid} | obs)
    assert org in included
    assert client.get(f"/fhir/Patient/{unique('absent')}/$everything").status_code == 404
