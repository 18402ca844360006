"""audit pending

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 21:00:00

AuditEvents written but not yet indexed for search nor chained: the action writes its record
and a row here, in its transaction; cityhealth.security.audit.settle indexes and chains them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_pending",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("shard", sa.BigInteger(), nullable=False),
        sa.Column("rid", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )


def downgrade() -> None:
    op.drop_table("audit_pending")
