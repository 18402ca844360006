"""Who is asking: every repository call carries an AccessContext.

The access rules (cityhealth.security.policy) read it. Requests get theirs from their access
token (cityhealth.security.guard); the platform's own work (imports, audit records, the
command line) acts as SYSTEM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AccessContext:
    who: str  # e.g. "Practitioner/123", "Patient/9", "Device/his-1", "system"
    role: str  # a role of cityhealth.security.roles: resident, doctor, regulator, system …
    organization: str | None = None  # "Organization/…" the caller acts for
    scopes: frozenset[str] = field(default_factory=frozenset)  # SMART scopes
    patient: str | None = None  # "Patient/…" in context (SMART launch; a guardian's child)
    role_kind: str | None = None  # e.g. the regulator's body: health_commission, cdc …
    purpose: str | None = None  # purpose of use, a v3 code (TREAT, HCOMPL …) from the request
    reason: str | None = None  # why, in the caller's words (an investigation's case, say)
    client_address: str | None = None

    def to_json(self) -> dict[str, Any]:
        """For work done later on the caller's behalf (a bulk export job)."""
        return {**asdict(self), "scopes": sorted(self.scopes)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AccessContext:
        return cls(**{**data, "scopes": frozenset(data["scopes"])})


SYSTEM = AccessContext(who="system", role="system", scopes=frozenset({"system/*.*"}))
