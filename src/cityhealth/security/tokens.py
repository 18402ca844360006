"""Access tokens (short-lived ES256 JWTs, RFC 9068 profile), opaque tokens and PKCE.

Access tokens are signed with the key ring's current key and name it in the `kid` header, so a
token keeps verifying after a rotation until its key is pruned. Verification trusts nothing the
token says about how to check it: the algorithm is fixed to ES256, the key comes from the ring,
and every failure is one `InvalidToken` so callers cannot forget a case.

Refresh tokens and authorization codes are opaque random strings stored only as their digest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from cityhealth.security.keys import ALGORITHM, Clock, KeyRing, utc_now

TOKEN_TYPE = "at+jwt"  # RFC 9068: keeps an ID token signed by the same key from passing as one
_REQUIRED = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "role", "client_id")
_OPTIONAL = ("org", "fhirUser", "patient")
_RESERVED = frozenset((*_REQUIRED, *_OPTIONAL))
#: Verified tokens whose claims are kept (each is a few hundred bytes); all are dropped when
#: there are more, and verified again at their next use.
_VERIFIED_MAX = 10_000
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 §4.1


class InvalidToken(Exception):
    """The token must not be accepted; `reason` says why, for logs (not for the caller)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AccessClaims:
    subject: str
    scopes: tuple[str, ...]
    role: str
    client_id: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    not_before: datetime
    organization: str | None = None
    fhir_user: str | None = None
    patient: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class TokenService:
    def __init__(
        self,
        keyring: KeyRing,
        issuer: str,
        audience: str,
        access_minutes: int = 5,
        clock: Clock = utc_now,
        leeway: timedelta = timedelta(seconds=10),
    ) -> None:
        self.keyring = keyring
        self.issuer = issuer
        self.audience = audience
        self.access_lifetime = timedelta(minutes=access_minutes)
        self.clock = clock
        self.leeway = leeway
        self._verified: dict[str, tuple[str, AccessClaims]] = {}

    def issue_access_token(
        self,
        subject: str,
        *,
        scopes: Iterable[str],
        role: str,
        client_id: str,
        organization: str | None = None,
        fhir_user: str | None = None,
        patient: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        scope_list = list(scopes)
        if any(not scope or any(c.isspace() for c in scope) for scope in scope_list):
            raise ValueError(f"a scope is empty or contains white space: {scope_list!r}")
        clashing = _RESERVED.intersection(extra or ())
        if clashing:
            raise ValueError(f"extra claims may not replace {sorted(clashing)}")
        issued = int(self.clock().timestamp())
        optional = {"org": organization, "fhirUser": fhir_user, "patient": patient}
        claims: dict[str, Any] = {
            **(extra or {}),
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(self.access_lifetime.total_seconds()),
            "jti": secrets.token_urlsafe(16),
            "scope": " ".join(scope_list),
            "role": role,
            "client_id": client_id,
            **{name: value for name, value in optional.items() if value is not None},
        }
        key = self.keyring.current
        headers = {"kid": key.kid, "typ": TOKEN_TYPE}
        return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers=headers)

    def verify_access_token(
        self, token: str, *, is_revoked: Callable[[str], bool] | None = None
    ) -> AccessClaims:
        """The claims of a valid token; `InvalidToken` for anything else. A token's signature
        and claims are checked once: they are kept (`_verified`) while its key is published,
        and its times and revocation are checked at every use."""
        known = self._verified.get(token)
        if known is not None and self.keyring.public_key(known[0]) is not None:
            result = known[1]
        else:
            kid, claims = self._decode(token)
            result = _access_claims(claims)
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[token] = (kid, result)
        self._check_times(result)
        if is_revoked is not None and is_revoked(result.jti):
            raise InvalidToken("revoked")
        return result

    def _check_times(self, claims: AccessClaims) -> None:
        now = self.clock()
        if claims.expires_at <= now - self.leeway:
            raise InvalidToken("expired")
        if claims.not_before > now + self.leeway or claims.issued_at > now + self.leeway:
            raise InvalidToken("not yet valid")

    def _decode(self, token: str) -> tuple[str, dict[str, Any]]:
        """The key id and claims of a token whose header and signature are valid."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken(f"malformed token: {error}") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"algorithm not allowed: {header.get('alg')!r}")
        if header.get("typ") != TOKEN_TYPE:
            raise InvalidToken(f"not an access token: typ {header.get('typ')!r}")
        kid = header.get("kid")
        key = self.keyring.public_key(kid) if isinstance(kid, str) else None
        if key is None or not isinstance(kid, str):
            raise InvalidToken(f"unknown key: {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                # Times are checked below against the injectable clock.
                options={
                    "require": list(_REQUIRED),
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.MissingRequiredClaimError as error:
            raise InvalidToken(f"missing claim: {error.claim}") from None
        except jwt.PyJWTError as error:
            raise InvalidToken(f"invalid token: {error}") from None
        return kid, claims


def _access_claims(claims: dict[str, Any]) -> AccessClaims:
    """The claims of a token whose signature is valid, each of the type it must have."""
    issued_at, not_before, expires_at = (_instant(claims, name) for name in ("iat", "nbf", "exp"))
    for name in ("sub", "jti", "scope", "role", "client_id"):
        if not isinstance(claims[name], str):
            raise InvalidToken(f"claim {name} is not a string")
    for name in _OPTIONAL:
        if not isinstance(claims.get(name, ""), str):
            raise InvalidToken(f"claim {name} is not a string")
    return AccessClaims(
        subject=claims["sub"],
        scopes=tuple(claims["scope"].split()),
        role=claims["role"],
        client_id=claims["client_id"],
        jti=claims["jti"],
        issued_at=issued_at,
        expires_at=expires_at,
        not_before=not_before,
        organization=claims.get("org"),
        fhir_user=claims.get("fhirUser"),
        patient=claims.get("patient"),
        extra={k: v for k, v in claims.items() if k not in _RESERVED},
    )


def _instant(claims: dict[str, Any], name: str) -> datetime:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"claim {name} is not a number")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidToken(f"claim {name} is out of range") from None


def new_opaque_token() -> str:
    """A refresh token or authorization code: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What is stored for an opaque token, so a database leak yields no usable tokens."""
    return hashlib.sha256(token.encode()).hexdigest()


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier (RFC 7636 §4.2)."""
    if not _PKCE_VERIFIER.fullmatch(verifier):
        raise ValueError("a code verifier has 43 to 128 characters of [A-Za-z0-9-._~]")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify_pkce(verifier: str, challenge: str, method: str) -> bool:
    """True when `verifier` answers `challenge`; only S256 is accepted, never `plain`."""
    if method != "S256" or not _PKCE_VERIFIER.fullmatch(verifier):
        return False
    expected = pkce_challenge(verifier).encode("ascii")
    return hmac.compare_digest(expected, challenge.encode("utf-8", "surrogatepass"))
