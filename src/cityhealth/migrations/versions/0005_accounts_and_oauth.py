"""accounts and oauth

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 15:00:00.000000

Accounts, their password history and the patients they act for; OAuth clients, authorization
codes, refresh tokens, login sessions and revoked access tokens (cityhealth.security.schema).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DIGEST = sa.String(length=64)
_ID = sa.String(length=64)
_REFERENCE = sa.String(length=140)
_TIME = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "account",
        sa.Column("id", _ID, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("role_kind", sa.String(length=32), nullable=True),
        sa.Column("fhir_user", _REFERENCE, nullable=False),
        sa.Column("organization", _REFERENCE, nullable=True),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("password_changed_at", _TIME, nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until", _TIME, nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_account_username", "account", ["username"], unique=True)
    op.create_index("ux_account_fhir_user", "account", ["fhir_user"], unique=True)

    op.create_table(
        "account_password_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_account_password_history_account",
        "account_password_history",
        ["account_id", "id"],
    )

    op.create_table(
        "account_patient",
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("patient", _REFERENCE, nullable=False),
        sa.Column("relation", sa.String(length=16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("account_id", "patient"),
    )
    op.create_index("ix_account_patient_patient", "account_patient", ["patient"])

    op.create_table(
        "oauth_client",
        sa.Column("client_id", _ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=True),
        sa.Column("redirect_uris", sa.Text(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=True),
        sa.Column("organization", _REFERENCE, nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("client_id"),
    )

    op.create_table(
        "login_session",
        sa.Column("digest", _DIGEST, nullable=False),
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("last_seen_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_index("ix_login_session_account", "login_session", ["account_id"])

    op.create_table(
        "oauth_code",
        sa.Column("digest", _DIGEST, nullable=False),
        sa.Column("client_id", _ID, nullable=False),
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("session_id", _DIGEST, nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("patient", _ID, nullable=True),
        sa.Column("code_challenge", sa.String(length=64), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("used_at", _TIME, nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"]),
        sa.ForeignKeyConstraint(["client_id"], ["oauth_client.client_id"]),
        sa.ForeignKeyConstraint(["session_id"], ["login_session.digest"]),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_index("ix_oauth_code_expires", "oauth_code", ["expires_at"])

    op.create_table(
        "refresh_token",
        sa.Column("digest", _DIGEST, nullable=False),
        sa.Column("family", _DIGEST, nullable=False),
        sa.Column("client_id", _ID, nullable=False),
        sa.Column("account_id", _ID, nullable=True),
        sa.Column("session_id", _DIGEST, nullable=True),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("patient", _ID, nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.Column("replaced_by", _DIGEST, nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["account.id"]),
        sa.ForeignKeyConstraint(["client_id"], ["oauth_client.client_id"]),
        sa.ForeignKeyConstraint(["session_id"], ["login_session.digest"]),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_index("ix_refresh_token_family", "refresh_token", ["family"])
    op.create_index("ix_refresh_token_session", "refresh_token", ["session_id"])
    op.create_index("ix_refresh_token_expires", "refresh_token", ["expires_at"])

    op.create_table(
        "revoked_token",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("jti"),
    )
    op.create_index("ix_revoked_token_expires", "revoked_token", ["expires_at"])


def downgrade() -> None:
    for name in (
        "revoked_token",
        "refresh_token",
        "oauth_code",
        "login_session",
        "oauth_client",
        "account_patient",
        "account_password_history",
        "account",
    ):
        op.drop_table(name)
