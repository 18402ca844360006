"""Tables of accounts, OAuth clients, grants and sessions (SQLAlchemy Core).

They are declared on the FHIR store's `metadata`, the one the migrations compare against. Times
follow the store's convention: microseconds since the epoch, UTC, in a BigInteger (`to_us`,
`from_us`). Opaque secrets (authorization codes, refresh tokens, session tokens) are stored only
as their SHA-256 digest, so a copy of the database yields none of them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
)

from cityhealth.fhir.schema import metadata

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

Digest = String(64)  # tokens.token_digest: SHA-256 hex
Reference = String(140)  # "Patient/123", "Organization/1": a type and a FHIR id (≤ 64)
RowId = BigInteger().with_variant(Integer, "sqlite")

account = Table(
    "account",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("username", String(64), nullable=False),  # NFKC, case-folded
    Column("display_name", Text, nullable=False),
    Column("role", String(32), nullable=False),  # roles.ROLES
    Column("role_kind", String(32)),  # e.g. the kind of regulator
    Column("fhir_user", Reference, nullable=False),  # the resource the person stands for
    Column("organization", Reference),  # the organization the person acts for
    Column("password_hash", Text, nullable=False),  # argon2id
    Column("password_changed_at", BigInteger, nullable=False),
    Column("failures", Integer, nullable=False, default=0),  # consecutive failed logins
    Column("locked_until", BigInteger),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ux_account_username", "username", unique=True),
    # One account per person and resource: 等保 asks for unique, personal accounts.
    Index("ux_account_fhir_user", "fhir_user", unique=True),
)

account_password_history = Table(
    "account_password_history",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("account_id", String(64), ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
    Column("password_hash", Text, nullable=False),  # the current password's too
    Column("created_at", BigInteger, nullable=False),
    Index("ix_account_password_history_account", "account_id", "id"),
)

#: The patients an account acts for: the resident themselves, and children as their guardian.
account_patient = Table(
    "account_patient",
    metadata,
    Column(
        "account_id",
        String(64),
        ForeignKey("account.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("patient", Reference, primary_key=True),  # "Patient/…"
    Column("relation", String(16), nullable=False),  # self | guardian
    Column("created_at", BigInteger, nullable=False),
    Index("ix_account_patient_patient", "patient"),
)

oauth_client = Table(
    "oauth_client",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("kind", String(16), nullable=False),  # public | confidential
    Column("secret_hash", Text),  # argon2id of the secret of a confidential client
    Column("redirect_uris", Text, nullable=False),  # JSON array of exact URIs
    Column("scopes", Text, nullable=False),  # the most it may be granted, space-separated
    Column("role", String(32)),  # the role it acts in on its own (client_credentials)
    Column("organization", Reference),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", BigInteger, nullable=False),
)

login_session = Table(
    "login_session",
    metadata,
    Column("digest", Digest, primary_key=True),
    Column("account_id", String(64), ForeignKey("account.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("last_seen_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
    Index("ix_login_session_account", "account_id"),
)

oauth_code = Table(
    "oauth_code",
    metadata,
    Column("digest", Digest, primary_key=True),
    Column("client_id", String(64), ForeignKey("oauth_client.client_id"), nullable=False),
    Column("account_id", String(64), ForeignKey("account.id"), nullable=False),
    Column("session_id", Digest, ForeignKey("login_session.digest"), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),  # granted, space-separated
    Column("patient", String(64)),  # id of the Patient in context
    Column("code_challenge", String(64), nullable=False),  # PKCE S256
    Column("expires_at", BigInteger, nullable=False),
    Column("used_at", BigInteger),
    Index("ix_oauth_code_expires", "expires_at"),
)

refresh_token = Table(
    "refresh_token",
    metadata,
    Column("digest", Digest, primary_key=True),
    # Every token rotated from one grant shares its family (the code's digest): reusing a
    # rotated token revokes the whole family.
    Column("family", Digest, nullable=False),
    Column("client_id", String(64), ForeignKey("oauth_client.client_id"), nullable=False),
    Column("account_id", String(64), ForeignKey("account.id")),
    Column("session_id", Digest, ForeignKey("login_session.digest")),
    Column("scope", Text, nullable=False),
    Column("patient", String(64)),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
    Column("replaced_by", Digest),
    Index("ix_refresh_token_family", "family"),
    Index("ix_refresh_token_session", "session_id"),
    Index("ix_refresh_token_expires", "expires_at"),
)

#: Access tokens revoked before they expire (logout, RFC 7009), by `jti`; a row may go once
#: its token has expired.
revoked_token = Table(
    "revoked_token",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_revoked_token_expires", "expires_at"),
)

# The audit trail's hash chain: one row per AuditEvent, in order; each row's hash covers the
# previous row's hash and the event's exact stored text (cityhealth.security.audit).
audit_chain = Table(
    "audit_chain",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(64), nullable=False, unique=True),  # AuditEvent/<id>
    Column("recorded_at", BigInteger, nullable=False),
    Column("body_digest", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_chain_recorded", "recorded_at"),
)

#: AuditEvents stored but not yet indexed nor chained, in the order they were written: each
#: action writes its records' rows and a row here; audit.settle does the rest (index rows,
#: history row, chain row) for many at a time and removes them from here.
audit_pending = Table(
    "audit_pending",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("shard", BigInteger, nullable=False),
    Column("rid", BigInteger, nullable=False),
)

#: The last chain row removed at the end of its retention: the chain continues from its hash.
audit_anchor = Table(
    "audit_anchor",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("pruned_at", BigInteger, nullable=False),
    Column("events", BigInteger, nullable=False),
)

TABLES = (
    account,
    account_password_history,
    account_patient,
    oauth_client,
    login_session,
    oauth_code,
    refresh_token,
    revoked_token,
    audit_chain,
    audit_pending,
    audit_anchor,
)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"datetime without a time zone: {moment!r}")
    return (moment - _EPOCH) // _MICROSECOND


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def from_us_or_none(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)
