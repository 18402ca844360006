"""covering search indexes (PostgreSQL)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 15:00:00

The lookup index of every index table also carries (shard, rid), so that a search can pick its
page from the index alone. SQLite has no INCLUDE and is left as it is.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOOKUPS = {
    "idx_token": ("code", "system"),
    "idx_string": ("value",),
    "idx_date": ("low", "high"),
    "idx_number": ("value",),
    "idx_quantity": ("value",),
    "idx_reference": ("target_id", "target_type"),
    "idx_uri": ("value",),
    "idx_composite": ("code", "system"),
}


def _rebuild(include: list[str]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, keys in LOOKUPS.items():
        op.drop_index(f"ix_{table}_lookup", table_name=table)
        op.create_index(
            f"ix_{table}_lookup",
            table,
            ["rtype", "param", *keys],
            postgresql_include=include,
        )


def upgrade() -> None:
    _rebuild(["shard", "rid"])


def downgrade() -> None:
    _rebuild([])
