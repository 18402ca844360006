"""composite search index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 16:48:36.140698
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idx_composite",
        sa.Column("rid", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("code", sa.Text(), nullable=True),
        sa.Column("v_system", sa.Text(), nullable=True),
        sa.Column("v_code", sa.Text(), nullable=True),
        sa.Column("v_value", sa.Float(), nullable=True),
        sa.Column("v_low", sa.Float(), nullable=True),
        sa.Column("v_high", sa.Float(), nullable=True),
        sa.Column("v_date_low", sa.BigInteger(), nullable=True),
        sa.Column("v_date_high", sa.BigInteger(), nullable=True),
        sa.Column(
            "v_text", sa.Text().with_variant(sa.Text(collation="C"), "postgresql"), nullable=True
        ),
    )
    with op.batch_alter_table("idx_composite", schema=None) as batch_op:
        batch_op.create_index(
            "ix_idx_composite_lookup", ["rtype", "param", "code", "system"], unique=False
        )
        batch_op.create_index("ix_idx_composite_rid", ["rid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("idx_composite", schema=None) as batch_op:
        batch_op.drop_index("ix_idx_composite_rid")
        batch_op.drop_index("ix_idx_composite_lookup")

    op.drop_table("idx_composite")
