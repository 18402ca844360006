"""Sign-ins, sign-outs and password changes in the audit trail (DICOM "User Authentication":
110122 Login, 110123 Logout; a password change is a login that sets a new password), each an
AuditEvent in a transaction of its own, refused ones too, with the reason the caller is not
told (unknown name, wrong password, locked …) for the auditors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cityhealth.fhir.access import AccessContext
from cityhealth.security import audit
from cityhealth.security.audit_events import DCM, REFUSED, SUCCESS, audit_event

if TYPE_CHECKING:
    from cityhealth.fhir.repository import Repository

LOGIN, LOGOUT = (DCM, "110122"), (DCM, "110123")


@dataclass(frozen=True)
class SignIn:
    event: tuple[str, str]  # LOGIN or LOGOUT
    ok: bool
    who: str  # "Patient/…", "Practitioner/…", "Device/<client>", or the name typed
    role: str
    address: str | None
    reason: str  # ok, bad_password, unknown_user, locked, password_changed …
    organization: str | None = None


def not_recorded(_sign_in: SignIn) -> None:
    """For an authorization server without an audit trail (tests of the server alone)."""


class SignInRecorder:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    def __call__(self, sign_in: SignIn) -> None:
        ctx = AccessContext(
            who=sign_in.who,
            role=sign_in.role,
            organization=sign_in.organization,
            client_address=sign_in.address,
        )
        outcome = SUCCESS if sign_in.ok else REFUSED
        action = "logout" if sign_in.event == LOGOUT else "login"
        event = audit_event(ctx, action, sign_in.event, outcome, description=sign_in.reason)
        with self.repository.db.write() as conn:
            audit.record(self.repository, conn, event)
