"""Signing keys of access tokens: EC P-256 (ES256) keys in a directory, rotated without downtime.

Each key is two files named by its `kid` (the RFC 7638 thumbprint of its public key):
`KID.pem`, the private key, and `KID.json`, its creation time, both readable by the owner only.
The newest key signs; a key stops being current when the next one is created, stays published
so that the tokens it signed still verify, and is removed by `prune` once `retire_after` has
passed since then.

Several processes may share the directory: a process that meets an unknown `kid` rereads it,
and long-lived processes call `reload()` now and then to pick up a rotation done elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

Clock = Callable[[], datetime]

ALGORITHM = "ES256"
_KID = re.compile(r"[A-Za-z0-9_-]{43}")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    created: datetime

    @cached_property  # derived once: every request's token is checked against it
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()

    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": ALGORITHM}


class KeyRing:
    """The signing keys kept in one directory, oldest first; the last one is current."""

    def __init__(
        self, directory: Path, clock: Clock = utc_now, retire_after: timedelta = timedelta(days=1)
    ) -> None:
        self.directory = Path(directory)
        self.clock = clock
        self.retire_after = retire_after
        self._keys: list[SigningKey] = []

    @classmethod
    def load_or_create(
        cls, directory: Path, clock: Clock = utc_now, retire_after: timedelta = timedelta(days=1)
    ) -> KeyRing:
        """The ring in `directory`, creating the directory and a first key when there is none."""
        ring = cls(directory, clock, retire_after)
        ring.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ring.directory, 0o700)
        ring.reload()
        if not ring._keys:
            ring.rotate()
        return ring

    def reload(self) -> None:
        """Read the keys from the directory again."""
        keys = []
        for meta_path in self.directory.glob("*.json"):
            kid = meta_path.stem
            if not _KID.fullmatch(kid):
                continue
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                pem = meta_path.with_suffix(".pem").read_bytes()
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
            private_key = serialization.load_pem_private_key(pem, None)
            if not isinstance(private_key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{meta_path.with_suffix('.pem')} is not an EC private key")
            keys.append(SigningKey(kid, private_key, datetime.fromisoformat(meta["created"])))
        self._keys = sorted(keys, key=lambda key: (key.created, key.kid))

    @property
    def current(self) -> SigningKey:
        """The key that signs new tokens."""
        if not self._keys:
            raise LookupError(f"no signing key in {self.directory}")
        return self._keys[-1]

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """Every published key, oldest first."""
        return tuple(self._keys)

    def rotate(self, now: datetime | None = None) -> SigningKey:
        """Create a new current key; the previous ones keep verifying until pruned."""
        now = self.clock() if now is None else now
        if now.utcoffset() is None:
            raise ValueError(f"datetime without a time zone: {now!r}")
        if self._keys:
            # A clock that went back must not sort the new key before the current one.
            now = max(now, self._keys[-1].created + timedelta(microseconds=1))
        private_key = ec.generate_private_key(ec.SECP256R1())
        key = SigningKey(_thumbprint(private_key.public_key()), private_key, now)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # The sidecar is written last: a key without one (a crash in between) is never used.
        _write_private(self.directory / f"{key.kid}.pem", pem)
        meta = {"kid": key.kid, "alg": ALGORITHM, "created": now.isoformat()}
        _write_private(self.directory / f"{key.kid}.json", json.dumps(meta).encode())
        self._keys.append(key)
        return key

    def prune(self, now: datetime | None = None) -> list[str]:
        """Remove the keys that stopped being current at least `retire_after` ago."""
        now = self.clock() if now is None else now
        retired = [
            key
            for key, successor in pairwise(self._keys)
            if successor.created + self.retire_after <= now
        ]
        for key in retired:
            (self.directory / f"{key.kid}.json").unlink(missing_ok=True)
            (self.directory / f"{key.kid}.pem").unlink(missing_ok=True)
        self._keys = [key for key in self._keys if key not in retired]
        return [key.kid for key in retired]

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        """The published key `kid`, or None; an unknown kid rereads the directory once."""
        key = self._find(kid)
        if key is None and _KID.fullmatch(kid):
            self.reload()
            key = self._find(kid)
        return key.public_key if key else None

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """RFC 7517 key set of every published key, current first, without private parts."""
        return {"keys": [key.public_jwk() for key in reversed(self._keys)]}

    def _find(self, kid: str) -> SigningKey | None:
        return next((key for key in self._keys if key.kid == kid), None)


def _thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256), used as the kid."""
    jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _write_private(path: Path, content: bytes) -> None:
    """Write `content` readable by the owner only, replacing `path` atomically."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # a leftover could carry wider permissions
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
