"""The pages of the authorization endpoint: login, password change, choice of patient, errors.

Plain, self-contained HTML in Simplified Chinese (no external assets, no script), labelled for
screen readers; the authorization request travels in hidden fields. Every value is escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from html import escape

from fastapi.responses import HTMLResponse

from cityhealth.security.scopes import NON_RESOURCE_SCOPES, parse_scope

GENERIC_LOGIN_ERROR = "用户名或密码错误。"
SESSION_ENDED = "登录已过期，请重新登录。"
PASSWORD_EXPIRED = "密码已过期，请设置新密码后继续。"
PASSWORDS_DIFFER = "两次输入的新密码不一致。"
CHOOSE_A_PATIENT = "请选择一位居民。"
UNAVAILABLE = "服务暂时不可用，请稍后再试。"

_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",  # no clickjacking of the login form
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
_STYLE = (
    "body{font-family:system-ui,'Noto Sans CJK SC','WenQuanYi Micro Hei',sans-serif;"
    "margin:0;padding:1rem;background:#f4f6f8;color:#1b1f23;line-height:1.6}"
    "main{max-width:26rem;margin:2rem auto;background:#fff;padding:1.5rem;border-radius:8px;"
    "box-shadow:0 1px 3px rgba(0,0,0,.15)}"
    "h1{font-size:1.4rem;margin-top:0}label{display:block;margin-top:1rem;font-weight:600}"
    "input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;"
    "font-size:1rem;border:1px solid #6a737d;border-radius:4px}"
    "button{margin-top:1.5rem;width:100%;padding:.7rem;font-size:1rem;border:0;"
    "border-radius:4px;background:#0b5cad;color:#fff;cursor:pointer}"
    "button:focus,input:focus{outline:3px solid #f9a825;outline-offset:1px}"
    ".error{color:#b00020;font-weight:600}.radio{font-weight:normal}"
    ".radio input{margin-right:.5rem}ul{padding-left:1.2rem}"
)
_CONTEXTS = {"patient": "本人健康档案中的", "user": "你有权访问的", "system": "系统内的"}
_ACTIONS = {"c": "新建", "r": "查看", "u": "修改", "d": "删除", "s": "检索"}
_OTHER_SCOPES = {
    "openid": "确认你的身份",
    "fhirUser": "知道你在系统中对应的人员",
    "profile": "读取你的基本资料",
    "launch/patient": "确定本次授权代表哪位居民",
    "offline_access": "在你退出登录后继续访问（长期有效）",
    "online_access": "在你登录期间保持访问",
}
_RELATIONS = {"self": "本人", "guardian": "被监护人"}


def page(html: str, status: int = 200, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers={**_HEADERS, **(headers or {})})


def login_page(
    client_name: str,
    scopes: Sequence[str],
    fields: Mapping[str, str],
    *,
    message: str | None = None,
    username: str = "",
    change_password: bool = False,
) -> str:
    """The login form; with `change_password`, the form to replace an expired password."""
    error = _error(message)
    described = ' aria-describedby="error"' if message else ""
    inputs = [
        _input("username", "用户名", "text", "username", username, described),
        _input(
            "password",
            "当前密码" if change_password else "密码",
            "password",
            "current-password",
            "",
            described,
        ),
    ]
    if change_password:
        inputs += [
            _input("new_password", "新密码", "password", "new-password", "", described),
            _input(
                "new_password_confirm", "再次输入新密码", "password", "new-password", "", described
            ),
            "<p>密码至少 8 位，包含大写字母、小写字母、数字和其他字符中的至少 3 类，"
            "且不能与最近 5 次使用过的密码相同。</p>",
        ]
    button = "修改密码并登录" if change_password else "登录"
    body = (
        f"<h1>{'修改密码' if change_password else '登录'}</h1>"
        f"<p>应用“{escape(client_name)}”请求以下权限：</p>{_scope_list(scopes)}{error}"
        f'<form method="post" action="authorize">{_hidden(fields)}{"".join(inputs)}'
        f'<button type="submit">{button}</button></form>'
    )
    return _document("登录", body)


def choose_patient_page(
    client_name: str,
    fields: Mapping[str, str],
    session_token: str,
    patients: Iterable[tuple[str, str]],
    *,
    message: str | None = None,
) -> str:
    """Which resident (the account holder or a child in their care) the app may act for."""
    options = "".join(
        f'<label class="radio"><input type="radio" name="patient" value="{escape(patient)}"'
        f"{' checked' if index == 0 else ''} required>"
        f"{escape(patient)}（{_RELATIONS.get(relation, escape(relation))}）</label>"
        for index, (patient, relation) in enumerate(patients)
    )
    body = (
        f"<h1>选择居民</h1><p>应用“{escape(client_name)}”将代表哪位居民访问健康档案？</p>"
        f"{_error(message)}"
        f'<form method="post" action="authorize">{_hidden(fields)}'
        f'<input type="hidden" name="login_session" value="{escape(session_token)}">'
        f"<fieldset><legend>居民</legend>{options}</fieldset>"
        '<button type="submit">继续</button></form>'
    )
    return _document("选择居民", body)


def error_page(message: str) -> str:
    body = f'<h1>无法处理授权请求</h1><p class="error" role="alert">{escape(message)}</p>'
    return _document("授权错误", body)


def describe_scope(scope: str) -> str:
    """A scope in words a resident understands."""
    if scope in NON_RESOURCE_SCOPES:
        return _OTHER_SCOPES.get(scope, scope)
    parsed = parse_scope(scope)
    actions = "、".join(word for letter, word in _ACTIONS.items() if letter in parsed.interactions)
    data = "全部数据" if parsed.resource_type == "*" else f"{parsed.resource_type} 数据"
    return f"{actions}{_CONTEXTS[parsed.context]}{data}"


def _document(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="zh-CN"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · CityHealth</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def _error(message: str | None) -> str:
    return f'<p class="error" id="error" role="alert">{escape(message)}</p>' if message else ""


def _input(name: str, label: str, kind: str, autocomplete: str, value: str, extra: str) -> str:
    return (
        f'<label for="{name}">{label}</label>'
        f'<input id="{name}" name="{name}" type="{kind}" autocomplete="{autocomplete}" '
        f'value="{escape(value)}" required{extra}>'
    )


def _hidden(fields: Mapping[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, value in fields.items()
    )


def _scope_list(scopes: Sequence[str]) -> str:
    items = "".join(
        f"<li>{escape(describe_scope(scope))}（<code>{escape(scope)}</code>）</li>"
        for scope in scopes
    )
    return f"<ul>{items}</ul>"
