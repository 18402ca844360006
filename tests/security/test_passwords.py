"""Password hashing, the 等保 level-3 password policy and login lockout."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from argon2 import PasswordHasher

from cityhealth.security.passwords import (
    LoginState,
    PasswordPolicy,
    check_strength,
    hash_password,
    is_expired,
    is_locked,
    needs_rehash,
    register_failure,
    register_success,
    verify_password,
)

POLICY = PasswordPolicy()
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def codes(
    password: str, *, username: str | None = None, previous_hashes: Sequence[str] = ()
) -> list[str]:
    violations = check_strength(
        POLICY, password, username=username, previous_hashes=previous_hashes
    )
    return [v.code for v in violations]


def test_policy_defaults() -> None:
    assert (POLICY.min_length, POLICY.min_classes, POLICY.max_age_days) == (8, 3, 90)
    assert (POLICY.history, POLICY.max_failures, POLICY.lockout_minutes) == (5, 5, 15)


def test_hash_is_argon2id_and_verifies() -> None:
    stored = hash_password("Zhongwei-2026")
    assert stored.startswith("$argon2id$")
    assert "m=19456,t=2,p=1" in stored
    assert stored != hash_password("Zhongwei-2026")  # salted
    assert verify_password(stored, "Zhongwei-2026")
    assert not verify_password(stored, "zhongwei-2026")
    assert not verify_password("not a hash", "Zhongwei-2026")


def test_needs_rehash_when_parameters_change() -> None:
    assert not needs_rehash(hash_password("Zhongwei-2026"))
    weaker = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("Zhongwei-2026")
    assert verify_password(weaker, "Zhongwei-2026")
    assert needs_rehash(weaker)
    assert needs_rehash("not a hash")


def test_good_password_passes() -> None:
    assert check_strength(POLICY, "Zhongwei-2026", username="wangfang") == []


def test_too_short_and_exactly_minimum() -> None:
    assert codes("Ab1!xyz") == ["too_short"]
    assert codes("Ab1!xyzw") == []


def test_too_long_and_exactly_maximum() -> None:
    assert codes("Ab1!" + "x" * 125) == ["too_long"]
    assert codes("Ab1!" + "x" * 124) == []


@pytest.mark.parametrize(
    ("password", "ok"),
    [
        ("abcdefgh12", False),  # lower + digit
        ("ABCDEFGH!!", False),  # upper + other
        ("abcdefghij", False),  # lower only
        ("abcdEFGH12", True),  # lower + upper + digit
        ("abcdefg#12", True),  # lower + other + digit
        ("ABCDEFG#12", True),  # upper + other + digit
        ("abcdEFG#hi", True),  # lower + upper + other
        ("密码安全abc123", True),  # Chinese characters count as "other"
    ],
)
def test_character_classes(password: str, ok: bool) -> None:
    assert codes(password) == ([] if ok else ["too_few_classes"])


def test_min_classes_is_a_setting() -> None:
    assert check_strength(PasswordPolicy(min_classes=2), "abcdefgh12") == []


def test_contains_username_in_any_case() -> None:
    assert codes("WangFang#2026", username="wangfang") == ["contains_username"]
    assert codes("Zhongwei-2026", username="wangfang") == []
    # Very short usernames are not checked: "li" would refuse half the dictionary.
    assert codes("Linglong#2026", username="li") == []


def test_violations_carry_both_languages() -> None:
    violations = check_strength(POLICY, "abc", username="abc")
    assert [v.code for v in violations] == ["too_short", "too_few_classes", "contains_username"]
    for violation in violations:
        assert any("\u4e00" <= c <= "\u9fff" for c in violation.message_zh)
        assert violation.message_en.isascii() and violation.message_en.startswith("The password")
    assert "8" in violations[0].message_zh and "8" in violations[0].message_en


def test_each_of_the_last_five_passwords_is_refused_but_not_the_sixth() -> None:
    passwords = [f"Zhongwei-{year}" for year in range(2026, 2020, -1)]  # newest first
    history = [hash_password(p) for p in passwords]
    for password in passwords[:5]:
        assert codes(password, previous_hashes=history) == ["reused"], password
    assert codes(passwords[5], previous_hashes=history) == []
    assert codes("Brand-new-2027", previous_hashes=history) == []
    reuse = check_strength(POLICY, passwords[0], previous_hashes=history)[0]
    assert "5" in reuse.message_zh


def test_expiry_at_ninety_days() -> None:
    assert not is_expired(POLICY, T0, T0 + timedelta(days=90) - timedelta(seconds=1))
    assert is_expired(POLICY, T0, T0 + timedelta(days=90))
    assert not is_expired(PasswordPolicy(max_age_days=180), T0, T0 + timedelta(days=90))


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        is_expired(POLICY, T0.replace(tzinfo=None), T0)


def fail(times: int, state: LoginState = LoginState(), at: datetime = T0) -> LoginState:
    for _ in range(times):
        state = register_failure(POLICY, state, at)
    return state


def test_lock_at_exactly_the_fifth_failure() -> None:
    four = fail(4)
    assert four.failures == 4 and not is_locked(four, T0)
    five = register_failure(POLICY, four, T0)
    assert is_locked(five, T0)
    assert five.locked_until == T0 + timedelta(minutes=15)


def test_lock_is_released_after_fifteen_minutes() -> None:
    locked = fail(5)
    assert is_locked(locked, T0 + timedelta(minutes=15) - timedelta(seconds=1))
    assert not is_locked(locked, T0 + timedelta(minutes=15))


def test_failures_during_a_lock_do_not_extend_it() -> None:
    locked = fail(5)
    again = register_failure(POLICY, locked, T0 + timedelta(minutes=10))
    assert again == locked


def test_counting_restarts_after_a_lock_runs_out() -> None:
    later = T0 + timedelta(minutes=15)
    state = fail(4, fail(5), later)
    assert not is_locked(state, later)
    assert is_locked(register_failure(POLICY, state, later), later)


def test_success_resets_the_failures() -> None:
    state = register_success(fail(4))
    assert state == LoginState()
    assert not is_locked(fail(4, state), T0)


def test_lockout_settings() -> None:
    policy = PasswordPolicy(max_failures=3, lockout_minutes=30)
    state = LoginState()
    for _ in range(3):
        state = register_failure(policy, state, T0)
    assert state.locked_until == T0 + timedelta(minutes=30)
