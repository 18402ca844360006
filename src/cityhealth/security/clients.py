"""OAuth clients: the apps and systems that may ask for tokens, stored in `oauth_client`.

A confidential client's secret is shown once when the client is created and stored only as its
argon2id hash; a public client (a browser or mobile app) has none and must use PKCE.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Row, insert, select
from sqlalchemy.exc import IntegrityError

from cityhealth.db import Database
from cityhealth.security.passwords import hash_password, verify_password
from cityhealth.security.roles import ROLES, is_reference
from cityhealth.security.schema import oauth_client, to_us
from cityhealth.security.scopes import parse_scopes
from cityhealth.security.tokens import new_opaque_token

PUBLIC, CONFIDENTIAL = "public", "confidential"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    name: str
    kind: str  # PUBLIC or CONFIDENTIAL
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...]  # the most it may be granted
    role: str | None  # the role it acts in on its own; None: only for signed-in people
    organization: str | None
    active: bool


class ClientError(ValueError):
    """The client is refused; the message says why (English, for the CLI and logs)."""


def create_client(
    db: Database,
    now: datetime,
    client_id: str,
    *,
    name: str,
    kind: str,
    redirect_uris: Iterable[str] = (),
    scopes: str | Iterable[str],
    role: str | None = None,
    organization: str | None = None,
) -> tuple[OAuthClient, str | None]:
    """A new client, and the secret of a confidential one (None for a public one)."""
    uris = tuple(redirect_uris)
    scope_list = tuple(scopes.split() if isinstance(scopes, str) else scopes)
    _check_client(client_id, kind, uris, scope_list, role, organization)
    secret = new_opaque_token() if kind == CONFIDENTIAL else None
    values = {
        "client_id": client_id,
        "name": name.strip() or client_id,
        "kind": kind,
        "secret_hash": hash_password(secret) if secret else None,
        "redirect_uris": json.dumps(list(uris)),
        "scopes": " ".join(scope_list),
        "role": role,
        "organization": organization,
        "active": True,
        "created_at": to_us(now),
    }
    try:
        with db.write() as conn:
            conn.execute(insert(oauth_client).values(**values))
    except IntegrityError:
        raise ClientError(f"client {client_id!r} already exists") from None
    created = find_client(db, client_id)
    assert created is not None
    return created, secret


def find_client(db: Database, client_id: str) -> OAuthClient | None:
    row = _row(db, client_id)
    return _client(row) if row else None


def authenticate_client(db: Database, client_id: str, secret: str) -> OAuthClient | None:
    """The active confidential client whose secret this is, else None."""
    row = _row(db, client_id)
    if row is None or row.secret_hash is None or not row.active:
        equal_time_refusal(secret)
        return None
    return _client(row) if verify_password(row.secret_hash, secret) else None


def equal_time_refusal(secret: str) -> None:
    """Spend the time of a real check, so that how long a refusal takes tells nothing."""
    verify_password(_dummy_hash(), secret)


@cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


def _row(db: Database, client_id: str) -> Row[Any] | None:
    with db.read() as conn:
        return conn.execute(
            select(oauth_client).where(oauth_client.c.client_id == client_id)
        ).first()


def _check_client(
    client_id: str,
    kind: str,
    redirect_uris: tuple[str, ...],
    scopes: tuple[str, ...],
    role: str | None,
    organization: str | None,
) -> None:
    if not _CLIENT_ID.fullmatch(client_id):
        raise ClientError("a client_id has 1 to 64 of A-Z a-z 0-9 . _ -")
    if kind not in (PUBLIC, CONFIDENTIAL):
        raise ClientError(f"a client is {PUBLIC} or {CONFIDENTIAL}, not {kind!r}")
    for uri in redirect_uris:
        parts = urlsplit(uri)
        # RFC 6749 §3.1.2: absolute and without fragment; matched exactly, so no patterns.
        if not parts.scheme or not (parts.netloc or parts.path) or parts.fragment or "*" in uri:
            raise ClientError(f"not an absolute redirect URI without fragment: {uri!r}")
    if kind == PUBLIC and not redirect_uris:
        raise ClientError("a public client needs a redirect URI")
    try:
        parse_scopes(scopes)
    except ValueError as error:
        raise ClientError(str(error)) from None
    if role is not None:
        definition = ROLES.get(role)
        if definition is None or not definition.for_clients:
            clients = [code for code, known in ROLES.items() if known.for_clients]
            raise ClientError(f"a client's role is one of: {', '.join(clients)}")
        if kind == PUBLIC:
            raise ClientError("only a confidential client can act on its own")
    if organization is not None and not is_reference(organization, "Organization"):
        raise ClientError(f"not an Organization reference: {organization!r}")


def _client(row: Row[Any]) -> OAuthClient:
    return OAuthClient(
        client_id=row.client_id,
        name=row.name,
        kind=row.kind,
        redirect_uris=tuple(json.loads(row.redirect_uris)),
        scopes=tuple(row.scopes.split()),
        role=row.role,
        organization=row.organization,
        active=row.active,
    )
