"""Tables of the FHIR store (SQLAlchemy Core; one schema for SQLite and PostgreSQL).

`resource` holds the current version of each resource, `resource_history` every version
(deletes included), one `idx_*` table per search-parameter kind, `compartment` the Patient
compartment membership and `care_link` the relations of care resources establish. Index rows
carry the resource type so that every search is a range scan on (type, param, value). Every
row of a resource carries its `shard` (sharding.py), the column these tables are distributed
on with Citus (docs/scaling.md).
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# Prefix ranges (`value >= 'zha' AND value < 'zha\uffff'`) need byte order on PostgreSQL.
Folded = Text().with_variant(Text(collation="C"), "postgresql")
Key = String(64)
RowId = BigInteger().with_variant(Integer, "sqlite")


def _shard() -> Column[int]:
    return Column("shard", BigInteger, nullable=False)  # sharding.shard_key of the resource


resource = Table(
    "resource",
    metadata,
    Column("rid", RowId, primary_key=True, autoincrement=True),
    _shard(),
    Column("type", Key, nullable=False),
    Column("id", Key, nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),  # microseconds since the epoch, UTC
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", Text, nullable=True),  # the JSON as served, meta included; NULL once deleted
    Index("ux_resource_type_id", "type", "id", unique=True),
    Index("ix_resource_type_updated", "type", "last_updated"),
)

resource_history = Table(
    "resource_history",
    metadata,
    Column("rid", RowId, primary_key=True),
    Column("version", Integer, primary_key=True),
    _shard(),
    Column("type", Key, nullable=False),
    Column("id", Key, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # POST PUT PATCH DELETE
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", Text, nullable=True),
    Index("ix_history_type_updated", "type", "last_updated"),
    Index("ix_history_updated", "last_updated"),
)


def _index_table(name: str, *columns: Column, lookup: tuple[str, ...]) -> Table:
    return Table(
        name,
        metadata,
        Column("rid", RowId, nullable=False),
        _shard(),
        Column("rtype", Key, nullable=False),
        Column("param", Key, nullable=False),
        *columns,
        # Covering on PostgreSQL: a search page is picked from the index alone (index-only
        # scan) before any resource row is read.
        Index(f"ix_{name}_lookup", "rtype", "param", *lookup, postgresql_include=["shard", "rid"]),
        Index(f"ix_{name}_rid", "rid"),
    )


idx_token = _index_table(
    "idx_token",
    Column("system", Text()),
    Column("code", Text()),
    Column("text", Folded),
    lookup=("code", "system"),
)
idx_string = _index_table(
    "idx_string",
    Column("value", Folded, nullable=False),
    Column("exact", Text),
    lookup=("value",),
)
idx_date = _index_table(
    "idx_date",
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    lookup=("low", "high"),
)
idx_number = _index_table(
    "idx_number",
    Column("value", Float, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    lookup=("value",),
)
idx_quantity = _index_table(
    "idx_quantity",
    Column("system", Text()),
    Column("code", Text()),
    Column("unit", Text()),
    Column("value", Float, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    lookup=("value",),
)
idx_reference = _index_table(
    "idx_reference",
    Column("target_type", Key),
    Column("target_id", Key),
    Column("url", Text),
    lookup=("target_id", "target_type"),
)
Index("ix_idx_reference_target", idx_reference.c.target_type, idx_reference.c.target_id)
idx_composite = _index_table(
    "idx_composite",
    Column("system", Text()),
    Column("code", Text()),
    Column("v_system", Text()),
    Column("v_code", Text()),
    Column("v_value", Float),
    Column("v_low", Float),
    Column("v_high", Float),
    Column("v_date_low", BigInteger),
    Column("v_date_high", BigInteger),
    Column("v_text", Folded),
    lookup=("code", "system"),
)
idx_uri = _index_table(
    "idx_uri",
    Column("value", Folded, nullable=False),
    lookup=("value",),
)

compartment = Table(
    "compartment",
    metadata,
    Column("rid", RowId, primary_key=True),
    Column("patient_id", Key, primary_key=True),
    _shard(),
    Index("ix_compartment_patient", "patient_id"),
)

#: Relations of care (cityhealth.security.care_links): a row says that resource `rid` (of
#: `rtype`, in force) relates `actor` ("Organization/…", "Practitioner/…") to a patient under
#: `relation`. Written and cleared with the resource's index rows, so that an access check
#: looks up a patient's relations with one index probe instead of deriving them every time.
care_link = Table(
    "care_link",
    metadata,
    Column("rid", RowId, nullable=False),
    Column("rtype", Key, nullable=False),
    Column("relation", Key, nullable=False),
    Column("actor", Text(), nullable=False),
    Column("patient_id", Key, nullable=False),
    _shard(),
    Index("ix_care_link_patient", "patient_id", "actor", "relation"),
    Index("ix_care_link_rid", "rid"),
)

INDEX_TABLES = {
    "token": idx_token,
    "string": idx_string,
    "date": idx_date,
    "number": idx_number,
    "quantity": idx_quantity,
    "reference": idx_reference,
    "uri": idx_uri,
    "composite": idx_composite,
}

#: What `cityhealth import` has finished: one row per bundle or NDJSON chunk, by checksum, so
#: that a re-run (or a run after a kill) skips it and nothing is stored twice.
import_journal = Table(
    "import_journal",
    metadata,
    Column("checksum", String(64), primary_key=True),  # sha256 hex of the bundle / chunk
    Column("source", Text, nullable=False),  # file name (and line range) for the report
    Column("resources", Integer, nullable=False),
    Column("finished_at", BigInteger, nullable=False),  # epoch microseconds
)

#: Background jobs kept in the database (bulk export …), so they survive a restart.
job = Table(
    "job",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),  # e.g. "export"
    Column("status", String(16), nullable=False),  # accepted running completed failed cancelled
    Column("request", Text, nullable=False),  # JSON: what was asked (URL, parameters, who)
    Column("progress", Text),  # human-readable, e.g. "Patient 3/12"
    Column("result", Text),  # JSON: e.g. the Bulk Data manifest
    Column("error", Text),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger),
    Column("owner", Text),  # who asked (AccessContext.who); only they may poll or cancel
    Index("ix_job_status", "status", "created_at"),
)
