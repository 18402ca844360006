"""Accounts, passwords, lockout, guardians, clients and sessions, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update
from typer.testing import CliRunner

from cityhealth.config import get_settings
from cityhealth.db import Database
from cityhealth.fhir.schema import metadata
from cityhealth.security.accounts import (
    GUARDIAN,
    MUST_CHANGE,
    OK,
    REFUSED,
    SELF,
    AccountError,
    Accounts,
    PasswordRejected,
)
from cityhealth.security.cli import users
from cityhealth.security.clients import ClientError
from cityhealth.security.passwords import verify_password
from cityhealth.security.roles import (
    MANAGE_ACCOUNTS,
    READ_AUDIT,
    ROLES,
    limit_scopes,
)
from cityhealth.security.schema import TABLES, oauth_client
from cityhealth.security.schema import account as account_table
from cityhealth.security.scopes import allows, parse_scopes
from cityhealth.security.tokens import token_digest
from manual_clock import ManualClock

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
GOOD = "Zhongwei-2026"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def accounts(database: Database, clock: ManualClock) -> Accounts:
    return Accounts(database, clock=clock)


def unique() -> str:
    return uuid.uuid4().hex[:10]


def resident(accounts: Accounts, password: str = GOOD, name: str | None = None) -> str:
    username = name or f"r{unique()}"
    accounts.create_account(
        username,
        password,
        role="resident",
        display_name="马丽",
        fhir_user=f"Patient/{unique()}",
    )
    return username


def test_the_migration_creates_the_schema_as_declared(database: Database) -> None:
    with database.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    names = {table.name for table in TABLES}
    assert [d for d in differences if any(name in repr(d) for name in names)] == []


def test_a_resident_acts_for_their_own_patient(accounts: Accounts) -> None:
    patient = f"Patient/{unique()}"
    account = accounts.create_account(
        f"Ma{unique()}", GOOD, role="resident", display_name="马丽", fhir_user=patient
    )
    assert account.username == account.username.casefold()
    assert account.role == "resident"
    assert account.active
    assert [(link.patient, link.relation) for link in accounts.patients(account.id)] == [
        (patient, SELF)
    ]


@pytest.mark.parametrize(
    ("role", "fhir_user", "organization", "kind", "complaint"),
    [
        ("doctor", "Patient/1", "Organization/1", None, "Practitioner"),
        ("doctor", "Practitioner/1", None, None, "organization"),
        ("resident", "Patient/1", "Organization/1", None, "does not act"),
        ("regulator", "Practitioner/1", "Organization/1", None, "kind"),
        ("regulator", "Practitioner/1", "Organization/1", "police", "kind"),
        ("nurse", "Practitioner/1", "Organization/1", "cdc", "no kinds"),
        ("system", "Device/1", None, None, "unknown role"),
        ("chief", "Practitioner/1", None, None, "unknown role"),
        ("doctor", "Practitioner/1", "Hospital/1", None, "Organization"),
        ("resident", "Patient/有", None, None, "Patient"),
    ],
)
def test_role_resource_and_organization_must_agree(
    accounts: Accounts,
    role: str,
    fhir_user: str,
    organization: str | None,
    kind: str | None,
    complaint: str,
) -> None:
    with pytest.raises(AccountError, match=complaint):
        accounts.create_account(
            f"u{unique()}",
            GOOD,
            role=role,
            display_name="某人",
            fhir_user=fhir_user,
            organization=organization,
            role_kind=kind,
        )


def test_a_regulator_names_their_kind(accounts: Accounts) -> None:
    account = accounts.create_account(
        f"cdc{unique()}",
        GOOD,
        role="regulator",
        display_name="疾控",
        fhir_user=f"Practitioner/{unique()}",
        organization="Organization/cdc",
        role_kind="cdc",
    )
    assert (account.role_kind, account.organization) == ("cdc", "Organization/cdc")


def test_weak_passwords_and_duplicates_are_refused(accounts: Accounts) -> None:
    with pytest.raises(PasswordRejected) as refused:
        resident(accounts, password="short")
    assert {v.code for v in refused.value.violations} >= {"too_short", "too_few_classes"}
    name = resident(accounts)
    with pytest.raises(AccountError, match="already has an account"):
        resident(accounts, name=name.upper())  # user names are case-insensitive
    patient = f"Patient/{unique()}"
    accounts.create_account(
        f"a{unique()}", GOOD, role="resident", display_name="甲", fhir_user=patient
    )
    with pytest.raises(AccountError, match="already has an account"):
        accounts.create_account(
            f"b{unique()}", GOOD, role="resident", display_name="乙", fhir_user=patient
        )


def test_login_outcomes_and_their_reasons(accounts: Accounts) -> None:
    name = resident(accounts)
    assert accounts.authenticate(name, GOOD).outcome == OK
    wrong = accounts.authenticate(name, "Wrong-password-1")
    unknown = accounts.authenticate(f"nobody{unique()}", GOOD)
    assert (wrong.outcome, wrong.reason) == (REFUSED, "bad_password")
    assert (unknown.outcome, unknown.reason, unknown.account) == (REFUSED, "unknown_user", None)


def test_five_failures_lock_the_account_for_fifteen_minutes(
    accounts: Accounts, clock: ManualClock
) -> None:
    name = resident(accounts)
    for attempt in range(5):
        result = accounts.authenticate(name, f"Wrong-password-{attempt}")
        assert result.reason == "bad_password"
    assert result.locked_until == T0 + timedelta(minutes=15)
    # Locked: even the right password is refused, as a wrong one is; the reason tells why.
    locked = accounts.authenticate(name, GOOD)
    assert (locked.outcome, locked.reason) == (REFUSED, "locked")
    clock.advance(minutes=14, seconds=59)
    assert accounts.authenticate(name, GOOD).reason == "locked"
    clock.advance(seconds=1)
    released = accounts.authenticate(name, GOOD)
    assert released.outcome == OK
    assert released.account is not None and released.account.failures == 0


def test_a_good_login_ends_a_run_of_failures(accounts: Accounts) -> None:
    name = resident(accounts)
    for attempt in range(4):
        accounts.authenticate(name, f"Wrong-password-{attempt}")
    assert accounts.authenticate(name, GOOD).outcome == OK
    for attempt in range(4):
        accounts.authenticate(name, f"Wrong-password-{attempt}")
    assert accounts.authenticate(name, GOOD).outcome == OK


def test_an_expired_password_must_be_changed(accounts: Accounts, clock: ManualClock) -> None:
    name = resident(accounts)
    clock.advance(days=89)
    assert accounts.authenticate(name, GOOD).outcome == OK
    clock.advance(days=1)
    expired = accounts.authenticate(name, GOOD)
    assert (expired.outcome, expired.reason) == (MUST_CHANGE, "password_expired")
    # A wrong password is still just refused: expiry is told only to the owner.
    assert accounts.authenticate(name, "Wrong-password-1").outcome == REFUSED
    changed = accounts.change_password(name, GOOD, "New-password-2026")
    assert changed.outcome == OK
    assert accounts.authenticate(name, "New-password-2026").outcome == OK


def test_password_changes_follow_the_policy_and_history(accounts: Accounts) -> None:
    name = resident(accounts)
    refused = accounts.change_password(name, "Wrong-password-1", "Other-password-1")
    assert refused.outcome == REFUSED
    with pytest.raises(PasswordRejected, match="at least 8"):
        accounts.change_password(name, GOOD, "Ab1!")
    with pytest.raises(PasswordRejected) as same:
        accounts.change_password(name, GOOD, GOOD)
    assert [v.code for v in same.value.violations] == ["reused"]
    passwords = [GOOD] + [f"Rotation-{n}-pass" for n in range(1, 6)]
    for old, new in pairwise(passwords):
        assert accounts.change_password(name, old, new).outcome == OK
    current = passwords[-1]
    for recent in passwords[-5:]:  # the current and the four before it
        if recent != current:
            with pytest.raises(PasswordRejected, match="last 5"):
                accounts.change_password(name, current, recent)
    # The sixth-last may come back.
    assert accounts.change_password(name, current, passwords[0]).outcome == OK


def test_setting_a_password_ends_a_lockout(accounts: Accounts) -> None:
    name = resident(accounts)
    for attempt in range(5):
        accounts.authenticate(name, f"Wrong-password-{attempt}")
    account = accounts.account_by_username(name)
    assert account is not None
    accounts.set_password(account.id, "Reset-password-9")
    assert accounts.authenticate(name, "Reset-password-9").outcome == OK


def test_a_guardian_acts_for_a_child(accounts: Accounts) -> None:
    name = resident(accounts)
    guardian = accounts.account_by_username(name)
    assert guardian is not None
    child = f"Patient/{unique()}"
    accounts.link_guardian(guardian.id, child)
    links = accounts.patients(guardian.id)
    assert [(link.patient, link.relation) for link in links] == [
        (guardian.fhir_user, SELF),
        (child, GUARDIAN),
    ]
    with pytest.raises(AccountError, match="already acts"):
        accounts.link_guardian(guardian.id, child)
    with pytest.raises(AccountError, match="not a Patient"):
        accounts.link_guardian(guardian.id, "Practitioner/1")
    doctor = accounts.create_account(
        f"d{unique()}",
        GOOD,
        role="doctor",
        display_name="王医生",
        fhir_user=f"Practitioner/{unique()}",
        organization="Organization/1",
    )
    with pytest.raises(AccountError, match="resident"):
        accounts.link_guardian(doctor.id, child)


def test_a_confidential_client_secret_is_shown_once_and_stored_hashed(
    accounts: Accounts, database: Database
) -> None:
    client_id = f"his-{unique()}"
    client, secret = accounts.create_client(
        client_id,
        name="市人民医院 HIS",
        kind="confidential",
        scopes="system/*.read",
        role="system",
        organization="Organization/1",
    )
    assert secret and client.kind == "confidential" and client.role == "system"
    with database.read() as conn:
        stored = conn.scalar(
            select(oauth_client.c.secret_hash).where(oauth_client.c.client_id == client_id)
        )
    assert stored and secret not in stored and verify_password(stored, secret)
    assert accounts.authenticate_client(client_id, secret) == client
    assert accounts.authenticate_client(client_id, secret + "x") is None
    assert accounts.authenticate_client(f"nobody-{unique()}", secret) is None


def test_client_registration_rules(accounts: Accounts) -> None:
    client, secret = accounts.create_client(
        f"app-{unique()}",
        name="健康中卫",
        kind="public",
        redirect_uris=["https://app.example/callback"],
        scopes="patient/*.read launch/patient offline_access",
    )
    assert secret is None and client.redirect_uris == ("https://app.example/callback",)
    assert accounts.authenticate_client(client.client_id, "anything") is None
    refusals = [
        ({"kind": "public", "scopes": "patient/*.read"}, "redirect URI"),
        ({"kind": "public", "redirect_uris": ["https://a/#x"], "scopes": ""}, "fragment"),
        ({"kind": "public", "redirect_uris": ["https://a/cb"], "scopes": "x"}, "malformed"),
        (
            {"kind": "public", "redirect_uris": ["https://a/cb"], "scopes": "", "role": "system"},
            "confidential",
        ),
        ({"kind": "confidential", "scopes": "", "role": "doctor"}, "role"),
        ({"kind": "secret", "scopes": ""}, "public or confidential"),
    ]
    for details, complaint in refusals:
        with pytest.raises(ClientError, match=complaint):
            accounts.create_client(f"c-{unique()}", name="x", **details)  # type: ignore[arg-type]
    with pytest.raises(ClientError, match="already exists"):
        accounts.create_client(
            client.client_id, name="x", kind="public", redirect_uris=["https://a/cb"], scopes=""
        )


def test_sessions_expire_after_thirty_idle_minutes(accounts: Accounts, clock: ManualClock) -> None:
    account = accounts.account_by_username(resident(accounts))
    assert account is not None
    session = token_digest(accounts.create_session(account.id))
    for _ in range(3):  # being seen keeps it alive, well past 30 minutes in all
        clock.advance(minutes=29)
        assert accounts.touch_session(session) == account.id
    clock.advance(minutes=30)
    assert accounts.touch_session(session) is None
    clock.advance(minutes=-29)  # ended for good, even for a clock that went back
    assert accounts.touch_session(session) is None
    other = token_digest(accounts.create_session(account.id))
    accounts.revoke_session(other)
    assert accounts.touch_session(other) is None
    assert accounts.touch_session(token_digest("not a session")) is None


def test_a_deactivated_account_can_neither_sign_in_nor_keep_its_sessions(
    accounts: Accounts, database: Database
) -> None:
    name = resident(accounts)
    account = accounts.account_by_username(name)
    assert account is not None
    session = token_digest(accounts.create_session(account.id))
    with database.write() as conn:
        conn.execute(
            update(account_table).where(account_table.c.id == account.id).values(active=False)
        )
    inactive = accounts.authenticate(name, GOOD)
    assert (inactive.outcome, inactive.reason) == (REFUSED, "inactive")
    assert accounts.touch_session(session) is None


def test_revoked_access_tokens_are_remembered(accounts: Accounts) -> None:
    jti = unique()
    assert not accounts.is_revoked(jti)
    accounts.revoke_access_token(jti, T0 + timedelta(minutes=5))
    accounts.revoke_access_token(jti, T0 + timedelta(minutes=5))  # twice is fine
    assert accounts.is_revoked(jti)


# Roles


def test_scopes_are_limited_to_the_role_and_keep_their_syntax() -> None:
    resident_maximum = ROLES["resident"].max_scopes
    assert limit_scopes("patient/*.* launch/patient openid", resident_maximum) == (
        "patient/*.read",
        "patient/Consent.write",
        "launch/patient",
    )
    assert limit_scopes("patient/Observation.rs user/*.read", resident_maximum) == (
        "patient/Observation.rs",
    )
    assert limit_scopes("user/*.*", ROLES["doctor"].max_scopes) == ("user/*.*",)
    assert limit_scopes("user/*.cruds", ROLES["regulator"].max_scopes) == ("user/*.rs",)
    assert limit_scopes("system/*.*", ROLES["doctor"].max_scopes) == ()
    with pytest.raises(ValueError, match="malformed"):
        limit_scopes("patient/*.everything", resident_maximum)


def test_the_separated_administrators() -> None:
    security, audit = ROLES["security_admin"], ROLES["audit_admin"]
    clinical = ("Patient", "Observation", "Condition", "MedicationRequest", "Consent")
    for admin in (security, audit):
        scopes = parse_scopes(admin.max_scopes).resource
        for resource_type in clinical:
            assert not any(allows(scopes, resource_type, i) for i in ("read", "search", "create"))
    assert allows(parse_scopes(audit.max_scopes).resource, "AuditEvent", "search")
    assert [r.code for r in ROLES.values() if MANAGE_ACCOUNTS in r.duties] == ["security_admin"]
    assert [r.code for r in ROLES.values() if READ_AUDIT in r.duties] == ["audit_admin"]
    resident_scopes = parse_scopes(ROLES["resident"].max_scopes).resource
    assert allows(resident_scopes, "Consent", "create")
    assert not allows(resident_scopes, "Observation", "create")
    for role in ROLES.values():
        assert role.name_zh and role.name_en
        parse_scopes(role.max_scopes)


# Command line


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[CliRunner]:
    monkeypatch.setenv("CITYHEALTH_DATABASE_URL", f"sqlite:///{tmp_path / 'users.db'}")
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_the_users_command(runner: CliRunner) -> None:
    twice = f"{GOOD}\n{GOOD}\n"
    created = runner.invoke(
        users,
        ["create", "mali", "--role", "resident", "--name", "马丽", "--fhir-user", "Patient/p1"],
        input=twice,
    )
    assert created.exit_code == 0, created.output
    assert GOOD not in created.output
    weak = runner.invoke(
        users,
        ["create", "wu", "--role", "resident", "--name", "吴", "--fhir-user", "Patient/p2"],
        input="weak\nweak\n",
    )
    assert weak.exit_code == 1 and "at least 8" in weak.output
    assert "Traceback" not in weak.output
    linked = runner.invoke(users, ["link-guardian", "mali", "Patient/child-1"])
    assert linked.exit_code == 0, linked.output
    changed = runner.invoke(users, ["passwd", "mali"], input="Second-pass-1\nSecond-pass-1\n")
    assert changed.exit_code == 0, changed.output
    missing = runner.invoke(users, ["passwd", "nobody"], input=twice)
    assert missing.exit_code == 1 and "no account" in missing.output
    client = runner.invoke(
        users,
        ["client-create", "his-1", "--name", "HIS", "--scope", "system/*.read", "--role", "system"],
    )
    assert client.exit_code == 0, client.output
    secret = client.output.split("client_secret: ")[1].split()[0]
    assert len(secret) >= 43
    listed = runner.invoke(users, ["list"])
    assert listed.exit_code == 0 and "mali" in listed.output and "居民" in listed.output
    assert secret not in listed.output
