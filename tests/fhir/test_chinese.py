"""Folding and pinyin index values that FHIR string search on names relies on."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cityhealth.fhir.chinese import fold, has_han, name_index_values, pinyin_forms


def finds(query: str, family: str | None, given_names: list[str], text: str | None = None) -> bool:
    """The search side: the folded query is a prefix of some index value."""
    folded = fold(query)
    return any(value.startswith(folded) for value in name_index_values(family, given_names, text))


@pytest.mark.parametrize(
    "query", ["zhang", "zs", "zhangsan", "张", "张三", "ｚｈａｎｇ", "ZhangSan", "san"]
)
def test_zhang_san_is_found_by_hanzi_pinyin_and_initials(query: str) -> None:
    assert finds(query, "张", ["三"], "张三")


@pytest.mark.parametrize(
    ("query", "family", "given_name"),
    [
        ("Zeng", "曾", "小明"),
        ("zxm", "曾", "小明"),
        ("shan", "单", "田芳"),
        ("shantianfang", "单", "田芳"),
        ("stf", "单", "田芳"),
        ("xie", "解", "晓东"),
        ("ou", "区", "志华"),
        ("qiu", "仇", "英"),
        ("zha", "查", "良镛"),
        ("zhaliangyong", "查", "良镛"),
        ("piao", "朴", "树"),
        ("ge", "盖", "聂"),
        ("yuchi", "尉迟", "恭"),
        ("ycg", "尉迟", "恭"),
        ("ouyang", "欧阳", "修"),
        ("ouyangxiu", "欧阳", "修"),
        ("miao", "缪", "一"),
        ("zhai", "翟", "天临"),
        ("bo", "薄", "一波"),
        ("moqi", "万俟", "卨"),
    ],
)
def test_surnames_are_found_by_their_name_reading(query: str, family: str, given_name: str) -> None:
    assert finds(query, family, [given_name], family + given_name)


@pytest.mark.parametrize(
    ("query", "family", "given_name"),
    [
        ("ceng", "曾", "小明"),
        ("dan", "单", "田芳"),
        ("jie", "解", "晓东"),
        ("qu", "区", "志华"),
        ("chou", "仇", "英"),
        ("cha", "查", "良镛"),
        ("pu", "朴", "树"),
        ("wei", "尉迟", "恭"),
    ],
)
def test_everyday_reading_of_a_surname_does_not_match(
    query: str, family: str, given_name: str
) -> None:
    assert not finds(query, family, [given_name], family + given_name)


def test_name_text_alone_is_read_surname_first() -> None:
    assert finds("shantianfang", None, [], "单田芳")
    assert finds("oynn", None, [], "欧阳娜娜")
    assert pinyin_forms("单田芳", name_part="full") == ["shantianfang", "stf"]


def test_given_name_is_not_read_as_a_phrase_with_the_surname() -> None:
    assert pinyin_forms("曾经纬", name_part="full") == ["zengjingwei", "zjw"]
    assert pinyin_forms("曾经") == ["cengjing", "cj"]


def test_general_text_keeps_everyday_readings() -> None:
    assert pinyin_forms("曾经", name_part="given") == ["cengjing", "cj"]
    assert pinyin_forms("重庆银行") == ["chongqingyinhang", "cqyh"]


def test_family_part_is_read_as_surnames() -> None:
    assert pinyin_forms("单", name_part="family") == ["shan"]
    assert pinyin_forms("陈曾", name_part="family") == ["chenzeng", "cz"]
    assert pinyin_forms("尉", name_part="family") == ["wei"]


def test_surname_with_two_readings_is_indexed_under_both() -> None:
    assert pinyin_forms("乐嘉", name_part="full") == ["yuejia", "yj", "lejia", "lj"]
    assert finds("lejia", "乐", ["嘉"])
    assert finds("yuejia", "乐", ["嘉"])
    assert pinyin_forms("单于丹", name_part="full") == ["chanyudan", "cyd", "shanyudan", "syd"]


def test_traditional_surname_forms_have_name_readings() -> None:
    assert pinyin_forms("單田芳", name_part="full") == ["shantianfang", "stf"]
    assert pinyin_forms("歐陽修", name_part="full") == ["ouyangxiu", "oyx"]


def test_non_han_characters_are_kept_folded() -> None:
    assert pinyin_forms("A座3号") == ["azuo3hao", "az3h"]
    assert pinyin_forms("Ａ座 ３号") == ["azuo3hao", "az3h"]


def test_single_syllable_has_no_separate_initials() -> None:
    assert pinyin_forms("张") == ["zhang"]


def test_text_without_han_has_no_pinyin() -> None:
    assert pinyin_forms("Smith") == []
    assert pinyin_forms("") == []
    assert not has_han("Müller 123")
    assert has_han("Dr. 张")


def test_unknown_name_part_is_rejected() -> None:
    with pytest.raises(ValueError, match="name part"):
        pinyin_forms("张三", name_part="surname")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("１２３ＡＢＣ", "123abc"),
        ("Müller", "muller"),
        ("  José   GARCÍA ", "jose garcia"),
        ("Straße", "strasse"),
        ("Ærøskøbing", "ærøskøbing"),
        ("张\u3000三", "张 三"),
        ("Zoë\tLi\n", "zoe li"),
        ("", ""),
    ],
)
def test_fold(text: str, folded: str) -> None:
    assert fold(text) == folded


def test_chinese_name_is_joined_surname_first_without_spaces() -> None:
    values = name_index_values("张", ["三"], None)
    assert values[:3] == ["张", "三", "张三"]
    assert {"zhang", "san", "zhangsan", "zs"} <= set(values)


def test_western_name_is_joined_given_first() -> None:
    values = name_index_values("Müller", ["Hans", "Peter"], "Hans Peter Müller")
    assert values == ["muller", "hans", "peter", "hans peter muller"]
    assert finds("hans peter", "Müller", ["Hans", "Peter"])
    assert not finds("muller hans", "Müller", ["Hans", "Peter"])


def test_given_only_chinese_name() -> None:
    assert name_index_values(None, ["小明"], None) == ["小明", "xiaoming", "xm"]


def test_empty_name_has_no_values() -> None:
    assert name_index_values(None, [], None) == []
    assert name_index_values("", ["", " "], "  ") == []


_NAME_CHARS = st.one_of(
    st.characters(),
    st.sampled_from(list("张三曾单于尉迟欧阳乐嘉區蓋Ａｚ１é ̈\u3000\u00a8가·-")),
)
_NAME_TEXT = st.text(_NAME_CHARS, max_size=8)


@given(st.text(_NAME_CHARS))
@settings(max_examples=500)
def test_fold_is_idempotent(text: str) -> None:
    assert fold(fold(text)) == fold(text)


@given(
    st.one_of(st.none(), _NAME_TEXT),
    st.lists(_NAME_TEXT, max_size=3),
    st.one_of(st.none(), _NAME_TEXT),
)
@settings(max_examples=300)
def test_name_index_values_are_folded_distinct_and_non_empty(
    family: str | None, given_names: list[str], text: str | None
) -> None:
    values = name_index_values(family, given_names, text)
    assert all(value and fold(value) == value for value in values)
    assert len(values) == len(set(values))
    assert name_index_values(family, given_names, text) == values
