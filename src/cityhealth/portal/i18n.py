"""The portal's languages: Simplified Chinese (the default) and English, from gettext catalogs.

The catalogs are the `translations/<locale>/LC_MESSAGES/messages.po` files; they are compiled
in memory the first time a language is used, so the repository holds no generated binaries.
A request's language is its `lang` cookie when set (the language switch), else the best match
of its Accept-Language header, else Chinese. Times are shown in Asia/Shanghai.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from datetime import date, datetime
from functools import cache
from io import BytesIO
from pathlib import Path
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_datetime
from babel.lists import format_list
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations
from babel.units import format_unit

ZH, EN = "zh_CN", "en"
LOCALES = (ZH, EN)
DEFAULT = ZH
COOKIE = "lang"
#: The value of `<html lang>` for each locale (BCP 47).
HTML_LANG = {ZH: "zh-CN", EN: "en"}
SHANGHAI = ZoneInfo("Asia/Shanghai")
CATALOGS = Path(__file__).with_name("translations")

_current: ContextVar[str] = ContextVar("portal_locale", default=DEFAULT)


def N_(message: str) -> str:
    """Mark a message for the catalogs; it is translated where it is shown."""
    return message


@cache
def translations(locale: str) -> Translations:
    with (CATALOGS / locale / "LC_MESSAGES" / "messages.po").open("rb") as source:
        catalog = read_po(source, locale=locale)
    compiled = BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(compiled, domain="messages")


def negotiate(cookie: str | None, accept_language: str | None) -> str:
    """The locale of a request: the cookie's, else Accept-Language's best, else Chinese."""
    if cookie in LOCALES:
        return cookie
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        name, _, value = params.strip().partition("=")
        if name.strip() == "q":
            try:
                quality = float(value)
            except ValueError:
                continue
        locale = _locale_of(tag.strip().lower())
        if locale and quality > 0:
            ranked.append((-quality, position, locale))
    return min(ranked)[2] if ranked else DEFAULT


def _locale_of(tag: str) -> str | None:
    # Every Chinese variant reads Simplified better than English; `*` means "anything".
    if tag == "zh" or tag.startswith("zh-") or tag == "*":
        return ZH
    if tag == "en" or tag.startswith("en-"):
        return EN
    return None


def use(locale: str) -> None:
    """Make `locale` the language of what this thread renders next."""
    _current.set(locale if locale in LOCALES else DEFAULT)


def current() -> str:
    return _current.get()


def gettext(message: str) -> str:
    return translations(current()).gettext(message)


def ngettext(singular: str, plural: str, count: int) -> str:
    return translations(current()).ngettext(singular, plural, count)


def pick(zh: str, en: str) -> str:
    """One of a pair of texts kept in both languages (roles, policy messages …)."""
    return en if current() == EN else zh


def show_list(items: Iterable[str]) -> str:
    """Words joined as a list in the current language ("read and search", "查看和检索")."""
    return format_list(list(items), locale=current())


def show_seconds(seconds: int) -> str:
    """A number of seconds in words of the current language ("60 seconds", "60秒钟")."""
    return format_unit(seconds, "duration-second", length="long", locale=current())


def show_time(moment: datetime | None) -> str:
    """A moment in Asia/Shanghai, in the current language."""
    if moment is None:
        return ""
    return format_datetime(moment, "medium", tzinfo=SHANGHAI, locale=current())


def show_date(day: date | datetime | None) -> str:
    if day is None:
        return ""
    if isinstance(day, datetime):
        day = day.astimezone(SHANGHAI).date()
    return format_date(day, "long", locale=current())


def local_date(moment: datetime) -> date:
    """The date of `moment` in Asia/Shanghai, the calendar residents live by."""
    return moment.astimezone(SHANGHAI).date()
