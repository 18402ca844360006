"""Authorization codes and refresh tokens: one-time codes bound to PKCE, rotated refresh tokens.

Every refresh token descends from one authorization code and shares its family (the code's
digest). Presenting a code twice, or a refresh token that was already rotated, means someone
else holds a copy (RFC 6749 §4.1.2, RFC 9700 §4.14.2): the whole family is revoked, so neither
the thief nor the client can go on. Both are marked used by a conditional UPDATE, so of two
concurrent requests with the same token only one succeeds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from sqlalchemy import Connection, insert, select, update

from cityhealth.db import Database
from cityhealth.security.keys import Clock, utc_now
from cityhealth.security.schema import oauth_code, refresh_token, to_us
from cityhealth.security.tokens import new_opaque_token, token_digest, verify_pkce

log = logging.getLogger("cityhealth.security")


class GrantError(Exception):
    """The code or refresh token is not accepted (`invalid_grant`); `reason` is for logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """What a code or refresh token stands for."""

    client_id: str
    account_id: str | None
    session_id: str | None
    scopes: tuple[str, ...]
    patient: str | None  # id of the Patient in context
    family: str = ""


class Grants:
    def __init__(
        self,
        db: Database,
        *,
        code_seconds: int = 60,
        refresh_days: int = 30,
        clock: Clock = utc_now,
    ) -> None:
        self.db = db
        self.code_lifetime = timedelta(seconds=code_seconds)
        self.refresh_lifetime = timedelta(days=refresh_days)
        self.clock = clock

    def issue_code(self, grant: Grant, *, redirect_uri: str, code_challenge: str) -> str:
        if grant.account_id is None or grant.session_id is None:
            raise ValueError("a code is issued to a signed-in account")
        code = new_opaque_token()
        with self.db.write() as conn:
            conn.execute(
                insert(oauth_code).values(
                    digest=token_digest(code),
                    client_id=grant.client_id,
                    account_id=grant.account_id,
                    session_id=grant.session_id,
                    redirect_uri=redirect_uri,
                    scope=" ".join(grant.scopes),
                    patient=grant.patient,
                    code_challenge=code_challenge,
                    expires_at=to_us(self.clock() + self.code_lifetime),
                )
            )
        return code

    def redeem_code(self, code: str, *, client_id: str, redirect_uri: str, verifier: str) -> Grant:
        """The grant of a code presented for the first time with its PKCE verifier."""
        digest = token_digest(code)
        now = self.clock()
        with self.db.read() as conn:
            row = conn.execute(select(oauth_code).where(oauth_code.c.digest == digest)).first()
        if row is None:
            raise GrantError("unknown code")
        if row.used_at is not None:
            self._revoke_family(digest, "code reused")
        if row.client_id != client_id:
            raise GrantError("code issued to another client")
        if row.expires_at <= to_us(now):
            raise GrantError("code expired")
        if row.redirect_uri != redirect_uri:
            raise GrantError("redirect_uri differs from the authorization request")
        if not verify_pkce(verifier, row.code_challenge, "S256"):
            raise GrantError("code_verifier does not match the code_challenge")
        with self.db.write() as conn:
            used = conn.execute(
                update(oauth_code)
                .where(oauth_code.c.digest == digest, oauth_code.c.used_at.is_(None))
                .values(used_at=to_us(now))
            ).rowcount
        if used != 1:
            self._revoke_family(digest, "code reused")
        return Grant(
            row.client_id,
            row.account_id,
            row.session_id,
            tuple(row.scope.split()),
            row.patient,
            family=digest,
        )

    def issue_refresh(self, grant: Grant) -> str:
        """A refresh token for `grant` (its family set: the code's digest)."""
        token = new_opaque_token()
        with self.db.write() as conn:
            self._insert_refresh(conn, token, grant)
        return token

    def refresh_grant(self, token: str, *, client_id: str) -> Grant:
        """The grant of a live refresh token of `client_id`, without using it up."""
        with self.db.read() as conn:
            row = conn.execute(
                select(refresh_token).where(refresh_token.c.digest == token_digest(token))
            ).first()
        if row is None or row.client_id != client_id:
            raise GrantError("unknown refresh token")
        if row.revoked_at is not None:
            if row.replaced_by is not None:
                self._revoke_family(row.family, "refresh token reused")
            raise GrantError("refresh token revoked")
        if row.expires_at <= to_us(self.clock()):
            raise GrantError("refresh token expired")
        return Grant(
            row.client_id,
            row.account_id,
            row.session_id,
            tuple(row.scope.split()),
            row.patient,
            family=row.family,
        )

    def rotate(self, token: str, grant: Grant) -> str:
        """Replace a refresh token (from `refresh_grant`) by a new one of the same grant."""
        new_token = new_opaque_token()
        with self.db.write() as conn:
            replaced = conn.execute(
                update(refresh_token)
                .where(
                    refresh_token.c.digest == token_digest(token),
                    refresh_token.c.revoked_at.is_(None),
                )
                .values(revoked_at=to_us(self.clock()), replaced_by=token_digest(new_token))
            ).rowcount
            if replaced == 1:
                self._insert_refresh(conn, new_token, grant)
        if replaced != 1:  # used by a concurrent request meanwhile
            self._revoke_family(grant.family, "refresh token reused")
        return new_token

    def revoke_refresh(self, token: str, *, client_id: str) -> bool:
        """Revoke a refresh token of `client_id` and its family (RFC 7009 §2.1)."""
        with self.db.read() as conn:
            family = conn.scalar(
                select(refresh_token.c.family).where(
                    refresh_token.c.digest == token_digest(token),
                    refresh_token.c.client_id == client_id,
                )
            )
        if family is None:
            return False
        with self.db.write() as conn:
            self._revoke(conn, family, self.clock())
        return True

    def _insert_refresh(self, conn: Connection, token: str, grant: Grant) -> None:
        now = self.clock()
        digest = token_digest(token)
        conn.execute(
            insert(refresh_token).values(
                digest=digest,
                family=grant.family or digest,
                client_id=grant.client_id,
                account_id=grant.account_id,
                session_id=grant.session_id,
                scope=" ".join(grant.scopes),
                patient=grant.patient,
                created_at=to_us(now),
                expires_at=to_us(now + self.refresh_lifetime),
            )
        )

    def _revoke_family(self, family: str, reason: str) -> NoReturn:
        """Revoke every refresh token of a family, then refuse the request."""
        with self.db.write() as conn:
            self._revoke(conn, family, self.clock())
        log.warning("grant family revoked: %s", reason)
        raise GrantError(reason)

    @staticmethod
    def _revoke(conn: Connection, family: str, now: datetime) -> None:
        conn.execute(
            update(refresh_token)
            .where(refresh_token.c.family == family, refresh_token.c.revoked_at.is_(None))
            .values(revoked_at=to_us(now))
        )
