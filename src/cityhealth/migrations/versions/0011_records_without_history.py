"""records without history

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 17:00:00

Records of access (AuditEvent) are never changed: their current row is their only version,
and history and vread read it from `resource` (store.APPEND_ONLY). The copies kept so far in
`resource_history` go.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.text("DELETE FROM resource_history WHERE type = 'AuditEvent'"))


def downgrade() -> None:
    op.execute(
        sa.text(
            "INSERT INTO resource_history"
            " (rid, version, shard, type, id, last_updated, method, deleted, body)"
            " SELECT rid, version, shard, type, id, last_updated, 'POST', deleted, body"
            " FROM resource WHERE type = 'AuditEvent'"
        )
    )
