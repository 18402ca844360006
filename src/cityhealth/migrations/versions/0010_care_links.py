"""care links

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 16:00:00

The relations of care that resources in force establish (cityhealth.security.care_links),
written with each resource's index rows from now on, and here for what is already stored.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cityhealth.security.care_links import rebuild
from cityhealth.security.policy import RELATIONS

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    row_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "care_link",
        sa.Column("rid", row_id, nullable=False),
        sa.Column("rtype", sa.String(64), nullable=False),
        sa.Column("relation", sa.String(64), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("shard", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_care_link_patient", "care_link", ["patient_id", "actor", "relation"])
    op.create_index("ix_care_link_rid", "care_link", ["rid"])
    rebuild(op.get_bind(), RELATIONS)


def downgrade() -> None:
    op.drop_table("care_link")
