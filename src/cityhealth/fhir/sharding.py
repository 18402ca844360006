"""The distribution key of the FHIR store (docs/scaling.md).

Every row of a resource — current, history, index and compartment rows — carries the same
`shard`: a stable 64-bit hash of the Patient whose record the resource belongs to, or of the
resource itself when it belongs to no patient. On PostgreSQL with Citus the resource tables are
distributed on that column, so a patient's whole record lives on one shard and joins between a
resource and its own rows never leave it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

#: Tables distributed on `shard` (co-located); every other table is a reference or local one.
DISTRIBUTED_TABLES = frozenset(
    {
        "resource",
        "resource_history",
        "compartment",
        "care_link",
        "idx_token",
        "idx_string",
        "idx_date",
        "idx_number",
        "idx_quantity",
        "idx_reference",
        "idx_uri",
        "idx_composite",
    }
)


def _hash(key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)  # fits PostgreSQL's BIGINT


def patient_shard(patient_id: str) -> int:
    """The shard of a patient's record: the Patient and the resources of its compartment."""
    return _hash(f"Patient/{patient_id}")


def shard_key(rtype: str, rid: str, patients: Collection[str]) -> int:
    """The shard of resource `rtype/rid` whose Patient compartments are `patients`.

    A resource in several compartments goes with the smallest patient id, so that the choice
    does not depend on the order of its references."""
    if rtype == "Patient":
        return patient_shard(rid)
    if patients:
        return patient_shard(min(patients))
    return _hash(f"{rtype}/{rid}")
