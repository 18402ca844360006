"""Signing keys on disk: owner-only files, JWKS without private parts, rotation and pruning."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cityhealth.security.keys import KeyRing

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """A umask that lets everyone read: the key files must still be owner-only."""
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "var" / "keys"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_key_is_created_with_owner_only_files(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    kid = ring.current.kid
    assert mode(key_dir) == 0o700
    assert sorted(p.name for p in key_dir.iterdir()) == [f"{kid}.json", f"{kid}.pem"]
    assert mode(key_dir / f"{kid}.pem") == 0o600
    assert mode(key_dir / f"{kid}.json") == 0o600
    assert (key_dir / f"{kid}.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert json.loads((key_dir / f"{kid}.json").read_text())["created"] == T0.isoformat()
    assert ring.current.created == T0


def test_existing_directory_is_tightened(key_dir: Path) -> None:
    key_dir.mkdir(parents=True, mode=0o755)
    KeyRing.load_or_create(key_dir, lambda: T0)
    assert mode(key_dir) == 0o700


def test_loading_again_reuses_the_key(key_dir: Path) -> None:
    first = KeyRing.load_or_create(key_dir, lambda: T0)
    second = KeyRing.load_or_create(key_dir, lambda: T0 + DAY)
    assert second.current.kid == first.current.kid
    assert second.current.created == T0
    assert len(list(key_dir.iterdir())) == 2


def test_kid_is_the_rfc7638_thumbprint(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    (jwk,) = ring.public_jwks()["keys"]
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]},
        separators=(",", ":"),
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    assert jwk["kid"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_jwks_publishes_public_members_only(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    ring.rotate(T0 + DAY)
    keys = ring.public_jwks()["keys"]
    assert len(keys) == 2
    for jwk in keys:
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
        assert "d" not in jwk
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
        published = ECAlgorithm.from_jwk(json.dumps(jwk))
        assert isinstance(published, ec.EllipticCurvePublicKey)
        expected = ring.public_key(jwk["kid"])
        assert expected is not None
        assert published.public_numbers() == expected.public_numbers()
    assert keys[0]["kid"] == ring.current.kid


def test_rotation_keeps_old_keys_until_retired(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    old = ring.current.kid
    rotated_at = T0 + timedelta(days=30)
    new = ring.rotate(rotated_at)
    assert ring.current.kid == new.kid != old
    assert ring.public_key(old) is not None

    assert ring.prune(rotated_at + DAY - timedelta(seconds=1)) == []
    assert {k["kid"] for k in ring.public_jwks()["keys"]} == {old, new.kid}

    assert ring.prune(rotated_at + DAY) == [old]
    assert ring.public_key(old) is None
    assert [k["kid"] for k in ring.public_jwks()["keys"]] == [new.kid]
    assert sorted(p.name for p in key_dir.iterdir()) == [f"{new.kid}.json", f"{new.kid}.pem"]


def test_retirement_counts_from_when_a_key_stopped_being_current(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0, retire_after=timedelta(hours=6))
    first = ring.current.kid
    second = ring.rotate(T0 + DAY).kid
    third = ring.rotate(T0 + DAY + timedelta(hours=4)).kid
    # first stopped at T0+1d, second at T0+1d+4h: only the first is old enough.
    assert ring.prune(T0 + DAY + timedelta(hours=7)) == [first]
    assert ring.prune(T0 + DAY + timedelta(hours=10)) == [second]
    assert [key.kid for key in ring.keys] == [third]


def test_the_current_key_is_never_pruned(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    assert ring.prune(T0 + timedelta(days=3650)) == []
    assert ring.public_key(ring.current.kid) is not None


def test_default_times_come_from_the_clock(key_dir: Path) -> None:
    now = [T0]
    ring = KeyRing.load_or_create(key_dir, lambda: now[0])
    old = ring.current.kid
    now[0] = T0 + timedelta(days=7)
    assert ring.rotate().created == now[0]
    now[0] += DAY
    assert ring.prune() == [old]


def test_a_clock_that_went_back_still_makes_the_new_key_current(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    new = ring.rotate(T0 - timedelta(hours=1))
    assert ring.current.kid == new.kid
    reloaded = KeyRing.load_or_create(key_dir, lambda: T0)
    assert reloaded.current.kid == new.kid


def test_another_process_sees_a_rotation(key_dir: Path) -> None:
    signer = KeyRing.load_or_create(key_dir, lambda: T0)
    verifier = KeyRing.load_or_create(key_dir, lambda: T0)
    new = signer.rotate(T0 + DAY)
    assert verifier.public_key(new.kid) is not None  # an unknown kid rereads the directory
    assert verifier.current.kid == new.kid


def test_unknown_kids_and_half_written_keys_are_ignored(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    assert ring.public_key("no-such-kid") is None
    assert ring.public_key("../../etc/passwd") is None
    # A crash between the two writes leaves a private key without its sidecar.
    orphan = "A" * 43
    (key_dir / f"{orphan}.pem").write_bytes((key_dir / f"{ring.current.kid}.pem").read_bytes())
    ring.reload()
    assert ring.public_key(orphan) is None
    assert len(ring.keys) == 1


def test_naive_rotation_time_is_refused(key_dir: Path) -> None:
    ring = KeyRing.load_or_create(key_dir, lambda: T0)
    with pytest.raises(ValueError, match="time zone"):
        ring.rotate(datetime(2026, 3, 2, 8, 0))
