"""Access tokens: what they carry, every way a forged or stale one is refused, and PKCE."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cityhealth.security.keys import KeyRing
from cityhealth.security.tokens import (
    InvalidToken,
    TokenService,
    new_opaque_token,
    pkce_challenge,
    token_digest,
    verify_pkce,
)
from manual_clock import ManualClock

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ISSUER = "https://health.zhongwei.example/oauth"
AUDIENCE = "https://health.zhongwei.example/fhir"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def ring(tmp_path: Path, clock: ManualClock) -> KeyRing:
    return KeyRing.load_or_create(tmp_path / "keys", clock)


@pytest.fixture
def service(ring: KeyRing, clock: ManualClock) -> TokenService:
    return TokenService(ring, ISSUER, AUDIENCE, clock=clock)


def issue(service: TokenService, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "scopes": ["patient/*.read", "openid", "fhirUser"],
        "role": "resident",
        "client_id": "portal",
        "fhir_user": "Patient/p1",
        "patient": "p1",
    }
    return service.issue_access_token("acct-1", **{**arguments, **overrides})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def forge(header: dict[str, Any], payload: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    return jwt.encode(payload, key, algorithm="ES256", headers=header)


def payload_of(token: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return result


def rejected(service: TokenService, token: str) -> str:
    with pytest.raises(InvalidToken) as caught:
        service.verify_access_token(token)
    return caught.value.reason


def test_round_trip_carries_every_claim(service: TokenService, ring: KeyRing) -> None:
    token = issue(service, organization="Organization/h1", extra={"sid": "s-9"})
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": ring.current.kid, "typ": "at+jwt"}
    payload = payload_of(token)
    assert payload["scope"] == "patient/*.read openid fhirUser"
    assert payload["iat"] == payload["nbf"] == int(T0.timestamp())
    assert payload["exp"] - payload["iat"] == 300
    claims = service.verify_access_token(token)
    assert claims.subject == "acct-1"
    assert claims.scopes == ("patient/*.read", "openid", "fhirUser")
    assert (claims.role, claims.client_id) == ("resident", "portal")
    assert (claims.organization, claims.fhir_user, claims.patient) == (
        "Organization/h1",
        "Patient/p1",
        "p1",
    )
    assert claims.issued_at == T0 and claims.expires_at == T0 + timedelta(minutes=5)
    assert claims.extra == {"sid": "s-9"}
    assert claims.jti == payload["jti"]


def test_optional_claims_are_left_out_and_jti_is_unique(service: TokenService) -> None:
    first = issue(service, fhir_user=None, patient=None)
    assert not {"org", "fhirUser", "patient"} & set(payload_of(first))
    claims = service.verify_access_token(first)
    assert (claims.organization, claims.fhir_user, claims.patient) == (None, None, None)
    assert payload_of(first)["jti"] != payload_of(issue(service))["jti"]


def test_access_lifetime_is_a_setting(ring: KeyRing, clock: ManualClock) -> None:
    service = TokenService(ring, ISSUER, AUDIENCE, access_minutes=15, clock=clock)
    claims = service.verify_access_token(issue(service))
    assert claims.expires_at - claims.issued_at == timedelta(minutes=15)


def test_bad_issue_arguments(service: TokenService) -> None:
    with pytest.raises(ValueError, match="white space"):
        issue(service, scopes=["patient/*.read openid"])
    with pytest.raises(ValueError, match="role"):
        issue(service, extra={"role": "platform-admin"})


def test_valid_token_with_changed_payload_is_refused(service: TokenService) -> None:
    header, payload, signature = issue(service).split(".")
    claims = json.loads(unb64(payload))
    claims["role"] = "platform-admin"
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert rejected(service, tampered) == "bad signature"


@pytest.mark.parametrize("position", [0, 10, 40, -5])
def test_one_changed_payload_character_is_refused(service: TokenService, position: int) -> None:
    header, payload, signature = issue(service).split(".")
    index = position % len(payload)
    changed = "B" if payload[index] != "B" else "C"
    tampered = payload[:index] + changed + payload[index + 1 :]
    rejected(service, f"{header}.{tampered}.{signature}")


def test_one_changed_signature_character_is_refused(service: TokenService) -> None:
    header, payload, signature = issue(service).split(".")
    changed = "A" if signature[5] != "A" else "B"
    rejected(service, f"{header}.{payload}.{signature[:5]}{changed}{signature[6:]}")


def test_alg_none_is_refused(service: TokenService, ring: KeyRing) -> None:
    payload = issue(service).split(".")[1]
    header = b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": ring.current.kid}).encode())
    assert rejected(service, f"{header}.{payload}.").startswith("algorithm not allowed")


def test_hs256_signed_with_the_public_key_is_refused(service: TokenService, ring: KeyRing) -> None:
    # The classic confusion attack: an HMAC keyed with the published public key.
    public_pem = ring.current.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": ring.current.kid}).encode())
    payload = issue(service).split(".")[1]
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert rejected(service, f"{header}.{payload}.{b64(signature)}").startswith("algorithm")


def test_a_foreign_key_claiming_our_kid_is_refused(service: TokenService, ring: KeyRing) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    header = {"kid": ring.current.kid, "typ": "at+jwt"}
    assert rejected(service, forge(header, payload_of(issue(service)), stranger)) == "bad signature"


def test_unknown_or_missing_kid_is_refused(service: TokenService) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    payload = payload_of(issue(service))
    assert rejected(
        service, forge({"kid": "B" * 43, "typ": "at+jwt"}, payload, stranger)
    ).startswith("unknown key")
    assert rejected(service, forge({"typ": "at+jwt"}, payload, stranger)).startswith("unknown key")


def test_a_token_of_another_type_is_refused(service: TokenService, ring: KeyRing) -> None:
    payload = payload_of(issue(service))
    id_token = forge({"kid": ring.current.kid, "typ": "JWT"}, payload, ring.current.private_key)
    assert rejected(service, id_token).startswith("not an access token")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "a.b", "....."])
def test_garbage_is_refused(service: TokenService, garbage: str) -> None:
    rejected(service, garbage)


def test_expiry_with_ten_seconds_of_leeway(service: TokenService, clock: ManualClock) -> None:
    token = issue(service)
    clock.now = T0 + timedelta(minutes=5, seconds=9)
    service.verify_access_token(token)
    clock.now = T0 + timedelta(minutes=5, seconds=10)
    assert rejected(service, token) == "expired"


def test_not_yet_valid(service: TokenService, clock: ManualClock) -> None:
    token = issue(service)
    clock.now = T0 - timedelta(seconds=10)
    service.verify_access_token(token)
    clock.now = T0 - timedelta(seconds=11)
    assert rejected(service, token) == "not yet valid"


def test_wrong_audience_or_issuer(service: TokenService, ring: KeyRing, clock: ManualClock) -> None:
    token = issue(service)
    other_audience = TokenService(ring, ISSUER, "https://other.example/fhir", clock=clock)
    assert rejected(other_audience, token) == "wrong audience"
    other_issuer = TokenService(ring, "https://other.example/oauth", AUDIENCE, clock=clock)
    assert rejected(other_issuer, token) == "wrong issuer"


@pytest.mark.parametrize(
    "claim", ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "role", "client_id"]
)
def test_missing_claims_are_refused(service: TokenService, ring: KeyRing, claim: str) -> None:
    payload = payload_of(issue(service))
    del payload[claim]
    token = forge({"kid": ring.current.kid, "typ": "at+jwt"}, payload, ring.current.private_key)
    assert rejected(service, token) == f"missing claim: {claim}"


@pytest.mark.parametrize(
    ("claim", "value"),
    [("scope", ["patient/*.read"]), ("role", 1), ("exp", "later"), ("patient", 7), ("nbf", True)],
)
def test_claims_of_the_wrong_type_are_refused(
    service: TokenService, ring: KeyRing, claim: str, value: object
) -> None:
    payload = {**payload_of(issue(service)), claim: value}
    token = forge({"kid": ring.current.kid, "typ": "at+jwt"}, payload, ring.current.private_key)
    rejected(service, token)


def test_revocation_hook(service: TokenService) -> None:
    token = issue(service)
    jti = payload_of(token)["jti"]
    seen: list[str] = []

    def revoked(candidate: str) -> bool:
        seen.append(candidate)
        return candidate == jti

    with pytest.raises(InvalidToken, match="revoked"):
        service.verify_access_token(token, is_revoked=revoked)
    assert seen == [jti]
    assert service.verify_access_token(token, is_revoked=lambda _: False).jti == jti


def test_tokens_survive_rotation_until_their_key_is_pruned(
    service: TokenService, ring: KeyRing, clock: ManualClock
) -> None:
    old_token = issue(service)
    clock.now = T0 + timedelta(minutes=1)
    new_key = ring.rotate()
    new_token = issue(service)
    assert jwt.get_unverified_header(new_token)["kid"] == new_key.kid
    service.verify_access_token(old_token)
    service.verify_access_token(new_token)
    ring.prune(clock.now + timedelta(days=1))
    assert rejected(service, old_token).startswith("unknown key")
    service.verify_access_token(new_token)


def test_opaque_tokens_and_their_digest() -> None:
    tokens = {new_opaque_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 43 and t.replace("-", "").replace("_", "").isalnum() for t in tokens)
    assert token_digest("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


RFC7636_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC7636_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_pkce_rfc7636_appendix_b() -> None:
    assert pkce_challenge(RFC7636_VERIFIER) == RFC7636_CHALLENGE
    assert verify_pkce(RFC7636_VERIFIER, RFC7636_CHALLENGE, "S256")


def test_pkce_refuses_plain_and_wrong_verifiers() -> None:
    assert not verify_pkce(RFC7636_VERIFIER, RFC7636_VERIFIER, "plain")
    assert not verify_pkce(RFC7636_VERIFIER, RFC7636_CHALLENGE, "plain")
    assert not verify_pkce(RFC7636_VERIFIER[:-1] + "l", RFC7636_CHALLENGE, "S256")
    assert not verify_pkce(RFC7636_VERIFIER, RFC7636_CHALLENGE[:-1], "S256")
    assert not verify_pkce(RFC7636_VERIFIER, "挑战", "S256")


@pytest.mark.parametrize(
    ("verifier", "valid"),
    [
        ("a" * 42, False),
        ("a" * 43, True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("A-z._~0" + "a" * 40, True),
        ("a" * 42 + "+", False),
        ("a" * 42 + "/", False),
        ("a" * 42 + "=", False),
        ("a" * 42 + "é", False),
    ],
)
def test_pkce_verifier_length_and_characters(verifier: str, valid: bool) -> None:
    if valid:
        assert verify_pkce(verifier, pkce_challenge(verifier), "S256")
    else:
        with pytest.raises(ValueError):
            pkce_challenge(verifier)
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        assert not verify_pkce(verifier, digest.rstrip(b"=").decode(), "S256")
