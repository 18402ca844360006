"""Access tokens for tests, signed with the application's own keys (as its authorization server
would issue them), valid long enough for a whole test module."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cityhealth.security.tokens import TokenService

PLATFORM_SCOPES = ("system/*.*",)


def bearer(
    app: FastAPI,
    role: str = "system",
    *,
    scopes: tuple[str, ...] = PLATFORM_SCOPES,
    who: str | None = None,
    organization: str | None = None,
    patient: str | None = None,
    client_id: str = "test-platform",
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The Authorization header of a token: by default the platform's own client (system/*.*,
    no organization); `who` is the fhirUser of a person's role."""
    security = app.state.security
    tokens = TokenService(
        security.keyring, security.tokens.issuer, security.tokens.audience, access_minutes=240
    )
    token = tokens.issue_access_token(
        who or client_id,
        scopes=scopes,
        role=role,
        client_id=client_id,
        organization=organization,
        fhir_user=who,
        patient=patient.partition("/")[2] if patient else None,
        extra=extra,
    )
    return {"Authorization": f"Bearer {token}"}
