"""Who is asking: every repository call carries an AccessContext.

The access rules of the security layer read it; for now every caller acts as the platform
itself (SYSTEM), so that those rules plug in without touching the callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AccessContext:
    who: str  # e.g. "Practitioner/123", "Patient/9", "Device/his-1", "system"
    role: str  # a role of cityhealth.security.roles: resident, doctor, regulator, system …
    organization: str | None = None  # "Organization/…" the caller acts for
    scopes: frozenset[str] = field(default_factory=frozenset)  # SMART scopes
    patient: str | None = None  # "Patient/…" in context (SMART launch; a guardian's child)
    role_kind: str | None = None  # e.g. the regulator's body: health_commission, cdc …
    purpose: str | None = None  # purpose of use (treatment, emergency, investigation …)
    break_glass: bool = False
    client_address: str | None = None


SYSTEM = AccessContext(who="system", role="system", scopes=frozenset({"system/*.*"}))
