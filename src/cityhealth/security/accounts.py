"""Accounts, OAuth clients (clients.py), login sessions and revoked access tokens.

Passwords follow the policy of passwords.py (等保 level 3). A login refuses a locked account
exactly as it refuses a wrong password, so a caller learns nothing from the answer, while the
`LoginResult` says why for the audit trail. Slow work (argon2) runs outside transactions; the
failure count is read again and updated inside one, so concurrent attempts all count.

A session is named by the digest of its token (its `session_id`); the token is never stored.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError

from cityhealth.db import Database
from cityhealth.security import clients
from cityhealth.security.clients import OAuthClient, equal_time_refusal
from cityhealth.security.keys import Clock, utc_now
from cityhealth.security.passwords import (
    LoginState,
    PasswordPolicy,
    PolicyViolation,
    check_strength,
    hash_password,
    is_expired,
    is_locked,
    needs_rehash,
    register_failure,
    verify_password,
)
from cityhealth.security.revocations import RevokedTokens
from cityhealth.security.roles import ROLES, check_person, is_reference
from cityhealth.security.schema import (
    account,
    account_password_history,
    account_patient,
    from_us,
    from_us_or_none,
    login_session,
    refresh_token,
    revoked_token,
    to_us,
)
from cityhealth.security.tokens import new_opaque_token, token_digest

_USERNAME = re.compile(r"[\w.@+-]{2,64}")

OK, MUST_CHANGE, REFUSED = "ok", "must_change_password", "refused"
SELF, GUARDIAN = "self", "guardian"


@dataclass(frozen=True)
class SecuritySettings:
    """Settings of accounts, sessions and tokens (mapped from CITYHEALTH_* by the app)."""

    issuer: str = "http://127.0.0.1:8000"  # public base URL of the authorization server
    audience: str = "http://127.0.0.1:8000/fhir"  # the FHIR base URL tokens are for
    access_token_minutes: int = 5
    refresh_token_days: int = 30  # each refresh rotates the token and restarts this
    session_idle_minutes: int = 30
    code_seconds: int = 60
    portal_client_id: str = "portal"  # always gets a refresh token bound to the session
    # Login attempts (POST /oauth/authorize) per minute and username, and token requests per
    # minute and confidential client; per client address more, since a hospital's staff share
    # one address behind its NAT.
    attempts_per_minute: int = 10
    attempts_per_minute_per_address: int = 60
    password_policy: PasswordPolicy = field(default_factory=PasswordPolicy)


@dataclass(frozen=True)
class Account:
    id: str
    username: str
    display_name: str
    role: str
    role_kind: str | None
    fhir_user: str
    organization: str | None
    active: bool
    failures: int
    locked_until: datetime | None
    password_changed_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class LoginResult:
    """`outcome` is what the caller may act on; `reason` is for the audit trail only."""

    outcome: str  # OK, MUST_CHANGE or REFUSED
    reason: str  # ok, password_expired, unknown_user, inactive, locked, bad_password
    account: Account | None = None
    locked_until: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == OK


@dataclass(frozen=True)
class PatientLink:
    patient: str  # "Patient/…"
    relation: str  # SELF or GUARDIAN


class AccountError(ValueError):
    """The request is refused; the message says why (English, for the CLI and logs)."""


class PasswordRejected(AccountError):
    def __init__(self, violations: Sequence[PolicyViolation]) -> None:
        super().__init__(" ".join(v.message_en for v in violations))
        self.violations = tuple(violations)


def normalize_username(username: str) -> str:
    """One spelling per name: full-width and case variants of a username are the same."""
    return unicodedata.normalize("NFKC", username).strip().casefold()


class Accounts:
    def __init__(
        self, db: Database, settings: SecuritySettings | None = None, clock: Clock = utc_now
    ) -> None:
        self.db = db
        self.settings = settings or SecuritySettings()
        self.clock = clock
        self._revoked = RevokedTokens()

    @property
    def policy(self) -> PasswordPolicy:
        return self.settings.password_policy

    # Accounts

    def create_account(
        self,
        username: str,
        password: str,
        *,
        role: str,
        display_name: str,
        fhir_user: str,
        organization: str | None = None,
        role_kind: str | None = None,
    ) -> Account:
        """A new active account; a resident's account acts for their own Patient."""
        name = normalize_username(username)
        if not _USERNAME.fullmatch(name):
            raise AccountError("a username has 2 to 64 letters, digits or . @ + - _")
        if not display_name.strip():
            raise AccountError("a display name is required")
        try:
            check_person(role, fhir_user, organization, role_kind)
        except ValueError as error:
            raise AccountError(str(error)) from None
        violations = check_strength(self.policy, password, username=name)
        if violations:
            raise PasswordRejected(violations)
        password_hash = hash_password(password)
        now = to_us(self.clock())
        account_id = str(uuid.uuid4())
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(account).values(
                        id=account_id,
                        username=name,
                        display_name=display_name.strip(),
                        role=role,
                        role_kind=role_kind,
                        fhir_user=fhir_user,
                        organization=organization,
                        password_hash=password_hash,
                        password_changed_at=now,
                        failures=0,
                        active=True,
                        created_at=now,
                    )
                )
                conn.execute(
                    insert(account_password_history).values(
                        account_id=account_id, password_hash=password_hash, created_at=now
                    )
                )
                if ROLES[role].resource_type == "Patient":
                    conn.execute(
                        insert(account_patient).values(
                            account_id=account_id, patient=fhir_user, relation=SELF, created_at=now
                        )
                    )
        except IntegrityError:
            raise AccountError(f"username {name!r} or {fhir_user} already has an account") from None
        created = self.account(account_id)
        assert created is not None
        return created

    def account(self, account_id: str) -> Account | None:
        with self.db.read() as conn:
            row = conn.execute(select(account).where(account.c.id == account_id)).first()
        return _account(row) if row else None

    def account_by_username(self, username: str) -> Account | None:
        name = normalize_username(username)
        with self.db.read() as conn:
            row = conn.execute(select(account).where(account.c.username == name)).first()
        return _account(row) if row else None

    def list_accounts(self) -> list[Account]:
        with self.db.read() as conn:
            rows = conn.execute(select(account).order_by(account.c.username)).all()
        return [_account(row) for row in rows]

    # Passwords and login

    def authenticate(self, username: str, password: str) -> LoginResult:
        name = normalize_username(username)
        with self.db.read() as conn:
            row = conn.execute(select(account).where(account.c.username == name)).first()
        now = self.clock()
        refusal = _refusal_before_password(row, now)
        if refusal is not None:
            # The same work as a real check: the answer time must not tell why it failed.
            equal_time_refusal(password)
            return refusal
        assert row is not None
        good = verify_password(row.password_hash, password)
        rehashed = hash_password(password) if good and needs_rehash(row.password_hash) else None
        with self.db.write() as conn:
            current = conn.execute(
                select(account.c.failures, account.c.locked_until)
                .where(account.c.id == row.id)
                .with_for_update()
            ).one()
            state = LoginState(current.failures, from_us_or_none(current.locked_until))
            if is_locked(state, now):  # locked by a concurrent attempt meanwhile
                return LoginResult(REFUSED, "locked", _account(row), state.locked_until)
            if not good:
                state = register_failure(self.policy, state, now)
                conn.execute(
                    update(account)
                    .where(account.c.id == row.id)
                    .values(failures=state.failures, locked_until=_us_or_none(state.locked_until))
                )
                return LoginResult(REFUSED, "bad_password", _account(row), state.locked_until)
            values: dict[str, Any] = {"failures": 0, "locked_until": None}
            if rehashed:
                values["password_hash"] = rehashed
            conn.execute(update(account).where(account.c.id == row.id).values(**values))
        signed_in = self.account(row.id)
        assert signed_in is not None
        if is_expired(self.policy, signed_in.password_changed_at, now):
            return LoginResult(MUST_CHANGE, "password_expired", signed_in)
        return LoginResult(OK, "ok", signed_in)

    def change_password(self, username: str, current: str, new: str) -> LoginResult:
        """Change a password after checking the current one (which counts as a login).

        Returns the refusal when the current password is not accepted; `PasswordRejected`
        when the new one breaks the policy.
        """
        result = self.authenticate(username, current)
        if result.outcome == REFUSED or result.account is None:
            return result
        self.set_password(result.account.id, new)
        changed = self.account(result.account.id)
        return LoginResult(OK, "ok", changed)

    def set_password(self, account_id: str, new: str) -> None:
        """Set a password under the policy (no reuse of the last ones); ends any lock."""
        target = self.account(account_id)
        if target is None:
            raise AccountError(f"no account {account_id!r}")
        with self.db.read() as conn:
            previous = conn.scalars(
                select(account_password_history.c.password_hash)
                .where(account_password_history.c.account_id == account_id)
                .order_by(account_password_history.c.id.desc())
                .limit(self.policy.history)
            ).all()
        violations = check_strength(
            self.policy, new, username=target.username, previous_hashes=previous
        )
        if violations:
            raise PasswordRejected(violations)
        password_hash = hash_password(new)
        now = to_us(self.clock())
        history = account_password_history
        with self.db.write() as conn:
            conn.execute(
                update(account)
                .where(account.c.id == account_id)
                .values(
                    password_hash=password_hash,
                    password_changed_at=now,
                    failures=0,
                    locked_until=None,
                )
            )
            conn.execute(
                insert(history).values(
                    account_id=account_id, password_hash=password_hash, created_at=now
                )
            )
            kept = (
                select(history.c.id)
                .where(history.c.account_id == account_id)
                .order_by(history.c.id.desc())
                .limit(self.policy.history)
            )
            conn.execute(
                delete(history).where(
                    history.c.account_id == account_id, history.c.id.not_in(kept.scalar_subquery())
                )
            )

    # Patients an account acts for

    def link_guardian(self, guardian_id: str, patient: str) -> None:
        """Let a resident's account act for a child (`Patient/…`) as their guardian."""
        guardian = self.account(guardian_id)
        if guardian is None or ROLES[guardian.role].resource_type != "Patient":
            raise AccountError("a guardian must be a resident's account")
        if not is_reference(patient, "Patient"):
            raise AccountError(f"not a Patient reference: {patient!r}")
        if patient == guardian.fhir_user:
            raise AccountError("an account already acts for its own Patient")
        try:
            with self.db.write() as conn:
                conn.execute(
                    insert(account_patient).values(
                        account_id=guardian_id,
                        patient=patient,
                        relation=GUARDIAN,
                        created_at=to_us(self.clock()),
                    )
                )
        except IntegrityError:
            raise AccountError(f"the account already acts for {patient}") from None

    def patients(self, account_id: str) -> list[PatientLink]:
        """The patients the account acts for, itself first."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(account_patient.c.patient, account_patient.c.relation)
                .where(account_patient.c.account_id == account_id)
                .order_by(account_patient.c.created_at, account_patient.c.patient)
            ).all()
        links = [PatientLink(row.patient, row.relation) for row in rows]
        return sorted(links, key=lambda link: link.relation != SELF)

    # OAuth clients (clients.py)

    def create_client(
        self,
        client_id: str,
        *,
        name: str,
        kind: str,
        redirect_uris: Iterable[str] = (),
        scopes: str | Iterable[str],
        role: str | None = None,
        organization: str | None = None,
    ) -> tuple[OAuthClient, str | None]:
        """A new client, and the secret of a confidential one: shown once, stored hashed."""
        return clients.create_client(
            self.db,
            self.clock(),
            client_id,
            name=name,
            kind=kind,
            redirect_uris=redirect_uris,
            scopes=scopes,
            role=role,
            organization=organization,
        )

    def client(self, client_id: str) -> OAuthClient | None:
        return clients.find_client(self.db, client_id)

    def authenticate_client(self, client_id: str, secret: str) -> OAuthClient | None:
        return clients.authenticate_client(self.db, client_id, secret)

    # Login sessions

    def create_session(self, account_id: str) -> str:
        """A new session; returns its token (its digest is the `session_id`)."""
        token = new_opaque_token()
        now = to_us(self.clock())
        with self.db.write() as conn:
            conn.execute(
                insert(login_session).values(
                    digest=token_digest(token),
                    account_id=account_id,
                    created_at=now,
                    last_seen_at=now,
                )
            )
        return token

    def touch_session(self, session_id: str) -> str | None:
        """The account of a live session, marking it seen now; None once it has ended.

        A session ends when revoked, when its account is deactivated, or after
        `session_idle_minutes` without being seen; an idle one is revoked on the spot.
        """
        now = self.clock()
        idle_since = to_us(now - timedelta(minutes=self.settings.session_idle_minutes))
        live = and_(
            login_session.c.digest == session_id,
            login_session.c.revoked_at.is_(None),
            login_session.c.last_seen_at > idle_since,
            exists().where(account.c.id == login_session.c.account_id, account.c.active),
        )
        with self.db.write() as conn:
            account_id = conn.scalar(
                update(login_session)
                .where(live)
                .values(last_seen_at=to_us(now))
                .returning(login_session.c.account_id)
            )
            if account_id is None:
                self._revoke_session(conn, session_id, to_us(now))
        return account_id

    def revoke_session(self, session_id: str) -> None:
        """End a session and every refresh token issued in it (logout)."""
        with self.db.write() as conn:
            self._revoke_session(conn, session_id, to_us(self.clock()))

    @staticmethod
    def _revoke_session(conn: Connection, session_id: str, now: int) -> None:
        conn.execute(
            update(login_session)
            .where(login_session.c.digest == session_id, login_session.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        conn.execute(
            update(refresh_token)
            .where(refresh_token.c.session_id == session_id, refresh_token.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )

    # Access tokens revoked before they expire

    def revoke_access_token(self, jti: str, expires_at: datetime) -> None:
        try:
            with self.db.write() as conn:
                conn.execute(insert(revoked_token).values(jti=jti, expires_at=to_us(expires_at)))
        except IntegrityError:
            pass  # revoked already
        self._revoked.add(jti)

    def is_revoked(self, jti: str) -> bool:
        """Whether an access token was revoked before it expired. The list (short: tokens live
        minutes) is read again at most every second (revocations.py): a revocation made in
        another worker process takes effect within that time, one made here at once, and a
        request need not ask the database."""
        return self._revoked.contains(jti, self._unexpired_revocations)

    def revocations_fresh(self) -> bool:
        """Whether `is_revoked` will answer without the database."""
        return self._revoked.fresh()

    def _unexpired_revocations(self) -> set[str]:
        now = to_us(self.clock())
        with self.db.read() as conn:
            query = select(revoked_token.c.jti).where(revoked_token.c.expires_at > now)
            return set(conn.scalars(query))


def _refusal_before_password(row: Row[Any] | None, now: datetime) -> LoginResult | None:
    if row is None:
        return LoginResult(REFUSED, "unknown_user")
    if not row.active:
        return LoginResult(REFUSED, "inactive", _account(row))
    locked_until = from_us_or_none(row.locked_until)
    if is_locked(LoginState(row.failures, locked_until), now):
        return LoginResult(REFUSED, "locked", _account(row), locked_until)
    return None


def _us_or_none(moment: datetime | None) -> int | None:
    return None if moment is None else to_us(moment)


def _account(row: Row[Any]) -> Account:
    return Account(
        id=row.id,
        username=row.username,
        display_name=row.display_name,
        role=row.role,
        role_kind=row.role_kind,
        fhir_user=row.fhir_user,
        organization=row.organization,
        active=row.active,
        failures=row.failures,
        locked_until=from_us_or_none(row.locked_until),
        password_changed_at=from_us(row.password_changed_at),
        created_at=from_us(row.created_at),
    )
