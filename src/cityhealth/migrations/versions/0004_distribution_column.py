"""distribution column

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 14:30:00.000000

Adds `shard` (sharding.shard_key) to the resource tables, fills it and makes it NOT NULL. A live
resource gets the shard the write path gives it: its compartment rows name its patients. A
deleted one has no compartment rows any more and is keyed by its own type and id (a Patient by
itself, as always); every row of a resource gets the same value.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from cityhealth.fhir.sharding import shard_key

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "resource",
    "resource_history",
    "compartment",
    "idx_token",
    "idx_string",
    "idx_date",
    "idx_number",
    "idx_quantity",
    "idx_reference",
    "idx_uri",
    "idx_composite",
)
BATCH = 5000
_MAP = "shard_map"


def _fill_map(conn: sa.Connection) -> None:
    """rid → shard of every resource, in a scratch table, a batch of resources at a time."""
    shard_map = sa.table(_MAP, sa.column("rid"), sa.column("shard"))
    last = 0
    while True:
        resources = conn.execute(
            sa.text("SELECT rid, type, id FROM resource WHERE rid > :last ORDER BY rid LIMIT :n"),
            {"last": last, "n": BATCH},
        ).all()
        if not resources:
            return
        last = resources[-1].rid
        patients: dict[int, set[str]] = {}
        members = conn.execute(
            sa.text("SELECT rid, patient_id FROM compartment WHERE rid >= :first AND rid <= :last"),
            {"first": resources[0].rid, "last": last},
        )
        for rid, patient_id in members:
            patients.setdefault(rid, set()).add(patient_id)
        conn.execute(
            sa.insert(shard_map),
            [
                {"rid": x.rid, "shard": shard_key(x.type, x.id, patients.get(x.rid, ()))}
                for x in resources
            ],
        )


def upgrade() -> None:
    for name in TABLES:
        op.add_column(name, sa.Column("shard", sa.BigInteger(), nullable=True))
    op.create_table(
        _MAP,
        sa.Column("rid", sa.BigInteger(), primary_key=True),
        sa.Column("shard", sa.BigInteger(), nullable=False),
    )
    conn = op.get_bind()
    _fill_map(conn)
    for name in TABLES:
        shard_of = f"SELECT m.shard FROM {_MAP} m WHERE m.rid = {name}.rid"
        conn.execute(sa.text(f"UPDATE {name} SET shard = ({shard_of})"))
    op.drop_table(_MAP)
    for name in TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.alter_column("shard", existing_type=sa.BigInteger(), nullable=False)


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_column("shard")
