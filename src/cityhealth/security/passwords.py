"""Password hashing (argon2id), the password policy and login lockout, as pure functions.

The policy follows 等保 2.0 level 3: at least 8 characters from 3 of the 4 character classes,
changed at least every 90 days, none of the last 5 reused, and 15 minutes of lockout after 5
consecutive failures. Every check takes its time as an argument, so callers and tests decide
what "now" is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# OWASP Password Storage Cheat Sheet, argon2id: 19 MiB, 2 iterations, 1 lane. The smaller of its
# equivalent settings keeps memory bounded when many residents log in at once.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16)

# A username this short ("li", "wu") would refuse too many good passwords if it were forbidden.
_MIN_USERNAME_CHECKED = 3


@dataclass(frozen=True)
class PasswordPolicy:
    min_length: int = 8
    min_classes: int = 3
    max_age_days: int = 90
    history: int = 5
    max_failures: int = 5
    lockout_minutes: int = 15
    max_length: int = 128


@dataclass(frozen=True)
class PolicyViolation:
    """One reason a password is refused, for the portal (Chinese) and the API (English)."""

    code: str
    message_zh: str
    message_en: str


@dataclass(frozen=True)
class LoginState:
    """Consecutive failed logins of one account and the end of its lock, if any."""

    failures: int = 0
    locked_until: datetime | None = None


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when the password matches; a wrong password or a corrupt hash both refuse it."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters: rehash it at the next good login."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


def character_classes(password: str) -> int:
    """How many of lower case, upper case, digits and other characters the password uses."""
    lower = any(c.islower() for c in password)
    upper = any(c.isupper() for c in password)
    digit = any(c.isdecimal() for c in password)
    other = any(not (c.islower() or c.isupper() or c.isdecimal()) for c in password)
    return lower + upper + digit + other


def check_strength(
    policy: PasswordPolicy,
    password: str,
    *,
    username: str | None = None,
    previous_hashes: Iterable[str] = (),
) -> list[PolicyViolation]:
    """Every reason the policy refuses `password`; an empty list accepts it.

    `previous_hashes` are the account's earlier password hashes, newest first; only the first
    `policy.history` of them are checked.
    """
    violations: list[PolicyViolation] = []
    if len(password) < policy.min_length:
        violations.append(
            PolicyViolation(
                "too_short",
                f"密码至少需要 {policy.min_length} 个字符。",
                f"The password must have at least {policy.min_length} characters.",
            )
        )
    if len(password) > policy.max_length:
        violations.append(
            PolicyViolation(
                "too_long",
                f"密码不能超过 {policy.max_length} 个字符。",
                f"The password must have at most {policy.max_length} characters.",
            )
        )
    if character_classes(password) < policy.min_classes:
        violations.append(
            PolicyViolation(
                "too_few_classes",
                f"密码须包含小写字母、大写字母、数字和其他字符中的至少 {policy.min_classes} 类。",
                f"The password must use at least {policy.min_classes} of: lower case, "
                "upper case, digits, other characters.",
            )
        )
    if (
        username
        and len(username) >= _MIN_USERNAME_CHECKED
        and username.casefold() in password.casefold()
    ):
        violations.append(
            PolicyViolation(
                "contains_username",
                "密码不能包含用户名。",
                "The password must not contain the username.",
            )
        )
    recent = islice(previous_hashes, policy.history)
    if any(verify_password(old, password) for old in recent):
        violations.append(
            PolicyViolation(
                "reused",
                f"不能使用最近 {policy.history} 次用过的密码。",
                f"The password must differ from the last {policy.history} passwords.",
            )
        )
    return violations


def is_expired(policy: PasswordPolicy, changed_at: datetime, now: datetime) -> bool:
    """True once the password is `max_age_days` old: it must be changed before the next use."""
    return _aware(now) - _aware(changed_at) >= timedelta(days=policy.max_age_days)


def is_locked(state: LoginState, now: datetime) -> bool:
    return state.locked_until is not None and _aware(now) < state.locked_until


def register_failure(policy: PasswordPolicy, state: LoginState, now: datetime) -> LoginState:
    """The state after a failed login at `now`.

    The `max_failures`-th consecutive failure locks the account for `lockout_minutes`. A
    failure during a lock leaves the lock as it is (callers refuse locked accounts before
    checking the password); after a lock has run out, counting starts again.
    """
    if is_locked(state, now):
        return state
    failures = 1 if state.locked_until is not None else state.failures + 1
    if failures >= policy.max_failures:
        return LoginState(failures, now + timedelta(minutes=policy.lockout_minutes))
    return LoginState(failures, None)


def register_success(state: LoginState) -> LoginState:
    """A good login ends the run of failures."""
    return LoginState()


def _aware(moment: datetime) -> datetime:
    # Naive datetimes are ambiguous (server local time or UTC?) and would compare wrongly.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"datetime without a time zone: {moment!r}")
    return moment
